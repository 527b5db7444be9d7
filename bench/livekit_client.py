"""One latency run through the LiveKit path with the published client `decart==0.2.4`.

bench/livekit_latency.py starts this program in the environment bench/decart_venv.py builds
(decart 0.2.4, livekit 1.2.1), so it imports only decart, livekit, numpy, the standard
library and framecode.py beside it (which needs numpy alone). It connects to a server as an
app would (`RealtimeClient.connect` with a `rtc.LocalVideoTrack`), publishes a camera fed
from `--frames` (yuv420p arrays the bench pre-renders, the same pictures its direct path
sends) at the model's size and fps, each frame stamped with its capture time
(framecode.py), and reads the model's output with `rtc.VideoStream`: latency = arrival -
capture, both on this process's monotonic clock.

Like bench/latency.py's `measure()`: time to first frame runs from the call to connect to
the first decoded frame; the window opens `--warmup` seconds after that frame and lasts
`--seconds`. The camera keeps to its fps grid; a slot it could not keep (this process
busy) is dropped, not sent late, and counted.

Out, one JSON object a line: `start`; `connected`; `first_frame` (ttff); once the window
has closed (the receive loop only reads stamps), one `frame` per frame of the window (`at`:
arrival in `time.monotonic()` seconds, the machine's CLOCK_MONOTONIC, so comparable with
the bench's; `stamp` and `ms` (latency), None when the code was unreadable; `size`); then
`done` (when the output track was subscribed, camera counts, this process's CPU seconds in
the window, codecs and a few WebRTC stats of both tracks); or `failed` with the error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
from decart import models
from decart.errors import ModelNotFoundError
from decart.models import ModelDefinition
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState, Prompt
from livekit import rtc

import framecode

_EPOCH = time.monotonic()


def now_ms() -> int:
    """Process-local monotonic milliseconds, the unit of every stamp."""
    return int((time.monotonic() - _EPOCH) * 1000)


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def cpu_seconds() -> float:
    """This process's user + system CPU, all threads (LiveKit's FFI runs in its own)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StampedCamera:
    """A camera on a fixed fps grid: each frame the next pre-rendered picture with its
    capture time stamped in the top-left corner, handed to a `rtc.VideoSource`."""

    def __init__(self, frames: np.ndarray, width: int, height: int, fps: float) -> None:
        if frames.shape[1:] != (height * 3 // 2, width):
            raise SystemExit(f"--frames are {frames.shape[1:]}, not yuv420p of {width}x{height}")
        self.frames, self.width, self.height, self.fps = frames, width, height, fps
        self.source = rtc.VideoSource(width, height)
        self.track = rtc.LocalVideoTrack.create_video_track("camera", self.source)
        self.sent = 0
        self.dropped = 0
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start, slot = time.monotonic(), -1
        while True:
            now = time.monotonic()
            due = int((now - start) * self.fps)  # the newest slot already captured
            next_slot = max(slot + 1, due)
            self.dropped += next_slot - slot - 1
            captured = start + next_slot / self.fps
            if captured > now:
                await asyncio.sleep(captured - now)
            slot = next_slot
            planes = self.frames[slot % len(self.frames)].copy()
            framecode.stamp_luma(planes[: self.height], int((captured - _EPOCH) * 1000))
            frame = rtc.VideoFrame(
                self.width, self.height, rtc.VideoBufferType.I420, bytearray(planes.data)
            )
            self.source.capture_frame(frame, timestamp_us=round(slot * 1e6 / self.fps))
            self.sent += 1

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.source.aclose()


class StampReader:
    """Reads the stamp of every frame of the remote video track as it arrives."""

    def __init__(self, started: float, warmup: float, seconds: float) -> None:
        self.started, self.warmup, self.seconds = started, warmup, seconds
        self.track: rtc.RemoteVideoTrack | None = None
        self.subscribed_at: float | None = None
        self.first_at: float | None = None
        self.window: tuple[float, float] | None = None
        self.cpu_start = self.cpu_end = 0.0
        #: (arrival, stamp, latency ms, width, height) of each frame of the window
        self.frames: list[tuple[float, int | None, int | None, int, int]] = []
        self.first = asyncio.Event()
        self.done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_remote_stream(self, track: rtc.RemoteVideoTrack) -> None:
        if self._task is None:
            self.subscribed_at = time.monotonic()
            self.track = track
            self._task = asyncio.get_running_loop().create_task(self._read(track))

    async def _read(self, track: rtc.RemoteVideoTrack) -> None:
        stream = rtc.VideoStream(track, format=rtc.VideoBufferType.I420)
        window_start = deadline = 0.0
        try:
            async for event in stream:
                arrived, arrived_ms = time.monotonic(), now_ms()
                frame = event.frame
                if self.first_at is None:
                    self.first_at = arrived
                    emit(
                        "first_frame",
                        ms=round((arrived - self.started) * 1000, 1),
                        size=[frame.width, frame.height],
                    )
                    window_start = arrived + self.warmup
                    deadline = window_start + self.seconds
                    self.first.set()
                if arrived >= deadline:
                    self.cpu_end = cpu_seconds()
                    self.window = (window_start, arrived)
                    break
                if arrived < window_start:
                    continue
                if not self.cpu_start:
                    self.cpu_start, window_start = cpu_seconds(), arrived
                luma = np.frombuffer(frame.data, np.uint8, frame.width * frame.height)
                stamp = framecode.read_luma(luma.reshape(frame.height, frame.width))
                latency = None if stamp is None else (arrived_ms - stamp) & 0xFFFFFFFF
                self.frames.append((arrived, stamp, latency, frame.width, frame.height))
        finally:
            self.done.set()
            await stream.aclose()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def model_definition(args: argparse.Namespace) -> ModelDefinition:
    """The SDK's own definition of the model when it lists it, else a custom one at the
    size and rate the bench passes (0.2.4 no longer lists mirage_v2, for one)."""
    try:
        return models.realtime(args.model)
    except ModelNotFoundError:
        return ModelDefinition(
            name=args.model,
            url_path="/v1/stream",
            fps=args.fps,
            width=args.width,
            height=args.height,
        )


#: WebRTC's RTCQualityLimitationReason, by the number LiveKit's stats carry.
LIMITATIONS = {0: "none", 1: "cpu", 2: "bandwidth", 3: "other"}


async def webrtc_stats(track: rtc.Track | None) -> dict[str, Any]:
    """The codec and a few counters of one track's WebRTC stats (what is there)."""
    if track is None:
        return {}
    found: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        for report in await asyncio.wait_for(track.get_stats(), 5):
            kind = report.WhichOneof("stats")
            if kind == "codec":
                found.setdefault("codecs", []).append(report.codec.codec.mime_type)
            elif kind == "inbound_rtp":
                inbound = report.inbound_rtp.inbound
                decoded = inbound.frames_decoded or 1
                emitted = inbound.jitter_buffer_emitted_count or 1
                found.update(
                    decoder=inbound.decoder_implementation,
                    frames_decoded=inbound.frames_decoded,
                    frames_dropped=inbound.frames_dropped,
                    decode_ms=round(inbound.total_decode_time / decoded * 1000, 2),
                    jitter_buffer_ms=round(inbound.jitter_buffer_delay / emitted * 1000, 2),
                    freeze_count=inbound.freeze_count,
                    size=[inbound.frame_width, inbound.frame_height],
                )
            elif kind == "outbound_rtp":
                outbound = report.outbound_rtp.outbound
                encoded = outbound.frames_encoded or 1
                found.update(
                    encoder=outbound.encoder_implementation,
                    frames_encoded=outbound.frames_encoded,
                    encode_ms=round(outbound.total_encode_time / encoded * 1000, 2),
                    target_kbps=round(outbound.target_bitrate / 1000),
                    quality_limitation=LIMITATIONS.get(outbound.quality_limitation_reason),
                    resolution_changes=outbound.quality_limitation_resolution_changes,
                    size=[outbound.frame_width, outbound.frame_height],
                )
    return found


async def run(args: argparse.Namespace) -> None:
    model = model_definition(args)
    emit("start", model=model.name, size=[model.width, model.height], fps=model.fps)
    frames = np.load(args.frames)
    camera = StampedCamera(frames, model.width, model.height, model.fps)
    reader: StampReader | None = None
    realtime: RealtimeClient | None = None
    try:
        started = time.monotonic()
        reader = StampReader(started, args.warmup, args.seconds)
        async with asyncio.timeout(args.connect_timeout):  # the SDK retries for minutes
            realtime = await RealtimeClient.connect(
                base_url=args.realtime_url,
                api_key=args.api_key,
                local_track=camera.track,
                options=RealtimeConnectOptions(
                    model=model,
                    on_remote_stream=reader.on_remote_stream,
                    initial_state=ModelState(prompt=Prompt(text=args.prompt)),
                ),
            )
        emit("connected", seconds=round(time.monotonic() - started, 3))
        limit = args.connect_timeout + args.warmup + args.seconds + args.stall_timeout
        async with asyncio.timeout(limit):
            await reader.first.wait()
            # during the warm-up, which the window leaves out: what the camera sends at first
            published_first = await webrtc_stats(camera.track)
            await reader.done.wait()
        if reader.window is None:
            raise RuntimeError("the remote video ended before the window closed")
        for at, stamp, latency, width, height in reader.frames:
            emit("frame", at=round(at, 6), stamp=stamp, ms=latency, size=[width, height])
        received = await webrtc_stats(reader.track)
        published = await webrtc_stats(camera.track)
        emit(
            "done",
            window=list(reader.window),
            subscribed_s=round((reader.subscribed_at or started) - started, 3),
            cpu_s=round(reader.cpu_end - reader.cpu_start, 3),
            camera_sent=camera.sent,
            camera_dropped=camera.dropped,
            received=received,
            published=published,
            published_at_first_frame=published_first,
        )
    finally:
        if reader is not None:
            await reader.close()
        if realtime is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(realtime.disconnect(), 10)
        await camera.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--realtime-url", required=True, help="ws(s)://HOST:PORT")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--fps", type=int, required=True)
    parser.add_argument(
        "--frames", type=Path, required=True, help=".npy of yuv420p frames (N, 3h/2, w)"
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--prompt", default="anime")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    parser.add_argument(
        "--stall-timeout", type=float, default=10.0, help="slack past the window's end"
    )
    return parser.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    code = 0
    try:
        asyncio.run(run(args))
    except Exception as error:
        emit("failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        code = 1
    sys.stdout.flush()
    # The LiveKit FFI's threads can hold the interpreter's exit: leave at once.
    os._exit(code)


if __name__ == "__main__":
    main()
