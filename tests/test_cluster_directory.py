"""The cluster's pieces on their own: the directory on a real redis-server, relay
signatures, placement order, and the settings a member needs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import httpx
import pytest

from livemorph.cluster import (
    ClusterUnavailable,
    Directory,
    Node,
    RedisRateLimiter,
    SessionEntry,
    order_for,
)
from livemorph.cluster.relay import sign, verify
from livemorph.config import Settings
from livemorph.engines import EngineRegistry
from livemorph.models import CATALOG, ModelSpec
from livemorph.server.capacity import Capacity
from livemorph.server.cluster import ClusterMember, node_url, settings_problem
from livemorph.server.limits import Limits
from livemorph.sessions import SessionRegistry
from livemorph.storage import Principal
from livemorph.testing import free_port, run_cli
from tests.inprocess import serve_in_process
from tests.redis_server import RedisServer, redis_server


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture
async def directory(redis: RedisServer, request: pytest.FixtureRequest) -> AsyncIterator[Directory]:
    """A directory under its own prefix, so tests sharing the server see nothing of each
    other's."""
    made = Directory.from_url(redis.url, prefix=f"test:{request.node.name}:")
    yield made
    await made.close()


def node(
    name: str, room: dict[str, int | None], load: float = 0.0, *sessions: SessionEntry
) -> Node:
    return Node(name, f"http://127.0.0.1:1/{name}", "127.0.0.1", 1, room, load, "0", 0.0, sessions)


async def test_a_keys_session_limit_holds_against_simultaneous_nodes(
    redis: RedisServer, directory: Directory
) -> None:
    other = Directory.from_url(redis.url, prefix=directory.prefix)  # a second node's client
    try:
        attempts = [
            (directory if index % 2 else other).reserve(
                f"node-{index % 2}", SessionEntry(f"s{index}", "mirage", "key-1"), 3
            )
            for index in range(20)
        ]
        granted = await asyncio.gather(*attempts)
    finally:
        await other.close()
    assert sum(granted) == 3, "exactly the limit, however the calls interleave"
    assert await directory.key_sessions("key-1") == 3
    assert await directory.key_sessions("key-2") == 0, "other keys are untouched"
    winner = next(index for index, ok in enumerate(granted) if ok)
    entry = SessionEntry(f"s{winner}", "mirage", "key-1")
    assert await directory.reserve("node-x", entry, 3), "a session already counted is let in"
    await directory.release(entry)
    assert await directory.key_sessions("key-1") == 2
    assert await directory.reserve("node-0", SessionEntry("new", "mirage", "key-1"), 3)
    assert await directory.reserve("node-0", SessionEntry("free", "mirage", "key-1"), None), (
        "no limit: always counted"
    )


async def test_a_silent_node_and_its_sessions_expire(redis: RedisServer) -> None:
    short = Directory.from_url(redis.url, prefix="test:expiry:", ttl=0.4)
    try:
        entry = SessionEntry("sid-1", "mirage", "key-9")
        assert await short.reserve("n1", entry, 1)
        await short.announce(node("n1", {"mirage": 0}, 1.0, entry))
        assert [n.name for n in await short.nodes()] == ["n1"]
        located = await short.locate("sid-1")
        assert located is not None and located.sessions == (entry,)
        assert not await short.reserve("n2", SessionEntry("sid-2", "mirage", "key-9"), 1)

        for _ in range(3):  # heartbeats keep it all alive past its ttl
            await asyncio.sleep(0.2)
            await short.announce(node("n1", {"mirage": 0}, 1.0, entry))
        assert await short.locate("sid-1") is not None
        assert await short.key_sessions("key-9") == 1

        await asyncio.sleep(0.6)  # it stops beating: gone, and its key's place is free
        assert await short.nodes() == []
        assert await short.locate("sid-1") is None
        assert await short.key_sessions("key-9") == 0
        assert await short.reserve("n2", SessionEntry("sid-2", "mirage", "key-9"), 1)
    finally:
        await short.close()


async def test_a_node_that_leaves_is_gone_at_once(directory: Directory) -> None:
    entry = SessionEntry("sid", "mirage", "k")
    await directory.reserve("n1", entry, None)
    gone = node("n1", {"mirage": 1}, 0.0, entry)
    await directory.announce(gone)
    await directory.announce(node("n2", {"mirage": 1}))
    await directory.leave(gone)
    assert [n.name for n in await directory.nodes()] == ["n2"]
    assert await directory.locate("sid") is None
    assert await directory.key_sessions("k") == 0


async def test_rate_limits_are_shared_by_every_node(
    redis: RedisServer, directory: Directory
) -> None:
    other = Directory.from_url(redis.url, prefix=directory.prefix)
    try:
        here = RedisRateLimiter(directory, "new-session", rate=0.5, burst=2)
        there = RedisRateLimiter(other, "new-session", rate=0.5, burst=2)
        assert await here.acquire("key") == 0.0
        assert await there.acquire("key") == 0.0
        wait = await here.acquire("key")
        assert 0.0 < wait <= 2.0, "the burst is spent, on whichever node"
        assert await there.acquire("other-key") == 0.0, "per key"
    finally:
        await other.close()
    with pytest.raises(ValueError):
        RedisRateLimiter(directory, "x", rate=0, burst=1)


async def test_an_unreachable_redis_is_a_clear_error() -> None:
    nowhere = Directory.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for call in (
            nowhere.nodes(),
            nowhere.locate("sid"),
            nowhere.reserve("n", SessionEntry("s", "mirage", "k"), 2),
            nowhere.take("bucket", 1.0, 1.0),
            nowhere.announce(node("n", {})),
        ):
            with pytest.raises(ClusterUnavailable, match="redis"):
                await call
    finally:
        await nowhere.close()


