"""A cluster under churn: do its nodes give back the memory and file descriptors they took?

    python bench/soak.py                      # 3 nodes, 20 minutes of churn
    python bench/soak.py --nodes 2 --minutes 2 --every 5

Starts redis-server, PostgreSQL (or one shared SQLite file) and `--nodes` cluster members
as bench/cluster.py does (`--max-sessions` each, 1 by default, so sessions are placed on
other nodes and relayed). Then:

1. warm-up: one session and one viewer come and go through each node, then `--warmup` s
   of the churn below, then everyone leaves and `--settle` s of quiet: what a node
   allocates once (codecs, threads, connection pools, the allocator's arenas) is taken
   before the baseline, so what grows after it is what the load leaves behind;
2. baseline: each node's RSS (/proc/PID/status VmRSS) and open file descriptors
   (/proc/PID/fd), the median of a few samples;
3. load for `--minutes`: every `--tick` s (on average) a random step, through a random
   node: a session joins (a camera at the model's size, at `--fps`) or leaves, a viewer
   of a random session joins (through a node that may not hold it: relayed) or leaves;
   at most `--sessions` sessions (by default what the nodes hold: a session past that is
   refused, and counted) and `--viewers` viewers;
4. everyone leaves, the cluster settles to no session, `--settle` s of quiet, and the
   final figures (the median of a few samples).

Every `--every` s a line per sample: each node's RSS (MiB), descriptors and sessions held,
and the clients under way. At the end, each node's baseline, peak and final value, and
whether the final one came back to within the tolerance of the baseline (`--rss-tolerance`
MiB, `--fd-tolerance` descriptors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import QUICK, Cluster, backing, cluster_nodes
from latency import StampedSource
from livemorph import LivemorphError, RetryPolicy, create_client, models
from viewers import Counter

MODEL = "mirage"
ONCE = RetryPolicy(attempts=1)


def rss_mib(pid: int) -> float:
    """Resident memory of `pid`, MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Sample:
    at: float
    rss: dict[str, float]
    fds: dict[str, int]
    sessions: dict[str, int]


@dataclass
class Publisher:
    rt: Any
    source: StampedSource
    counter: Counter
    via: str
    viewers: list[tuple[Any, Counter]] = field(default_factory=list)


