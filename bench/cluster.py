"""Several nodes as one service, in figures: what relaying costs a session and its viewers.

    python bench/cluster.py                                  # 3 nodes, 5 runs, 1/5/20 viewers
    python bench/cluster.py --nodes 2 --runs 3 --viewers 1,5 --seconds 5

Starts redis-server (Debian's package, as the tests do: tests/redis_server.py), a throwaway
PostgreSQL (tests/postgres.py) or, where its binaries are missing, one SQLite file shared by
the nodes (the output says which), and `--nodes` real `livemorph serve` processes on
loopback, each a cluster member with `--max-sessions 1` and `--capacity off` (so where a
session lands depends on the sessions alone, not on what a shared machine leaves a node).

(a) Placement: for a session the entry node serves itself and for one it relays to another
member (the entry node's one place held by a session that never negotiates media), over
`--runs` runs each (interleaved, after one run of each that is not counted), the median
and p90 of
- the time from opening `/v1/stream` to its `session_id` message (a bare WebSocket:
  authentication, admission, and for a relayed one the lookup in Redis and the signed
  node-to-node WebSocket), and
- the time from `client.realtime.connect` to the first output frame (the Python SDK with a
  camera at the model's size and rate: the above, then the offer and answer through the
  relay, ICE and DTLS straight to the serving node, the first keyframe).
Their difference between the two placements is the relay's overhead.

(b) CPU per viewer: a session on one node (`mirage`, so 1280x704 at 25 fps), watched by 0,
then each of `--viewers` viewers that subscribe through the entry node, which does not hold
the session (every viewer's signaling is relayed; its media goes straight to the serving
node). Each count is held `--warmup` s, then measured for `--seconds`: the serving node's
CPU (% of one core, /proc) and its increase per viewer over no viewer, per output frame,
the slowest viewer's and the publisher's fps, the machine's CPU, and the entry node's CPU
(its relays). Once with the shared encoder (one VP8 encode per output frame for all
senders, media/shared_encoder.py) and once per sender (`LIVEMORPH_SHARED_ENCODER=0`), on
fresh nodes. The viewers decode in this process: on a small machine they compete with the
nodes, so read the fps beside the CPU (bench/viewers.py measures the same on one node).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import websockets

from cpu import CpuSampler
from latency import StampedSource
from viewers import HEADER, MODES, Counter, Row

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's tests package

from tests.postgres import find_bin_dir, postgres_server
from tests.redis_server import RedisServer, redis_server

from livemorph import RetryPolicy, create_client, models
from livemorph.media.shared_encoder import ENV as SHARED_ENCODER_ENV
from livemorph.protocol import decode_subscribe_token
from livemorph.testing import LiveServer, start_server, stop_server

MODEL = "mirage"
SECRET = "bench-cluster-secret"
ADMIN = "bench-cluster-admin"
QUICK = RetryPolicy(attempts=8, base_delay=0.5, max_delay=2.0)


# -- the cluster: redis, the database, the nodes (bench/soak.py uses these too) -----------


@dataclass
class Backing:
    """What the nodes share: Redis, and the database (`label` says which)."""

    redis: RedisServer
    database_url: str
    label: str


@contextlib.contextmanager
def backing(workdir: Path, database: str = "auto") -> Iterator[Backing]:
    """redis-server, and PostgreSQL (`database` postgres, or auto where its binaries are
    here) or one SQLite file in `workdir` that every node opens."""
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is missing: run scripts/install-system-deps.sh")
    with redis_server() as redis, contextlib.ExitStack() as stack:
        bin_dir = find_bin_dir()
        have_postgres = bin_dir is not None and (bin_dir / "pg_ctl").exists()
        if database == "postgres" and not have_postgres:
            raise SystemExit("PostgreSQL's binaries (initdb, pg_ctl) are missing")
        url = label = None
        if database != "sqlite" and have_postgres:
            try:
                postgres = stack.enter_context(postgres_server())
                url, label = postgres.new_database(), "PostgreSQL (throwaway server)"
            except (RuntimeError, OSError) as exc:
                if database == "postgres":
                    raise
                print(f"PostgreSQL did not start ({exc}); using SQLite", flush=True)
        if url is None:
            url = f"sqlite:///{workdir / 'shared.db'}"
            label = "SQLite, one file shared by the nodes (no PostgreSQL here)"
        yield Backing(redis, url, label or "")


@dataclass
class Cluster:
    backing: Backing
    nodes: list[LiveServer]
    names: list[str] = field(default_factory=list)

    @staticmethod
    def port(node: LiveServer) -> int:
        return int(node.base_url.rsplit(":", 1)[1])

    def name_at(self, port: int) -> str:
        for name, node in zip(self.names, self.nodes, strict=True):
            if self.port(node) == port:
                return name
        return f"port {port}"

    def report(self, via: LiveServer | None = None) -> dict[str, Any]:
        node = via or self.nodes[0]
        response = httpx.get(
            f"{node.base_url}/v1/cluster", headers={"X-ADMIN-KEY": ADMIN}, timeout=5
        )
        response.raise_for_status()
        return dict(response.json())

    def sessions_by_node(self) -> dict[str, int]:
        return {node["name"]: len(node["sessions"]) for node in self.report()["nodes"]}

    async def settle(self, expected: dict[str, int] | None = None, within: float = 15.0) -> None:
        """Until Redis says each node holds `expected` sessions (none: zero everywhere)."""
        want = {name: (expected or {}).get(name, 0) for name in self.names}
        deadline = time.monotonic() + within
        while (seen := await asyncio.to_thread(self.sessions_by_node)) != want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not settle: {seen}, wanted {want}")
            await asyncio.sleep(0.1)


def node_flags(
    redis_url: str, name: str, engine: str, *extra: str, max_sessions: int = 1
) -> tuple[str, ...]:
    return (
        "--redis-url",
        redis_url,
        "--node-name",
        name,
        "--max-sessions",
        str(max_sessions),
        "--capacity",
        "off",
        "--engine",
        engine,
        "--admin-key",
        ADMIN,
        "--log-level",
        "info",
        *extra,
    )


@contextlib.contextmanager
def cluster_nodes(
    workdir: Path,
    backing: Backing,
    names: list[str],
    engine: str,
    *extra: str,
    env: dict[str, str] | None = None,
    max_sessions: int = 1,
) -> Iterator[Cluster]:
    """`livemorph serve` per name, members of one cluster, started together; yields once
    every one of them is listed by the others."""
    node_env = {
        "LIVEMORPH_DATABASE_URL": backing.database_url,
        "LIVEMORPH_CLUSTER_SECRET": SECRET,
        **(env or {}),
    }

    def start(name: str) -> LiveServer:
        flags = node_flags(backing.redis.url, name, engine, *extra, max_sessions=max_sessions)
        return start_server(workdir / name, *flags, env=node_env)

    nodes: list[LiveServer] = []
    failure: BaseException | None = None
    # The first alone: it makes the database's tables, which two at once may race to do.
    with ThreadPoolExecutor(max(1, len(names) - 1)) as pool:
        for batch in (names[:1], names[1:]):
            for future in [pool.submit(start, name) for name in batch]:
                try:
                    nodes.append(future.result())
                except Exception as exc:  # stop the ones that did start
                    failure = exc
            if failure is not None:
                break
    try:
        if failure is not None:
            raise failure
        cluster = Cluster(backing, nodes, list(names))
        deadline = time.monotonic() + 20
        while len(cluster.report()["nodes"]) != len(names):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not find each other: {cluster.report()}")
            time.sleep(0.1)
        yield cluster
    finally:
        with ThreadPoolExecutor(max(1, len(nodes))) as pool:
            list(pool.map(stop_server, nodes))


# -- (a) placement ----------------------------------------------------------------------


async def time_to_session_id(node: LiveServer, api_key: str) -> tuple[float, int]:
    """Seconds from opening `/v1/stream` on `node` to its `session_id`, and the port of
    the node that sent it; the session ends as the socket closes."""
    started = time.perf_counter()
    async with websockets.connect(f"{node.ws_url}/v1/stream?api_key={api_key}&model={MODEL}") as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 20))
        took = time.perf_counter() - started
    if message.get("type") != "session_id":
        raise RuntimeError(f"no session: {message}")
    return took, int(message["server_port"])


async def time_to_first_frame(node: LiveServer, api_key: str) -> tuple[float, int]:
    """Seconds from `connect` through `node` to the first output frame; the serving port."""
    spec = models.realtime(MODEL)
    source = StampedSource(spec.width, spec.height, spec.fps)
    async with create_client(api_key=api_key, base_url=node.base_url) as client:
        started = time.perf_counter()
        rt = await client.realtime.connect(source, model=spec, retry=QUICK)
        try:
            assert rt.video_track is not None
            await asyncio.wait_for(rt.video_track.recv(), 30)
            took = time.perf_counter() - started
            port = decode_subscribe_token(rt.subscribe_token or "").port
        finally:
            await rt.disconnect()
            source.stop()
    return took, port


@contextlib.asynccontextmanager
async def place_holder(node: LiveServer) -> AsyncIterator[None]:
    """A session on `node` that never negotiates media: it takes the node's one place."""
    async with websockets.connect(
        f"{node.ws_url}/v1/stream?api_key={node.api_key}&model={MODEL}"
    ) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if message.get("type") != "session_id":
            raise RuntimeError(f"the place holder got no session: {message}")
        if message["server_port"] != Cluster.port(node):
            raise RuntimeError(f"the place holder was placed elsewhere: {message}")
        yield


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered) + 0.5) - 1))]


