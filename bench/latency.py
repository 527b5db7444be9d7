"""Glass-to-glass latency of a WebRTC video path, measured from numbers stamped into frames.

A paced source stamps each frame with its capture time (monotonic ms, mod 2**32) as a block
code (see framecode.py); the receiving end reads the code from every decoded frame the
moment it arrives, so latency = arrival time - capture time, with no clock sync needed
because both ends live in this process.

    python bench/latency.py --mode onehop --jitter stock fast --size 1280x704 640x352 --fps 25 10

The path under test is a `ConnectFn`: give it the source track, get back the track whose
frames come out at the far end (`Link`). `onehop` is two aiortc peers in this process;
a `server` mode only needs another `ConnectFn` (send the source to a livemorph server,
return the track it sends back) passed to `measure()` — nothing else changes. For that
path the engine must leave the top-left 368x48 pixels alone (passthrough does).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from av import VideoFrame

import framecode
from livemorph.media.jitter import install_on_peer_connection

VIDEO_TIME_BASE = Fraction(1, 90000)
_EPOCH = time.monotonic()


def now_ms() -> int:
    """Process-local monotonic milliseconds, the unit of every stamp."""
    return int((time.monotonic() - _EPOCH) * 1000)


def _scene_rgb(width: int, height: int) -> np.ndarray:
    """A real-looking picture slightly larger than the frame, so a crop window can pan."""
    try:
        from skimage.data import astronaut

        image = astronaut()
    except ImportError:  # scikit-image is a test extra; a gradient keeps the script usable
        y, x = np.mgrid[0:512, 0:512]
        image = np.stack([x // 2, y // 2, (x ^ y) & 255], axis=2).astype(np.uint8)
    frame = VideoFrame.from_ndarray(image, format="rgb24")
    return frame.reformat(width=width + 64, height=height + 32).to_ndarray(format="rgb24")


def prerender(width: int, height: int, count: int = 24) -> list[np.ndarray]:
    """`count` yuv420p arrays ((height * 3 / 2) x width) panning back and forth."""
    scene = _scene_rgb(width, height)
    frames = []
    for index in range(count):
        step = index if index < count // 2 else count - index  # ping-pong, no jump
        x, y = step * 4, step * 2
        crop = np.ascontiguousarray(scene[y : y + height, x : x + width])
        yuv = VideoFrame.from_ndarray(crop, format="rgb24").reformat(format="yuv420p")
        frames.append(yuv.to_ndarray())
    return frames


class StampedSource(MediaStreamTrack):
    """A camera-like track: frames on a fixed fps grid, each stamped with its capture time.

    Like a camera with a one-frame buffer, a consumer that falls behind gets the newest
    frame and the missed ones are dropped (counted in `dropped`); the stamp is the grid
    time the frame was "captured", so sender-side waiting counts as latency.
    """

    kind = "video"

    def __init__(self, width: int, height: int, fps: float) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self._frames = prerender(width, height)
        self._start: float | None = None
        self._slot = -1
        self.sent = 0
        self.dropped = 0

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = int((now - self._start) * self.fps)  # newest slot already captured
        slot = max(self._slot + 1, due)
        self.dropped += slot - self._slot - 1
        captured = self._start + slot / self.fps
        if captured > now:
            await asyncio.sleep(captured - now)
        self._slot = slot

        planes = self._frames[slot % len(self._frames)].copy()
        framecode.stamp_luma(planes[: self.height], int((captured - _EPOCH) * 1000))
        frame = VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts, frame.time_base = round(slot * 90000 / self.fps), VIDEO_TIME_BASE
        self.sent += 1
        return frame


@dataclass
class Link:
    """The far end of a path under test: the received track and how to tear it down."""

    track: MediaStreamTrack
    close: Callable[[], Awaitable[None]]


ConnectFn = Callable[[MediaStreamTrack], Awaitable[Link]]


@dataclass
class Result:
    label: str
    frames: int  # stamped frames received after warm-up
    unreadable: int
    first_frame_ms: float  # from starting to connect until the first decoded frame
    p50_ms: float
    p95_ms: float
    max_ms: float
    fps: float  # delivered, after warm-up
    cpu_pct: float  # this process, % of one core, after warm-up
    source_dropped: int

    def line(self) -> str:
        return (
            f"{self.label:<28} first {self.first_frame_ms:6.0f} ms  p50 {self.p50_ms:6.1f}  "
            f"p95 {self.p95_ms:6.1f}  max {self.max_ms:6.1f} ms  fps {self.fps:5.1f}  "
            f"cpu {self.cpu_pct:5.1f}%  frames {self.frames}  unreadable {self.unreadable}  "
            f"src-dropped {self.source_dropped}"
        )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(
    source_factory: Callable[[], StampedSource],
    connect: ConnectFn,
    seconds: float = 10.0,
    warmup: float = 1.0,
    label: str = "",
) -> Result:
    """Run one path for `warmup` + `seconds` after its first frame and summarise latency.

    Warm-up frames (keyframe, bitrate ramp-up) count only toward time to first frame. The
    receive loop does nothing but read the stamp, so frames are drained as they arrive.
    """
    source = source_factory()  # pre-renders its frames: not part of time to first frame
    started = time.monotonic()
    link = await connect(source)
    latencies: list[int] = []
    unreadable = 0
    first_frame_ms = -1.0
    window_start = deadline = cpu_start = 0.0
    try:
        while True:
            frame = await asyncio.wait_for(link.track.recv(), timeout=10)
            arrived, arrived_ms = time.monotonic(), now_ms()
            if first_frame_ms < 0:
                first_frame_ms = (arrived - started) * 1000
                window_start = arrived + warmup
                deadline = window_start + seconds
            if arrived >= deadline:
                break
            if arrived < window_start:
                continue
            if not cpu_start:
                cpu_start, window_start = _cpu_seconds(), arrived
            stamp = framecode.read_yuv(frame)
            if stamp is None:
                unreadable += 1
            else:
                latencies.append((arrived_ms - stamp) & 0xFFFFFFFF)
        elapsed = arrived - window_start
        cpu = _cpu_seconds() - cpu_start
    finally:
        source.stop()
        await link.close()
    ms = np.array(latencies or [np.nan], dtype=np.float64)
    return Result(
        label=label,
        frames=len(latencies),
        unreadable=unreadable,
        first_frame_ms=first_frame_ms,
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        max_ms=float(ms.max()),
        fps=(len(latencies) + unreadable) / elapsed,
        cpu_pct=100 * cpu / elapsed,
        source_dropped=source.dropped,
    )


def _prefer_vp8(pc: RTCPeerConnection) -> None:
    codecs = RTCRtpSender.getCapabilities("video").codecs
    for transceiver in pc.getTransceivers():
        transceiver.setCodecPreferences([c for c in codecs if c.mimeType == "video/VP8"])


def onehop(jitter: str) -> ConnectFn:
    """Two aiortc peers in this process, VP8, one hop; `jitter` is "stock" or "fast"."""

    async def connect(source: MediaStreamTrack) -> Link:
        sender, receiver = RTCPeerConnection(), RTCPeerConnection()
        sender.addTrack(source)
        _prefer_vp8(sender)
        if jitter == "fast":
            install_on_peer_connection(receiver)  # via the "track" event, before any packet
        remote: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        receiver.on("track", remote.set_result)

        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)

        async def close() -> None:
            await sender.close()
            await receiver.close()

        return Link(track=await remote, close=close)

    return connect


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


async def _main(args: argparse.Namespace) -> list[Result]:
    results = []
    for width, height in args.size:
        for fps in args.fps:
            for jitter in args.jitter:
                label = f"{args.mode} {jitter:<5} {width}x{height}@{fps:g}"

                def factory(w: int = width, h: int = height, f: float = fps) -> StampedSource:
                    return StampedSource(w, h, f)

                result = await measure(
                    factory, onehop(jitter), args.seconds, args.warmup, label=label
                )
                print(result.line(), flush=True)
                results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["onehop"], default="onehop")
    parser.add_argument("--jitter", nargs="+", choices=["stock", "fast"], default=["stock", "fast"])
    parser.add_argument("--size", nargs="+", type=_size, default=[(1280, 704), (640, 352)])
    parser.add_argument("--fps", nargs="+", type=float, default=[25.0, 10.0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds ignored after the first frame"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = asyncio.run(_main(args))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