class Soak:
    def __init__(self, cluster: Cluster, args: argparse.Namespace) -> None:
        self.cluster = cluster
        self.args = args
        self.random = random.Random(args.seed)
        self.spec = models.realtime(MODEL)
        self.clients = {
            name: create_client(api_key=node.api_key, base_url=node.base_url)
            for name, node in zip(cluster.names, cluster.nodes, strict=True)
        }
        self.publishers: list[Publisher] = []
        self.samples: list[Sample] = []
        self.counts = {"sessions": 0, "refused": 0, "viewers": 0, "failed": 0}
        self.started = time.monotonic()

    # -- figures -------------------------------------------------------------------------

    def sample(self) -> Sample:
        nodes = zip(self.cluster.names, self.cluster.nodes, strict=True)
        pids = {name: node.process.pid for name, node in nodes}
        try:
            held = self.cluster.sessions_by_node()
        except Exception:  # a sample without the cluster's view is still a sample
            held = {}
        sample = Sample(
            time.monotonic() - self.started,
            {name: rss_mib(pid) for name, pid in pids.items()},
            {name: open_fds(pid) for name, pid in pids.items()},
            held,
        )
        self.samples.append(sample)
        return sample

    def print_sample(self, phase: str, sample: Sample) -> None:
        nodes = "  ".join(
            f"{sample.rss[name]:11.1f} {sample.fds[name]:4d} {sample.sessions.get(name, 0):2d}"
            for name in self.cluster.names
        )
        viewers = sum(len(p.viewers) for p in self.publishers)
        print(
            f"{sample.at:7.0f} {phase:<8} {nodes}  {len(self.publishers):3d} {viewers:3d} "
            f"{rss_mib(os.getpid()):7.1f}",
            flush=True,
        )

    def header(self) -> str:
        nodes = "  ".join(f"{name + ' MiB':>11} {'fds':>4} {'s':>2}" for name in self.cluster.names)
        return f"{'t (s)':>7} {'phase':<8} {nodes}  {'pub':>3} {'vw':>3} {'us MiB':>7}"

    async def sample_for(self, phase: str, seconds: float) -> list[Sample]:
        taken = []
        deadline = time.monotonic() + seconds
        while True:
            taken.append(await asyncio.to_thread(self.sample))
            self.print_sample(phase, taken[-1])
            if time.monotonic() + self.args.every > deadline:
                return taken
            await asyncio.sleep(self.args.every)

    # -- clients -------------------------------------------------------------------------

    async def add_session(self, via: str, retry: RetryPolicy = ONCE) -> bool:
        source = StampedSource(self.spec.width, self.spec.height, self.args.fps)
        try:
            rt = await self.clients[via].realtime.connect(source, model=self.spec, retry=retry)
        except LivemorphError as exc:
            source.stop()
            self.counts["refused" if "capacity" in str(exc) else "failed"] += 1
            return False
        assert rt.video_track is not None
        self.publishers.append(Publisher(rt, source, Counter(rt.video_track), via))
        self.counts["sessions"] += 1
        return True

    async def remove_session(self, publisher: Publisher) -> None:
        self.publishers.remove(publisher)
        while publisher.viewers:
            await self._close_viewer(publisher)
        await publisher.counter.close()
        await publisher.rt.disconnect()
        publisher.source.stop()

    async def add_viewer(self, publisher: Publisher, via: str) -> None:
        try:
            viewer = await self.clients[via].realtime.subscribe(
                publisher.rt.subscribe_token, retry=ONCE
            )
        except LivemorphError:
            self.counts["failed"] += 1
            return
        assert viewer.video_track is not None
        publisher.viewers.append((viewer, Counter(viewer.video_track)))
        self.counts["viewers"] += 1

    async def _close_viewer(self, publisher: Publisher) -> None:
        viewer, counter = publisher.viewers.pop(self.random.randrange(len(publisher.viewers)))
        await counter.close()
        await viewer.disconnect()

    async def step(self) -> None:
        """One random join or leave, through a random node."""
        via = self.random.choice(self.cluster.names)
        viewers = sum(len(p.viewers) for p in self.publishers)
        choices = []
        if len(self.publishers) < self.args.sessions:
            choices += ["session+"] * 3
        if self.publishers:
            choices += ["session-"] * 2
            if viewers < self.args.viewers:
                choices += ["viewer+"] * 3
        if viewers:
            choices += ["viewer-"] * 2
        if not choices:
            return
        action = self.random.choice(choices)
        if action == "session+":
            await self.add_session(via)
        elif action == "session-":
            await self.remove_session(self.random.choice(self.publishers))
        elif action == "viewer+":
            await self.add_viewer(self.random.choice(self.publishers), via)
        else:
            watched = [p for p in self.publishers if p.viewers]
            await self._close_viewer(self.random.choice(watched))

    async def churn(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                await self.step()
            except Exception as exc:  # one failed step is counted, the soak goes on
                self.counts["failed"] += 1
                print(f"  a step failed: {exc!r}", flush=True)
            await asyncio.sleep(self.random.expovariate(1 / self.args.tick))

    async def leave_all(self) -> None:
        while self.publishers:
            await self.remove_session(self.publishers[-1])

    async def warm_up(self) -> None:
        """A session and a viewer through each node, then `--warmup` s of the same churn
        as the load; then everyone leaves."""
        for name in self.cluster.names:
            if await self.add_session(name, retry=QUICK):
                publisher = self.publishers[-1]
                await self.add_viewer(publisher, self.random.choice(self.cluster.names))
                await asyncio.sleep(2)
                await self.remove_session(publisher)
            await self.cluster.settle()
        await self.churn(self.args.warmup)
        await self.leave_all()
        await self.cluster.settle(within=30)
        self.counts = dict.fromkeys(self.counts, 0)

    async def close(self) -> None:
        await self.leave_all()
        for client in self.clients.values():
            await client.aclose()

    # -- the run -------------------------------------------------------------------------

    async def run(self) -> bool:
        args = self.args
        print(self.header(), flush=True)
        self.print_sample("start", await asyncio.to_thread(self.sample))
        await self.warm_up()
        self.print_sample("warmed", await asyncio.to_thread(self.sample))
        await asyncio.sleep(args.settle)
        baseline = await self.sample_for("baseline", 3 * args.every)
        load_task = asyncio.create_task(self.churn(args.minutes * 60))
        try:
            while not load_task.done():
                self.print_sample("load", await asyncio.to_thread(self.sample))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(load_task), args.every)
            await load_task
        finally:
            load_task.cancel()
            await asyncio.gather(load_task, return_exceptions=True)
            await self.leave_all()
        await self.cluster.settle(within=30)
        self.print_sample("left", await asyncio.to_thread(self.sample))
        await asyncio.sleep(args.settle)
        final = await self.sample_for("final", 3 * args.every)
        return self.report(baseline, final)

    def report(self, baseline: list[Sample], final: list[Sample]) -> bool:
        args = self.args
        counts = ", ".join(f"{value} {name}" for name, value in self.counts.items())
        nodes = len(self.cluster.names)
        print(f"\n==== bench/soak.py: {args.minutes:g} min of churn on {nodes} nodes ====")
        print(f"clients under load: {counts}")
        print(
            f"{'node':<8} {'what':<8} {'baseline':>9} {'peak':>9} {'final':>9} {'change':>9}  "
            f"back to baseline (within {args.rss_tolerance:g} MiB / {args.fd_tolerance} fds)"
        )
        ok = True
        for name in self.cluster.names:
            for what, get, tolerance, unit in (
                ("RSS MiB", lambda s, n=name: s.rss[n], args.rss_tolerance, "{:9.1f}"),
                ("fds", lambda s, n=name: s.fds[n], args.fd_tolerance, "{:9.0f}"),
            ):
                base = statistics.median(get(s) for s in baseline)
                peak = max(get(s) for s in self.samples)
                last = statistics.median(get(s) for s in final)
                back = last - base <= tolerance
                ok &= back
                figures = " ".join(unit.format(v) for v in (base, peak, last))
                print(
                    f"{name:<8} {what:<8} {figures} {last - base:+9.1f}  {'yes' if back else 'NO'}"
                )
        return ok