def _figures(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):8.1f} {_p90(ms):8.1f} {min(ms):8.1f} {max(ms):8.1f}"


async def placement(cluster: Cluster, runs: int) -> dict[str, dict[str, list[float]]]:
    entry = cluster.nodes[0]
    entry_port = cluster.port(entry)
    results: dict[str, dict[str, list[float]]] = {
        "served by the entry node": {"session_id": [], "first frame": []},
        "relayed to another node": {"session_id": [], "first frame": []},
    }
    landed: dict[str, set[str]] = {label: set() for label in results}

    async def one_run(label: str, holder: str | None) -> None:
        expect = {holder: 1} if holder else None
        for what, measure in (
            ("session_id", time_to_session_id),
            ("first frame", time_to_first_frame),
        ):
            await cluster.settle(expect)
            took, port = await measure(entry, entry.api_key)
            relayed = port != entry_port
            if relayed != (holder is not None):
                raise RuntimeError(f"{label}: the session landed on {cluster.name_at(port)}")
            results[label][what].append(took)
            landed[label].add(cluster.name_at(port))

    for run in range(-1, runs):  # interleaved, so a busy spell of the machine hits both
        await one_run("served by the entry node", None)
        # A client's disconnect returns before its node has ended the session: until it
        # has, the entry node is full and the holder would itself be relayed.
        await cluster.settle()
        async with place_holder(entry):
            await one_run("relayed to another node", cluster.names[0])
        if run < 0:  # the nodes' first sessions (codecs, imports, connections): not counted
            for measured in results.values():
                for values in measured.values():
                    values.clear()
            print("  warm-up run done", flush=True)
        else:
            print(f"  placement run {run + 1}/{runs} done", flush=True)
    await cluster.settle()
    for label, names in landed.items():
        print(f"  {label}: served by {', '.join(sorted(names))}")
    return results


