"""Admission by capacity, in figures: clients join a node one after another; how many are
admitted, and the frame rate each admitted one gets once all have tried.

    python bench/capacity.py                                 # --capacity off, then auto
    python bench/capacity.py --server-cores 0 --clients 3 --capacity auto mirage=1

The server (`livemorph serve`, the model's own engine unless `--engine`) runs pinned to
`--server-cores` (`taskset`), so it is a node of that many cores, and this process, the
clients, is pinned to the machine's other cores: the clients' encoders and decoders do not
take the node's CPU. Client i connects `--stagger` seconds after client i-1 with a camera
at the model's size and rate (a moving picture with noise, so the encoder works as it does
on a real camera), without retrying a refusal; once all have tried, each admitted one
counts its output frames for `--seconds`. Prints per run: admitted and refused, each
admitted client's fps, the server's CPU, the model's measured cost and the sessions it
allows (`/metrics`), and the capacity lines of its log.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import httpx
import numpy as np
from aiortc.mediastreams import MediaStreamTrack
from av import VideoFrame

from livemorph import LivemorphError, RetryPolicy, create_client
from livemorph.models import CATALOG
from livemorph.testing import LiveServer, free_port, run_cli, stop_server

VIDEO_TIME_BASE = Fraction(1, 90000)


class Camera(MediaStreamTrack):
    """A picture panning with fresh noise, paced at `fps`."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float, count: int = 50) -> None:
        super().__init__()
        rng = np.random.default_rng(7)
        y, x = np.mgrid[0:height, 0 : width * 2]
        scene = (np.sin(x / 23.0) * 60 + np.cos(y / 17.0) * 60 + 128).astype(np.float32)
        scene = np.stack([scene, np.roll(scene, 40, 1), np.roll(scene, 80, 0)], -1)
        self._frames = []
        for index in range(count):
            crop = (
                scene[:, index * 8 : index * 8 + width]
                + rng.standard_normal((height, width, 3), np.float32) * 4
            )
            rgb = np.clip(crop, 0, 255).astype(np.uint8)
            self._frames.append(
                VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                .reformat(format="yuv420p")
                .to_ndarray()
            )
        self.fps = fps
        self._start: float | None = None
        self._slot = -1

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        slot = max(self._slot + 1, int((now - self._start) * self.fps))
        due = self._start + slot / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        self._slot = slot
        frame = VideoFrame.from_ndarray(self._frames[slot % len(self._frames)], format="yuv420p")
        frame.pts, frame.time_base = round(slot * 90000 / self.fps), VIDEO_TIME_BASE
        return frame


class Counter:
    """Drains a track, counting its frames."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.count = 0
        self._task = asyncio.create_task(self._drain(track))

    async def _drain(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(Exception):
            while True:
                await track.recv()
                self.count += 1

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@contextlib.contextmanager
def pinned_server(data_dir: Path, cores: str, flags: list[str]) -> Iterator[LiveServer]:
    output = run_cli("keys", "create", "--data-dir", str(data_dir), "--name", "bench")
    api_key = output.strip().splitlines()[-1]
    port = free_port()
    command = [sys.executable, "-m", "livemorph.cli", "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir), *flags]
    with open(data_dir / "server.log", "a") as log:
        process = subprocess.Popen(
            ["taskset", "-c", cores, *command], stdout=log, stderr=subprocess.STDOUT, text=True
        )
    server = LiveServer(
        f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", api_key, data_dir, process
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        yield server
    finally:
        stop_server(server)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(server: LiveServer, args: argparse.Namespace) -> None:
    spec = CATALOG[args.model]
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        admitted: list[tuple[int, object, Counter]] = []
        refused: list[tuple[int, str]] = []
        for index in range(args.clients):
            if index:
                await asyncio.sleep(args.stagger)
            try:
                rt = await client.realtime.connect(
                    Camera(spec.width, spec.height, spec.fps),
                    model=args.model,
                    retry=RetryPolicy(attempts=1),
                )
            except LivemorphError as exc:
                refused.append((index, exc.message))
                continue
            admitted.append((index, rt, Counter(rt.video_track)))
        await asyncio.sleep(2.0)  # the last one's first frames
        counts = [counter.count for _, _, counter in admitted]
        cpu, started = cpu_seconds(server.process.pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        elapsed = time.monotonic() - started
        server_cpu = (cpu_seconds(server.process.pid) - cpu) / elapsed
        rates = [
            (counter.count - before) / elapsed
            for (_, _, counter), before in zip(admitted, counts, strict=True)
        ]
        estimates = [
            line
            for line in (
                await asyncio.to_thread(httpx.get, f"{server.base_url}/metrics")
            ).text.splitlines()
            if line.startswith(("livemorph_capacity_cost_cores{", "livemorph_capacity_sessions{"))
            and f'model="{args.model}"' in line
        ]
        for _, rt, counter in admitted:
            await counter.close()
            await rt.disconnect()  # type: ignore[attr-defined]
    print(
        f"    {len(admitted)} admitted, {len(refused)} refused"
        + (f" ({refused[0][1]})" if refused else ""),
        flush=True,
    )
    for (index, _, _), rate in zip(admitted, rates, strict=True):
        print(f"      client {index}: {rate:5.1f} fps of {spec.fps}", flush=True)
    print(f"      server CPU {server_cpu:.2f} cores over the last {elapsed:.0f} s", flush=True)
    for line in estimates:
        print(f"      {line}", flush=True)
    for line in server.log.splitlines():
        if "at capacity for" in line:
            print("      " + line.split(": ", 1)[-1][:140], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mirage", choices=sorted(CATALOG))
    parser.add_argument("--engine", default=None, help="force an engine (default: the model's)")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--stagger", type=float, default=8.0, help="seconds between joins")
    parser.add_argument("--seconds", type=float, default=10.0, help="the measured window")
    parser.add_argument("--server-cores", default="0", help="taskset's list, e.g. 0 or 0-1")
    parser.add_argument("--capacity", nargs="+", default=["off", "auto"])
    args = parser.parse_args()
    server_cores = {
        core
        for part in args.server_cores.split(",")
        for core in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)
    }
    others = os.sched_getaffinity(0) - server_cores
    if others:
        os.sched_setaffinity(0, others)
    print(
        f"## {args.clients} {args.model} clients, {args.stagger:g} s apart, into a node on "
        f"core(s) {args.server_cores}; the clients on {sorted(others) or 'the same'}",
        flush=True,
    )
    for capacity in args.capacity:
        flags = ["--capacity", capacity] + (["--engine", args.engine] if args.engine else [])
        print(f"  --capacity {capacity}", flush=True)
        with (
            tempfile.TemporaryDirectory() as folder,
            pinned_server(Path(folder), args.server_cores, flags) as server,
        ):
            asyncio.run(run(server, args))


if __name__ == "__main__":
    main()
