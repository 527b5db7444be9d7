"""Batch jobs on a node, in figures: how fast a real `livemorph serve` gets through them,
and what they cost a realtime session beside them.

    python bench/jobs.py                                  # the default CPU engine
    python bench/jobs.py --engine passthrough --clips 4 --workers 1

The server is `livemorph serve` with the bench's engines known (this script's `serve`, as
bench_server.py): the jobs' model (`--job-model`, `lucy-restyle-2`) runs its own engine, or
`--engine`'s, in the job processes the node starts (SCHED_IDLE, job_process.py); the
session's model, `mirage`, runs the same engine wrapped in `stamped:` (stamp.py), so the
whole frame is still transformed and its latency can be read from the corner (latency.py).

1. Throughput, for each `--workers` N (a fresh server with `--job-workers N`): `--clips`
   clips of the astronaut photo sliding across the frame, with a 440 Hz AAC tone, are
   submitted at once; printed: jobs per minute and seconds of video per second of wall
   time (first submit to last completion), and each job's time from submit to completed
   (p50, p95).
2. Beside a session, on a fresh server with `--job-workers` the first of `--workers`:
   a session at mirage's size and rate (the Python SDK, latency.py's stamped camera)
   alone for `--seconds`, then jobs kept queued (`--job-workers` + 1 unfinished at all
   times), the jobs alone for `--seconds`, then the session again with the jobs running.
   Printed: the session's delivered fps and latency p50/p95 alone and beside the jobs,
   with their ratios; the jobs' seconds of video per second alone and beside the session,
   and that ratio. The jobs' progress is read from `GET /v1/jobs/{id}` (a running job's
   `progress`, which the node writes every 2 s), so a short window is coarse.

Everything (server, jobs, this client's encoder and decoder) shares the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import httpx
import numpy as np
from av import VideoFrame

import bench_server
from livemorph.models import CATALOG
from livemorph.testing import LiveServer, start_server, stop_server

if TYPE_CHECKING:
    import latency

SCRIPT = Path(__file__).resolve()
#: The realtime model of the session beside the jobs.
SESSION_MODEL = "mirage"
PROMPT = "a watercolor painting"
#: Seconds between two looks at the jobs' status.
POLL = 0.25
#: Between two looks while jobs are fed beside a session (each look costs the server CPU).
FEED_POLL = 1.0
CLIP_FPS = 25


def make_clip(path: Path, seconds: float, width: int, height: int) -> bytes:
    """The astronaut sliding 3 pixels a frame at 25 fps, H.264, with a 440 Hz AAC tone."""
    import latency  # not at the top: a job's process (`job-process`) needs no WebRTC

    scene = latency._scene_rgb(width, height)[:height, :width]
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=CLIP_FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream("aac", rate=48_000, layout="mono")
        for index in range(round(seconds * CLIP_FPS)):
            rgb = np.ascontiguousarray(np.roll(scene, 3 * index, axis=1))
            frame = VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        samples = round(seconds * 48_000)
        tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48_000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(tone[None, start : start + 1024]), format="flt", layout="mono"
            )
            chunk.sample_rate, chunk.pts = 48_000, start
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))
    return path.read_bytes()


@dataclass
class Tracked:
    job_id: str
    submitted: float
    done: float | None = None  # when it was first seen completed
    fraction: float = 0.0  # of its video transformed, as last seen
    status: str = "pending"  # as last seen


@dataclass
class Jobs:
    """Submits clips to one server and follows them by polling their status."""

    server: LiveServer
    clip: bytes
    model: str
    http: httpx.AsyncClient
    seconds: float  # of video per clip
    tracked: list[Tracked] = field(default_factory=list)

    async def submit(self) -> Tracked:
        response = await self.http.post(
            f"{self.server.base_url}/v1/jobs/{self.model}",
            headers={"x-api-key": self.server.api_key},
            files={"data": ("clip.mp4", self.clip, "video/mp4")},
            data={"prompt": PROMPT, "enhance_prompt": "false"},
        )
        response.raise_for_status()
        job = Tracked(response.json()["job_id"], time.monotonic())
        self.tracked.append(job)
        return job

    async def poll(self) -> None:
        """Look at every unfinished job once; a failed one raises, with the server's log."""
        for job in list(self.tracked):
            if job.done is not None:
                continue
            response = await self.http.get(
                f"{self.server.base_url}/v1/jobs/{job.job_id}",
                headers={"x-api-key": self.server.api_key},
            )
            body = response.json()
            job.status = body["status"]
            if body["status"] == "failed":
                log = "\n".join(self.server.log.splitlines()[-30:])
                raise RuntimeError(f"job {job.job_id} failed: {body.get('error')}\n{log}")
            if body["status"] == "completed":
                job.done, job.fraction = time.monotonic(), 1.0
            elif body.get("progress") is not None:
                job.fraction = max(job.fraction, float(body["progress"]))

    def in_flight(self) -> int:
        return sum(job.done is None for job in self.tracked)

    def finished(self) -> int:
        return len(self.tracked) - self.in_flight()

    def running(self) -> int:
        """Jobs seen processing at the last look."""
        return sum(job.status == "processing" for job in self.tracked)

    def video_seconds(self) -> float:
        """Seconds of video transformed so far, by the jobs' progress."""
        return self.seconds * sum(job.fraction for job in self.tracked)

    @contextlib.asynccontextmanager
    async def continuously(self, queued: int) -> AsyncIterator[None]:
        """Keep `queued` jobs waiting or running, and their progress looked at, until the
        block ends."""

        async def feed() -> None:
            while True:
                while self.in_flight() < queued:
                    await self.submit()
                await asyncio.sleep(FEED_POLL)
                await self.poll()

        task = asyncio.create_task(feed())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def _flags(args: argparse.Namespace, workers: int, capacity: str | None) -> list[str]:
    engine = args.engine or "neural"
    flags = ["--job-workers", str(workers), "--model-engines", f"{SESSION_MODEL}=stamped:{engine}"]
    flags += ["--engine", args.engine] if args.engine else []
    flags += ["--capacity", capacity] if capacity else []
    return [*flags, "--max-jobs-per-key", "0", "--log-level", "warning"]


