"""Glass-to-glass latency of a WebRTC video path, measured from numbers stamped into frames.

A paced source stamps each frame with its capture time (monotonic ms, mod 2**32) as a block
code (see framecode.py); the receiving end reads the code from every decoded frame the
moment it arrives, so latency = arrival time - capture time, with no clock sync needed
because both ends live in this process.

    python bench/latency.py                      # through the server, then the overload run
    python bench/latency.py --mode onehop        # two aiortc peers, no server

Modes:
- `server`: camera -> `livemorph serve --engine passthrough` -> back, with the Python SDK,
  at each camera model's size and fps; `--jitter stock fast` compares aiortc's stock
  receive path with livemorph's marker-bit release on both server and client.
- `overload`: the `sleep` engine takes longer per frame than the camera interval for 60 s;
  prints the p95 of the first and the last 10 s, which stay close when stale frames are
  dropped instead of queued.
- `onehop`: one hop between two peers in this process: the floor under everything else.

The path under test is a `ConnectFn`: give it the source track, get back the track whose
frames come out at the far end (`Link`). The engine must leave the top-left 368x48 pixels
alone (passthrough and sleep do), since that is where the stamp is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from aiortc import MediaStreamTrack, RTCPeerConnection, RTCRtpSender
from av import VideoFrame

import bench_server
import framecode
from livemorph import create_client
from livemorph.media.jitter import install_on_peer_connection
from livemorph.models import CATALOG
from livemorph.testing import LiveServer

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
    #: (seconds since the window opened, latency ms) for every stamped frame
    samples: list[tuple[float, int]] = field(default_factory=list, repr=False)

    def p95_between(self, start: float, end: float) -> float:
        """p95 latency of the frames that arrived between `start` and `end` seconds."""
        window = [ms for t, ms in self.samples if start <= t < end]
        return float(np.percentile(window, 95)) if window else float("nan")

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
    on_frame: Callable[[float, int | None, int | None], None] | None = None,
) -> Result:
    """Run one path for `warmup` + `seconds` after its first frame and summarise latency.

    Warm-up frames (keyframe, bitrate ramp-up) count only toward time to first frame. The
    receive loop does nothing but read the stamp, so frames are drained as they arrive.
    `on_frame(arrived, stamp, latency_ms)` sees every frame of the window as it is read
    (`arrived` in `time.monotonic()` seconds; stamp and latency None when unreadable).
    """
    source = source_factory()  # pre-renders its frames: not part of time to first frame
    started = time.monotonic()
    link = await connect(source)
    latencies: list[int] = []
    samples: list[tuple[float, int]] = []
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
                samples.append((arrived - window_start, latencies[-1]))
            if on_frame is not None:
                on_frame(arrived, stamp, latencies[-1] if stamp is not None else None)
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
        samples=samples,
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


def through_server(server: LiveServer, model: str, fast: bool) -> ConnectFn:
    """Camera -> livemorph server (its engine) -> back, with the Python SDK: two hops."""

    async def connect(source: MediaStreamTrack) -> Link:
        client = create_client(api_key=server.api_key, base_url=server.base_url)
        session = await client.realtime.connect(source, model=model, fast_receive=fast)

        async def close() -> None:
            await session.disconnect()
            await client.aclose()

        assert session.video_track is not None
        return Link(track=session.video_track, close=close)

    return connect


@contextlib.contextmanager
def livemorph_server(engine: str, fast: bool, log_level: str = "warning") -> Iterator[LiveServer]:
    """A fresh `livemorph serve` with `engine`, its receive path stock or fast; the bench's
    engines (`stamped:<engine>`, bench_server.py) are among those it knows."""
    with (
        tempfile.TemporaryDirectory(prefix="livemorph-bench-") as data_dir,
        bench_server.serving(
            Path(data_dir),
            "--engine",
            engine,
            "--log-level",
            log_level,
            env={"LIVEMORPH_FAST_RECEIVE": "1" if fast else "0"},
        ) as server,
    ):
        yield server


#: The models this server serves from a camera, each measured at its own size and rate.
CAMERA_MODELS = ("mirage", "mirage_v2", "lucy_v2v_720p_rt", "lucy_2_rt")


async def _run_onehop(args: argparse.Namespace) -> list[Result]:
    results = []
    for width, height in args.size:
        for fps in args.fps:
            for jitter in args.jitter:
                label = f"onehop {jitter:<5} {width}x{height}@{fps:g}"
                result = await measure(
                    functools.partial(StampedSource, width, height, fps),
                    onehop(jitter),
                    args.seconds,
                    args.warmup,
                    label=label,
                )
                print(result.line(), flush=True)
                results.append(result)
    return results


async def _run_server(args: argparse.Namespace) -> list[Result]:
    results = []
    for jitter in args.jitter:
        fast = jitter == "fast"
        with livemorph_server("passthrough", fast) as server:
            for name in args.models:
                spec = CATALOG[name]
                label = f"server {jitter:<5} {name} {spec.width}x{spec.height}@{spec.fps}"
                result = await measure(
                    functools.partial(StampedSource, spec.width, spec.height, spec.fps),
                    through_server(server, name, fast),
                    args.seconds,
                    args.warmup,
                    label=label,
                )
                print(result.line(), flush=True)
                results.append(result)
    return results


async def _run_overload(args: argparse.Namespace) -> list[Result]:
    """An engine slower than the camera for a long run: latency must not grow."""
    spec = CATALOG["mirage"]
    engine_ms = args.engine_ms
    with livemorph_server(f"sleep:{engine_ms:g}", fast=True) as server:
        label = f"overload sleep:{engine_ms:g}ms {spec.width}x{spec.height}@{spec.fps}"
        result = await measure(
            functools.partial(StampedSource, spec.width, spec.height, spec.fps),
            through_server(server, spec.name, True),
            args.overload_seconds,
            args.warmup,
            label=label,
        )
    print(result.line(), flush=True)
    first = result.p95_between(0, 10)
    last = result.p95_between(args.overload_seconds - 10, args.overload_seconds)
    print(
        f"overload: camera {spec.fps} fps, engine {1000 / engine_ms:.1f} fps; "
        f"p95 first 10 s {first:.1f} ms, last 10 s {last:.1f} ms, ratio {last / first:.2f}",
        flush=True,
    )
    return [result]


RUNS = {"onehop": _run_onehop, "server": _run_server, "overload": _run_overload}


async def _main(args: argparse.Namespace) -> list[Result]:
    results = []
    for mode in args.mode:
        results += await RUNS[mode](args)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=list(RUNS),
        default=["server", "overload"],
        help="onehop: two peers, no server; server: through livemorph with the passthrough "
        "engine; overload: an engine slower than the camera (default: server overload)",
    )
    parser.add_argument("--jitter", nargs="+", choices=["stock", "fast"], default=["stock", "fast"])
    parser.add_argument(
        "--size", nargs="+", type=_size, default=[(1280, 704), (640, 352)], help="onehop sizes"
    )
    parser.add_argument("--fps", nargs="+", type=float, default=[25.0, 10.0], help="onehop fps")
    parser.add_argument(
        "--models",
        nargs="+",
        choices=CAMERA_MODELS,
        default=list(CAMERA_MODELS),
        help="server mode: the models to measure, each at its size and fps",
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument(
        "--engine-ms",
        type=float,
        default=60.0,
        help="overload: engine time per frame (60 ms: 16.7 fps < 25 fps camera)",
    )
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