def print_placement(results: dict[str, dict[str, list[float]]], runs: int) -> None:
    print(f"\n(a) placement through the entry node, {runs} runs each (ms)")
    print(f"{'measure':<13} {'placement':<26} {'median':>8} {'p90':>8} {'min':>8} {'max':>8}")
    for what in ("session_id", "first frame"):
        for label, measured in results.items():
            print(f"{what:<13} {label:<26} {_figures(measured[what])}")
    print("relay overhead (relayed - served by the entry node, medians):")
    local, relayed = results.values()
    for what in ("session_id", "first frame"):
        extra = statistics.median(relayed[what]) - statistics.median(local[what])
        print(f"  {what:<12} {extra * 1000:+8.1f} ms")


# -- (b) CPU per viewer -----------------------------------------------------------------


@dataclass
class ViewerRow:
    row: Row
    entry_pct: float

    def line(self, baseline: ViewerRow | None) -> str:
        return f"{self.row.line(baseline.row if baseline else None)} {self.entry_pct:8.1f}%"


VIEWER_HEADER = f"{HEADER} {'entry':>9}"


async def viewers_mode(
    cluster: Cluster, mode: str, counts: list[int], warmup: float, seconds: float
) -> list[ViewerRow]:
    entry, serving = cluster.nodes[0], cluster.nodes[1]
    spec = models.realtime(MODEL)
    on_serving = CpuSampler(serving.process.pid)
    on_entry = CpuSampler(entry.process.pid)
    on_serving.start()
    on_entry.start()
    rows: list[ViewerRow] = []
    source = StampedSource(spec.width, spec.height, spec.fps)
    async with (
        create_client(api_key=serving.api_key, base_url=serving.base_url) as publisher_client,
        create_client(api_key=entry.api_key, base_url=entry.base_url) as viewer_client,
    ):
        rt = await publisher_client.realtime.connect(source, model=spec, retry=QUICK)
        assert rt.video_track is not None
        assert decode_subscribe_token(rt.subscribe_token or "").port == cluster.port(serving)
        publisher = Counter(rt.video_track)
        watching: list[tuple[Any, Counter]] = []
        try:
            for count in [0, *sorted(counts)]:
                while len(watching) < count:
                    viewer = await viewer_client.realtime.subscribe(
                        rt.subscribe_token or "", retry=QUICK
                    )
                    assert viewer.video_track is not None
                    watching.append((viewer, Counter(viewer.video_track)))
                await asyncio.sleep(warmup)
                start, before = time.monotonic(), [c.frames for _, c in watching]
                published = publisher.frames
                await asyncio.sleep(seconds)
                end = time.monotonic()
                server_pct, _, machine_pct = on_serving.shares(start, end)
                entry_pct = on_entry.shares(start, end)[0]
                got = [c.frames - f for (_, c), f in zip(watching, before, strict=True)]
                row = Row(
                    mode,
                    count,
                    server_pct,
                    machine_pct,
                    min(got, default=0) / (end - start),
                    (publisher.frames - published) / (end - start),
                )
                rows.append(ViewerRow(row, entry_pct))
                print(rows[-1].line(rows[0]), flush=True)
        finally:
            for viewer, counter in watching:
                await counter.close()
                await viewer.disconnect()
            await publisher.close()
            await rt.disconnect()
            source.stop()
            on_serving.stop()
            on_entry.stop()
    relayed = entry.log.count("relayed /subscribe/")
    print(f"  {mode}: the entry node relayed {relayed} viewer(s) to the serving node")
    return rows