@contextlib.contextmanager
def _server(
    args: argparse.Namespace, workers: int, capacity: str | None = None
) -> Iterator[LiveServer]:
    """This script serving (`serve`, below) with `workers` job workers, a key minted."""
    with tempfile.TemporaryDirectory(prefix="livemorph-bench-jobs-") as folder:
        server = start_server(
            Path(folder), *_flags(args, workers, capacity), program=(sys.executable, str(SCRIPT))
        )
        try:
            yield server
        finally:
            stop_server(server)


def serve() -> int:
    """`livemorph serve` as bench_server.py runs it (the `stamped` engine known), its job
    processes this script's `job-process`: they are given the node's `--model-engines`,
    `stamped:` among them, and build its registry, so they must know the engine too (the
    jobs' own model does not use it)."""
    from livemorph.cli import main as cli
    from livemorph.server.job_worker import JobWorker

    bench_server.register()
    init = JobWorker.__init__

    def with_stamped(self: JobWorker, *rest: Any) -> None:
        init(self, *rest)
        self.command = [sys.executable, str(SCRIPT), "job-process"]

    JobWorker.__init__ = with_stamped  # type: ignore[method-assign]
    return cli()


def job_process() -> int:
    """`python -m livemorph.job_process`, with the `stamped` engine known."""
    from livemorph.job_process import main as run_job

    bench_server.register()
    return run_job()


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def throughput(args: argparse.Namespace, clip: bytes, workers: int) -> None:
    with _server(args, workers) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            jobs = Jobs(server, clip, args.job_model, http, args.clip_seconds)
            first = time.monotonic()
            for _ in range(args.clips):
                await jobs.submit()
            deadline = first + args.timeout
            while jobs.in_flight():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{jobs.in_flight()} jobs unfinished after {args.timeout} s")
                await asyncio.sleep(POLL)
                await jobs.poll()
    wall = max(job.done or 0.0 for job in jobs.tracked) - first
    waits = [(job.done or 0.0) - job.submitted for job in jobs.tracked]
    print(
        f"throughput --job-workers {workers}: {args.clips} jobs in {wall:.1f} s  "
        f"jobs/min {60 * args.clips / wall:.2f}  "
        f"video s/s {args.clips * args.clip_seconds / wall:.3f}  "
        f"submit->completed p50 {_percentile(waits, 50):.1f} s  p95 {_percentile(waits, 95):.1f} s",
        flush=True,
    )


