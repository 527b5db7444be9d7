"""Time to first frame and glass-to-glass latency through the LiveKit path beside the direct
path, with Decart's published Python clients, against one `livemorph serve`.

    python bench/livekit_latency.py                      # mirage_v2, 2 runs of each, 20 s
    python bench/livekit_latency.py --model lucy_v2v_720p_rt --seconds 10 --runs 3

One server (`livemorph serve --engine passthrough --log-level warning`, so the stamp
survives) serves both paths, one session at a time, the paths alternating (direct,
LiveKit, direct, ...) so that whatever else loads the machine is shared between them:
- direct: `decart==0.0.30` from this environment, `RealtimeClient.connect` with an aiortc
  track (offer/answer over `/v1/stream`), fed and read by bench/latency.py's
  `StampedSource` and `measure()`;
- LiveKit: `decart==0.2.4` with `livekit==1.2.1` (libwebrtc behind LiveKit's FFI) in the
  environment bench/decart_venv.py builds: bench/livekit_client.py runs there as a
  subprocess (`livekit_join`, then LiveKit's signalling on the server's `/rtc`), publishes a
  `rtc.VideoSource` and reads `rtc.VideoStream`.
Both send the same pre-rendered pictures at the model's size and fps, each stamped with its
capture time (framecode.py), and both connect with the initial prompt an app passes. Each
end stamps and reads in one process on one monotonic clock, so latency = arrival - capture
needs no clock sync. Time to first frame (ttff) runs from the call to connect to the first
decoded frame; the window opens 1 s after it (`--warmup`) and lasts `--seconds`.

Per run: ttff, p50/p95/p99 latency (ms) over the window, received fps, frames read, frames
lost (camera slots between the first and last stamp seen that never arrived: dropped by the
camera, an encoder, the server or a receiver) and stale (a stamp no newer than one already
seen: repeats), and the CPU (% of one core, /proc, over the window) of the server process,
of the client's process (this one for the direct path, the subprocess for LiveKit) and of
the whole machine (other work on it shows there). Then LiveKit/direct ratios of p50 and
ttff from each pair of runs, which compare fairly on a busy machine where absolute figures
do not, and what each side's WebRTC says it sent and received (codec, size, bitrate).

Not bench/livekit.py: bench/ is the first entry of sys.path for every bench script, the
server's (bench_server.py) included, and a module named `livekit` there hides the `livekit`
package (`from livekit.protocol import models` fails: "'livekit' is not a package").

Figures, 2026-12-07, on this 2-core machine, `python bench/livekit_latency.py`
(mirage_v2 1280x704@22, 20 s a run; direct: decart 0.0.30, livekit: decart 0.2.4 with
livekit 1.2.1):

    path    run ttff ms   p50    p95    p99   fps frames lost stale  server client machine
    direct    1     275  77.0  102.0  120.2  22.0    440    0     0   28.0%  38.4%   91.4%
    livekit   1     592  45.0   61.0   67.0  22.0    440    0     0   23.2%  35.4%   66.9%
    direct    2     213  71.0   80.0   86.6  22.0    439    0     0   24.6%  33.7%   59.2%
    livekit   2     601  39.0   43.0   45.0  22.0    440    0     0   21.5%  32.9%   59.5%
    livekit/direct, median of 2 runs: p50 0.57  ttff 2.48

Both paths carry 1280x704 the whole run: the LiveKit publisher (OpenH264) sends its camera
at the model's size from its first frame, at about 2 Mb/s. It did not before the server
asked it to start at 1700 kb/s (livekit/sdp.py `hint_bitrate`): on aiortc's REMB alone,
without the transport-cc feedback it offers, it started at a 250 kb/s target and 640x352,
reached 960x528 after about 16 s and never 1280x704 within a run (that earlier run: p50
ratio 0.52, ttff ratio 3.58). Its lower p50 is the client's side: libwebrtc releases a
frame once it is complete; the direct client's stock aiortc waits for the next frame's
first packet. Most of the LiveKit ttff is signalling; in one debug run (first frame at
0.95 s): `livekit_join` and LiveKit's join (after a 404 on `/rtc/v1`, which livekit 1.2.1
tries first) by 0.19 s, the subscriber connection by 0.24 s, the publisher's (data
channels) by 0.42 s, then the client's renegotiation to add the camera at 0.63 s (the
server answers in 7 ms), its first RTP packet at 0.79 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from aiortc import MediaStreamTrack
from decart import models as decart_models
from decart.errors import ModelNotFoundError
from decart.models import ModelDefinition
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState, Prompt

import decart_venv
import latency
from cpu import CpuSampler
from livemorph.models import CATALOG
from livemorph.testing import LiveServer, serve

CLIENT = Path(__file__).resolve().parent / "livekit_client.py"
DIRECT_CLIENT = "decart 0.0.30 (aiortc)"
LIVEKIT_CLIENT = f"decart {decart_venv.VERSION} (livekit {decart_venv.LIVEKIT_VERSION})"
PROMPT = "anime"
#: Models a camera feeds (not live_avatar, which listens).
MODELS = sorted(name for name, spec in CATALOG.items() if "audio" not in spec.kind)


@dataclass
class Run:
    """One session's figures; `frames` holds (arrival, stamp, latency ms) of each frame of
    the window, stamp and latency None where the code was unreadable."""

    path: str
    client: str
    index: int
    fps_camera: float
    ttff_ms: float
    frames: list[tuple[float, int | None, int | None]]
    fps: float
    server_cpu: float
    client_cpu: float
    machine_cpu: float
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def latencies(self) -> np.ndarray:
        values = [ms for _, _, ms in self.frames if ms is not None]
        return np.array(values or [np.nan], dtype=np.float64)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))

    @property
    def readable(self) -> int:
        return sum(1 for _, stamp, _ in self.frames if stamp is not None)

    @property
    def stale(self) -> int:
        newest, count = -1, 0
        for _, stamp, _ in self.frames:
            if stamp is None:
                continue
            if stamp <= newest:
                count += 1
            newest = max(newest, stamp)
        return count

    @property
    def lost(self) -> int:
        """Camera slots between the first and the last stamp read that were never read."""
        stamps = sorted({stamp for _, stamp, _ in self.frames if stamp is not None})
        step_ms = 1000 / self.fps_camera
        return sum(max(0, round((b - a) / step_ms) - 1) for a, b in itertools.pairwise(stamps))

    def line(self) -> str:
        return (
            f"{self.path:<8} {self.client:<28} {self.index:>3} {self.ttff_ms:>8.0f} "
            f"{self.percentile(50):>6.1f} {self.percentile(95):>6.1f} {self.percentile(99):>6.1f} "
            f"{self.fps:>5.1f} {self.readable:>6} {self.lost:>5} {self.stale:>5} "
            f"{self.server_cpu:>6.1f}% {self.client_cpu:>6.1f}% {self.machine_cpu:>7.1f}%"
        )


HEADER = (
    f"{'path':<8} {'client':<28} {'run':>3} {'ttff ms':>8} {'p50':>6} {'p95':>6} {'p99':>6} "
    f"{'fps':>5} {'frames':>6} {'lost':>5} {'stale':>5} {'server':>7} {'client':>7} "
    f"{'machine':>8}"
)


def model_definition(name: str) -> ModelDefinition:
    """decart 0.0.30's definition of `name` where it lists it, else one at livemorph's size
    and rate (as the LiveKit client does for models 0.2.4 no longer lists)."""
    try:
        return decart_models.realtime(name)
    except ModelNotFoundError:
        spec = CATALOG[name]
        return ModelDefinition(
            name=name, url_path=spec.url_path, fps=spec.fps, width=spec.width, height=spec.height
        )


def _negotiated_codec(sdp: str | None) -> str | None:
    """The first codec of the first video section of an SDP answer: the one in use."""
    if not sdp:
        return None
    section = re.search(r"^m=video \S+ \S+ (\d+)", sdp, re.M)
    if section is None:
        return None
    name = re.search(rf"^a=rtpmap:{section.group(1)} ([^/\s]+)", sdp, re.M)
    return name.group(1) if name else None


def direct(server: LiveServer, model: ModelDefinition, notes: dict[str, Any]) -> latency.ConnectFn:
    """The published decart==0.0.30 client: `RealtimeClient.connect` with the source track."""

    async def connect(source: MediaStreamTrack) -> latency.Link:
        video: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_remote_stream(track: Any) -> None:
            if track.kind == "video" and not video.done():
                video.set_result(track)

        realtime = await RealtimeClient.connect(
            base_url=server.ws_url,
            api_key=server.api_key,
            local_track=source,
            options=RealtimeConnectOptions(
                model=model,
                on_remote_stream=on_remote_stream,
                initial_state=ModelState(prompt=Prompt(text=PROMPT)),
            ),
        )
        with contextlib.suppress(Exception):  # the SDK's internals: a note, nothing more
            description = realtime._manager._connection._pc.remoteDescription
            notes["codec"] = _negotiated_codec(description.sdp)
        track = await asyncio.wait_for(video, 30)

        async def close() -> None:
            await realtime.disconnect()

        return latency.Link(track=track, close=close)

    return connect


async def run_direct(
    server: LiveServer,
    model: ModelDefinition,
    sampler: CpuSampler,
    args: argparse.Namespace,
    index: int,
) -> Run:
    frames: list[tuple[float, int | None, int | None]] = []
    notes: dict[str, Any] = {}
    result = await latency.measure(
        functools.partial(latency.StampedSource, model.width, model.height, model.fps),
        direct(server, model, notes),
        args.seconds,
        args.warmup,
        label="direct",
        on_frame=lambda arrived, stamp, ms: frames.append((arrived, stamp, ms)),
    )
    server_cpu, _, machine_cpu = sampler.shares(frames[0][0], frames[-1][0])
    notes["camera_dropped"] = result.source_dropped
    return Run(
        path="direct",
        client=DIRECT_CLIENT,
        index=index,
        fps_camera=model.fps,
        ttff_ms=result.first_frame_ms,
        frames=frames,
        fps=result.fps,
        server_cpu=server_cpu,
        client_cpu=result.cpu_pct,
        machine_cpu=machine_cpu,
        notes=notes,
    )


async def run_livekit(
    server: LiveServer,
    model: ModelDefinition,
    sampler: CpuSampler,
    args: argparse.Namespace,
    index: int,
    pictures: Path,
    python: Path,
) -> Run:
    """bench/livekit_client.py in the decart 0.2.4 environment; its JSON lines back."""
    log_path = pictures.parent / f"livekit-client-{index}.log"
    with open(log_path, "w") as log:  # noqa: ASYNC230 (a local file, opened once a run)
        process = await asyncio.create_subprocess_exec(
            *(str(python), str(CLIENT)),
            *("--realtime-url", server.ws_url, "--api-key", server.api_key),
            *("--model", model.name, "--width", str(model.width), "--height", str(model.height)),
            *("--fps", str(model.fps), "--frames", str(pictures), "--prompt", PROMPT),
            *("--seconds", str(args.seconds), "--warmup", str(args.warmup)),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        events: list[dict[str, Any]] = []
        try:
            assert process.stdout is not None
            async with asyncio.timeout(args.seconds + args.warmup + 90):
                async for line in process.stdout:
                    with contextlib.suppress(ValueError):
                        events.append(json.loads(line))
                await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    by_name = {event["event"]: event for event in events}
    if "done" not in by_name:
        tail = log_path.read_text(errors="replace")[-3000:]
        failed = by_name.get("failed", {})
        raise RuntimeError(
            f"bench/livekit_client.py ended without a result (exit {process.returncode}): "
            f"{failed.get('error')}\n{failed.get('traceback', '')}\nits log (end):\n{tail}"
        )
    done = by_name["done"]
    frames = [(e["at"], e["stamp"], e["ms"]) for e in events if e["event"] == "frame"]
    start, end = done["window"]
    server_cpu, _, machine_cpu = sampler.shares(start, end)
    sizes = sorted({tuple(e["size"]) for e in events if e["event"] == "frame"})
    return Run(
        path="livekit",
        client=LIVEKIT_CLIENT,
        index=index,
        fps_camera=model.fps,
        ttff_ms=by_name["first_frame"]["ms"],
        frames=frames,
        fps=len(frames) / (end - start),
        server_cpu=server_cpu,
        client_cpu=100 * done["cpu_s"] / (end - start),
        machine_cpu=machine_cpu,
        notes={
            "connected_s": by_name["connected"]["seconds"],
            "subscribed_s": done["subscribed_s"],
            "received_sizes": sizes,
            "camera_dropped": done["camera_dropped"],
            "received": done["received"],
            "published_at_first_frame": done["published_at_first_frame"],
            "published": done["published"],
        },
    )


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(runs: list[Run], model: ModelDefinition, args: argparse.Namespace) -> None:
    print("\n==== bench/livekit_latency.py ====")
    print(
        f"model {model.name} {model.width}x{model.height}@{model.fps}; engine passthrough; "
        f"{args.runs} run(s) of each path, {args.seconds:g} s after {args.warmup:g} s warm-up; "
        f"latency ms; CPU % of one core over the window"
    )
    print(HEADER)
    for run in runs:
        print(run.line())
    direct_runs = [run for run in runs if run.path == "direct"]
    livekit_runs = [run for run in runs if run.path == "livekit"]
    p50s, ttffs = [], []
    for d, k in zip(direct_runs, livekit_runs, strict=True):
        p50s.append(_ratio(k.percentile(50), d.percentile(50)))
        ttffs.append(_ratio(k.ttff_ms, d.ttff_ms))
        print(f"livekit/direct, run {d.index}: p50 {p50s[-1]:.2f}  ttff {ttffs[-1]:.2f}")
    if len(p50s) > 1:
        print(
            f"livekit/direct, median of {len(p50s)} runs: p50 {statistics.median(p50s):.2f}  "
            f"ttff {statistics.median(ttffs):.2f}"
        )
    print("what WebRTC reports:")
    for run in runs:
        print(f"  {run.path} run {run.index}: {json.dumps(run.notes)}")


async def _main(args: argparse.Namespace) -> list[Run]:
    model = model_definition(args.model)
    print(f"building or finding the decart {decart_venv.VERSION} environment ...", flush=True)
    python = decart_venv.python()
    runs: list[Run] = []
    with (
        tempfile.TemporaryDirectory(prefix="livemorph-bench-livekit-") as scratch,
        serve(
            Path(scratch) / "server", "--engine", "passthrough", "--log-level", "warning"
        ) as server,
    ):
        pictures = Path(scratch) / "pictures.npy"
        np.save(pictures, np.stack(latency.prerender(model.width, model.height)))
        sampler = CpuSampler(server.process.pid)
        sampler.start()
        try:
            for index in range(1, args.runs + 1):
                for path in ("direct", "livekit"):
                    if path == "direct":
                        run = await run_direct(server, model, sampler, args, index)
                    else:
                        run = await run_livekit(
                            server, model, sampler, args, index, pictures, python
                        )
                    print(run.line(), flush=True)
                    runs.append(run)
                    left = await asyncio.to_thread(server.wait_sessions, 0)
                    if left:
                        raise RuntimeError(f"{left} session(s) still open after the {path} run")
        finally:
            sampler.stop()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="mirage_v2")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured, per run")
    parser.add_argument("--runs", type=int, default=2, help="runs of each path, alternating")
    parser.add_argument(
        "--warmup", type=float, default=1.0, help="seconds left out after the first frame"
    )
    parser.add_argument("--json", type=Path, help="also write each run's figures here")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        runs = asyncio.run(_main(args))
    except decart_venv.Unavailable as error:
        sys.exit(f"the decart {decart_venv.VERSION} environment cannot be built here: {error}")
    report(runs, model_definition(args.model), args)
    print(f"({time.monotonic() - started:.0f} s in all)")
    if args.json:
        rows = [
            {
                "path": run.path,
                "client": run.client,
                "run": run.index,
                "ttff_ms": run.ttff_ms,
                "p50_ms": run.percentile(50),
                "p95_ms": run.percentile(95),
                "p99_ms": run.percentile(99),
                "fps": run.fps,
                "frames": run.readable,
                "lost": run.lost,
                "stale": run.stale,
                "server_cpu_pct": run.server_cpu,
                "client_cpu_pct": run.client_cpu,
                "machine_cpu_pct": run.machine_cpu,
                "notes": run.notes,
            }
            for run in runs
        ]
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