# -- the whole bench --------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path) -> None:
    names = [f"node{index}" for index in range(args.nodes)]
    with backing(workdir, args.database) as shared:
        print(f"database: {shared.label}; redis-server on port {shared.redis.port}")
        print(f"{args.nodes} nodes, --max-sessions 1, engine {args.engine}, model {MODEL}")
        placed: dict[str, dict[str, list[float]]] | None = None
        if args.runs > 0:
            with cluster_nodes(workdir / "placement", shared, names, args.engine) as cluster:
                print("(a) placement ...", flush=True)
                placed = await placement(cluster, args.runs)
        results: dict[str, list[ViewerRow]] = {}
        if args.viewers:
            print(
                f"(b) CPU per viewer, viewers through {names[0]}, session on {names[1]}: "
                f"{args.warmup:g} s warm-up, {args.seconds:g} s measured per count",
                flush=True,
            )
            print(VIEWER_HEADER, flush=True)
            for mode in args.modes:
                mode_names = [f"{mode}-{name}" for name in names[:2]]
                with cluster_nodes(
                    workdir / mode,
                    shared,
                    mode_names,
                    args.engine,
                    env={SHARED_ENCODER_ENV: MODES[mode]},
                ) as cluster:
                    results[mode] = await viewers_mode(
                        cluster, mode, args.viewers, args.warmup, args.seconds
                    )
    print("\n==== bench/cluster.py ====")
    print(f"database: {shared.label}; {args.nodes} nodes; engine {args.engine}; model {MODEL}")
    if placed is not None:
        print_placement(placed, args.runs)
    if results:
        print(
            "\n(b) CPU per viewer, viewers relayed through a node that does not hold the "
            "session (server = the serving node, % of one core; entry = the relaying node)"
        )
        print(VIEWER_HEADER)
        for rows in results.values():
            for row in rows:
                print(row.line(rows[0]))


def _counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError("viewer counts are positive")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="cluster members (at least 2)")
    parser.add_argument("--runs", type=int, default=5, help="placement runs of each kind")
    parser.add_argument(
        "--viewers", type=_counts, default=[1, 5, 20], help="viewer counts, e.g. 1,5,20"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per count")
    parser.add_argument("--warmup", type=float, default=5.0, help="held before measuring")
    parser.add_argument("--engine", choices=("passthrough", "grade"), default="passthrough")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--database", choices=("auto", "postgres", "sqlite"), default="auto")
    parser.add_argument(
        "--workdir", type=Path, help="keep the nodes' data and logs here (default: a temporary one)"
    )
    args = parser.parse_args()
    if args.nodes < 2:
        parser.error("--nodes: a relay needs at least 2")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run(args, args.workdir.resolve()))
        return
    with tempfile.TemporaryDirectory(prefix="livemorph-cluster-") as workdir:
        asyncio.run(run(args, Path(workdir)))


if __name__ == "__main__":
    main()