async def main(args: argparse.Namespace, workdir: Path) -> bool:
    names = [f"node{index}" for index in range(args.nodes)]
    if args.sessions is None:
        args.sessions = args.nodes * args.max_sessions + 1  # one more: refusals happen too
    with (
        backing(workdir, args.database) as shared,
        cluster_nodes(
            workdir,
            shared,
            names,
            args.engine,
            max_sessions=args.max_sessions,
            env=dict(item.split("=", 1) for item in args.node_env),
        ) as cl,
    ):
        print(
            f"database: {shared.label}; {args.nodes} nodes, --max-sessions {args.max_sessions}, "
            f"engine {args.engine}, {MODEL} at {args.fps:g} fps; up to {args.sessions} sessions "
            f"and {args.viewers} viewers; a step every {args.tick:g} s on average; "
            f"{args.warmup:g} s of warm-up churn"
            + (f"; nodes' environment: {' '.join(args.node_env)}" if args.node_env else ""),
            flush=True,
        )
        soak = Soak(cl, args)
        try:
            return await soak.run()
        finally:
            await soak.close()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--minutes", type=float, default=20.0, help="of churn")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--tick", type=float, default=3.0, help="mean seconds between steps")
    parser.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of churn before the baseline"
    )
    parser.add_argument(
        "--node-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the nodes (e.g. MALLOC_ARENA_MAX=2), repeatable",
    )
    parser.add_argument("--settle", type=float, default=10.0, help="quiet seconds before figures")
    parser.add_argument("--max-sessions", type=int, default=1, help="per node")
    parser.add_argument("--sessions", type=int, help="at most at once (default: nodes' room + 1)")
    parser.add_argument("--viewers", type=int, default=4, help="at most at once")
    parser.add_argument("--fps", type=float, default=10.0, help="the cameras' frame rate")
    parser.add_argument("--engine", choices=("passthrough", "grade"), default="passthrough")
    parser.add_argument("--database", choices=("auto", "postgres", "sqlite"), default="auto")
    parser.add_argument("--rss-tolerance", type=float, default=30.0, help="MiB")
    parser.add_argument("--fd-tolerance", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="livemorph-soak-") as workdir:
        ok = asyncio.run(main(args, Path(workdir)))
    print("all nodes back to baseline" if ok else "some node did NOT come back to baseline")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    cli()