async def beside_session(
    args: argparse.Namespace, clip: bytes, workers: int, capacity: str
) -> None:
    import latency

    spec = CATALOG[SESSION_MODEL]
    source = functools.partial(latency.StampedSource, spec.width, spec.height, spec.fps)
    #: (arrival, the jobs' video seconds, jobs running) for each frame of the session
    window: list[tuple[float, float, int]] = []

    def on_frame(arrived: float, stamp: int | None, ms: int | None) -> None:
        window.append((arrived, jobs.video_seconds(), jobs.running()))

    async def session(label: str) -> latency.Result:
        window.clear()
        result = await latency.measure(
            source,
            latency.through_server(server, SESSION_MODEL, True),
            args.seconds,
            args.warmup,
            label=label,
            on_frame=on_frame,
        )
        print(result.line(), flush=True)
        return result

    print(f"-- beside a session: --job-workers {workers} --capacity {capacity}", flush=True)
    with _server(args, workers, capacity) as server:
        async with httpx.AsyncClient(timeout=60) as http:
            jobs = Jobs(server, clip, args.job_model, http, args.clip_seconds)
            alone = await session(f"session alone {SESSION_MODEL}")
            async with jobs.continuously(workers + 1):
                while not any(job.fraction > 0 for job in jobs.tracked):
                    await asyncio.sleep(POLL)  # until the first job is under way
                    await jobs.poll()
                before, started = jobs.video_seconds(), time.monotonic()
                await asyncio.sleep(args.seconds)
                jobs_alone = (jobs.video_seconds() - before) / (time.monotonic() - started)
                print(f"jobs alone (--job-workers {workers}): video s/s {jobs_alone:.3f}")
                shared = await session(f"session + jobs {SESSION_MODEL}")
                (start, before, _), (end, after, _) = window[0], window[-1]
                jobs_shared = (after - before) / (end - start)  # over the session's window
                running = np.mean([count for _, _, count in window])
                print(
                    f"jobs beside the session: video s/s {jobs_shared:.3f}, "
                    f"{running:.2f} running on average",
                    flush=True,
                )
            finished = jobs.finished()

    def ratio(new: float, old: float) -> str:
        return f"{new / old:.2f}" if old else "nan"

    print(
        f"beside jobs (--job-workers {workers} --capacity {capacity}, "
        f"{finished} jobs finished): "
        f"session fps {alone.fps:.1f} -> {shared.fps:.1f} (ratio {ratio(shared.fps, alone.fps)})  "
        f"p50 {alone.p50_ms:.0f} -> {shared.p50_ms:.0f} ms "
        f"(ratio {ratio(shared.p50_ms, alone.p50_ms)})  "
        f"p95 {alone.p95_ms:.0f} -> {shared.p95_ms:.0f} ms  "
        f"jobs video s/s {jobs_alone:.3f} -> {jobs_shared:.3f} "
        f"(ratio {ratio(jobs_shared, jobs_alone)})",
        flush=True,
    )


def _load() -> str:
    """The machine's load average: the jobs run on CPU that anything else leaves."""
    return "load average " + " ".join(f"{load:.1f}" for load in os.getloadavg())


def _size(text: str) -> tuple[int, int]:
    width, height = text.lower().split("x")
    return int(width), int(height)


async def _main(args: argparse.Namespace) -> None:
    width, height = args.clip_size
    with tempfile.TemporaryDirectory(prefix="livemorph-bench-clip-") as folder:
        clip = make_clip(Path(folder) / "clip.mp4", args.clip_seconds, width, height)
    print(
        f"==== bench/jobs.py ====\nengine {args.engine or 'the default (neural)'}; "
        f"job model {args.job_model}; {args.clips} clips of {args.clip_seconds:g} s at "
        f"{width}x{height}@{CLIP_FPS} with AAC ({len(clip) // 1024} KiB); session "
        f"{SESSION_MODEL} for {args.seconds:g} s; {os.cpu_count()} cores, {_load()}",
        flush=True,
    )
    if "throughput" in args.parts:
        for workers in args.workers:
            await throughput(args, clip, workers)
    if "session" in args.parts:
        for capacity in args.capacity:
            await beside_session(args, clip, args.workers[0], capacity)
    print(f"done; {_load()}", flush=True)


def main() -> int | None:
    if sys.argv[1:2] == ["serve"]:
        return serve()
    if sys.argv[1:2] == ["job-process"]:
        del sys.argv[1]
        return job_process()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", default=None, help="force an engine (default: the model's)")
    parser.add_argument("--job-model", default="lucy-restyle-2")
    parser.add_argument("--clips", type=int, default=6, help="jobs in the throughput batch")
    parser.add_argument("--clip-seconds", type=float, default=2.0)
    parser.add_argument("--clip-size", type=_size, default=(320, 176), metavar="WxH")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--job-workers")
    parser.add_argument("--seconds", type=float, default=15.0, help="each measured window")
    parser.add_argument("--warmup", type=float, default=2.0, help="session seconds ignored")
    parser.add_argument(
        "--capacity",
        nargs="+",
        default=["auto", "off"],
        help="the server's --capacity beside the session, one run each (auto: the node "
        "claims no job while a session is below its frame rate or would not fit again)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="for the batch, in s")
    parser.add_argument(
        "--parts", nargs="+", choices=["throughput", "session"], default=["throughput", "session"]
    )
    asyncio.run(_main(parser.parse_args()))
    return None


if __name__ == "__main__":
    sys.exit(main())