async def test_an_unreadable_node_record_is_passed_over(directory: Directory) -> None:
    await directory.announce(node("good", {"mirage": 1}))
    await directory.redis.set(f"{directory.prefix}node:bad", "{not json")
    await directory.redis.sadd(f"{directory.prefix}nodes", "bad")
    assert [n.name for n in await directory.nodes()] == ["good"]


def test_placement_prefers_room_then_the_least_load() -> None:
    nodes = [
        node("full", {"mirage": 0}),
        node("one", {"mirage": 1}, 0.2),
        node("two", {"mirage": 2}, 0.9),
        node("unlimited", {"mirage": None}, 0.5),
        node("busy-unlimited", {"mirage": None}, 0.8),
        node("avatar-only", {"live_avatar": 3}),
        node("me", {"mirage": 5}),
    ]
    assert [n.name for n in order_for("mirage", nodes, exclude={"me"})] == [
        "unlimited",
        "busy-unlimited",
        "two",
        "one",
    ]
    assert [n.name for n in order_for("live_avatar", nodes)] == ["avatar-only"]
    assert order_for("lucy_v2v_720p_rt", nodes) == []


def test_node_records_round_trip() -> None:
    entry = SessionEntry("sid", "mirage", "key")
    original = node("n", {"mirage": 2, "live_avatar": None}, 0.25, entry)
    assert Node.from_json(original.to_json()) == original


def test_a_relay_signature_covers_the_secret_the_target_and_the_time() -> None:
    target = "/v1/stream?api_key=k&model=mirage"
    signature = sign("secret", target, now=1_000_000)
    assert verify("secret", signature, target, now=1_000_010)
    assert not verify("other", signature, target, now=1_000_010)
    assert not verify("secret", signature, target + "x", now=1_000_010)
    assert not verify("secret", signature, target, now=1_000_031), "too old"
    assert not verify("secret", signature, target, now=999_969), "from the future"
    for forged in ("", "abc", "1000000.", ".abc", "x.y", signature.upper()):
        assert not verify("secret", forged, target, now=1_000_000)


def test_a_member_needs_a_secret_and_an_address_others_can_reach() -> None:
    assert settings_problem(Settings()) is None, "a single node needs neither"
    cluster = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert "--cluster-secret" in (settings_problem(cluster) or "")
    member = replace(cluster, cluster_secret="s")
    assert settings_problem(member) is None
    everywhere = replace(member, host="0.0.0.0")
    assert "--public-host" in (settings_problem(everywhere) or "")
    assert settings_problem(replace(everywhere, public_host="10.0.0.5")) is None
    assert node_url(replace(everywhere, public_host="10.0.0.5", port=8001)) == (
        "http://10.0.0.5:8001"
    )
    assert node_url(replace(member, public_host="::1", tls="self-signed")) == ("https://[::1]:8000")


def test_serve_refuses_a_member_without_a_secret(tmp_path) -> None:
    import subprocess

    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_cli(
            "serve",
            "--data-dir",
            str(tmp_path),
            "--port",
            str(free_port()),
            "--redis-url",
            "redis://127.0.0.1:6379/0",
            env={"LIVEMORPH_CLUSTER_SECRET": ""},
        )
    assert failed.value.returncode == 2
    assert "--cluster-secret" in failed.value.stderr


async def test_a_single_node_lists_itself(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, admin_key="admin", node_name="solo")
    async with serve_in_process(settings) as server, httpx.AsyncClient() as http:
        response = await http.get(f"{server.base_url}/v1/cluster")
        assert response.status_code == 401
        response = await http.get(f"{server.base_url}/v1/cluster", headers={"X-ADMIN-KEY": "admin"})
        assert response.status_code == 200
        report = response.json()
        assert report["clustered"] is False
        assert [n["name"] for n in report["nodes"]] == ["solo"]
        assert report["nodes"][0]["sessions"] == []


def test_a_nodes_room_is_the_least_its_limits_leave() -> None:
    """What a member announces: per model, the sessions `--max-sessions`, its configured
    capacity and its engine still leave; `None` where nothing limits it."""

    @dataclass
    class Running:
        spec: ModelSpec
        id: str
        principal: Principal = field(default_factory=lambda: Principal("key"))
        pipeline: object = field(default_factory=lambda: SimpleNamespace(frames_in=0, frames_out=0))
        pc: object | None = None

    settings = Settings(redis_url="redis://127.0.0.1:1/0", cluster_secret="s")
    sessions = SessionRegistry(max_sessions=3)
    engines = EngineRegistry("passthrough")
    capacity = Capacity({"mirage": 2}, estimate=False)
    directory = Directory.from_url(settings.redis_url or "")
    member = ClusterMember(
        directory, settings, sessions, engines, capacity, Limits.from_settings(settings)
    )
    mirage, avatar = CATALOG["mirage"], CATALOG["live_avatar"]
    assert member.room(mirage) == 2, "its capacity, under --max-sessions"
    assert member.room(avatar) == 3, "not configured: --max-sessions alone"
    sessions.add(Running(mirage, "s1"))  # type: ignore[arg-type]
    assert member.room(mirage) == 1
    assert member.room(avatar) == 2, "capacity does not limit a model it neither names nor measures"
    sessions.add(Running(mirage, "s2"))  # type: ignore[arg-type]
    assert member.room(mirage) == 0, "its capacity is full"
    assert member.room(avatar) == 1, "one place left under --max-sessions"
    snapshot = member.snapshot()
    assert snapshot.room["mirage"] == 0 and len(snapshot.sessions) == 2
    unlimited = ClusterMember(
        directory,
        settings,
        SessionRegistry(),
        engines,
        Capacity(estimate=False),
        Limits.from_settings(settings),
    )
    assert unlimited.room(mirage) is None
