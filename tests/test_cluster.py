"""Several nodes as one service: real redis-server, real PostgreSQL, real `livemorph serve`
processes on loopback, each with `--max-sessions 1`, driven by the SDK over WebRTC."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets

from livemorph import LivemorphError, RetryPolicy, create_client
from livemorph.cluster.relay import RELAY_HEADER, sign
from livemorph.protocol import decode_subscribe_token
from livemorph.server.limits import AT_CAPACITY, CLUSTER_UNAVAILABLE, TOO_MANY_SESSIONS
from livemorph.testing import LiveServer, start_server, stop_server
from tests.livekit_signal import RoomClient, room_of
from tests.media import FrameSink, SceneTrack, mean_abs_diff, photo
from tests.postgres import PostgresServer
from tests.redis_server import RedisServer, redis_server
from tests.support import eventually

pytestmark = pytest.mark.slow

SECRET = "cluster-test-secret"
ADMIN = "cluster-test-admin"
ONCE = RetryPolicy(attempts=1)
QUICK = RetryPolicy(attempts=8, base_delay=0.5, max_delay=2.0)


@dataclass
class Cluster:
    redis: RedisServer
    database_url: str
    nodes: list[LiveServer]

    def port(self, node: LiveServer) -> int:
        return int(node.base_url.rsplit(":", 1)[1])

    def node_at(self, port: int) -> LiveServer:
        return next(node for node in self.nodes if self.port(node) == port)

    def report(self, via: LiveServer | None = None) -> dict:
        node = via or self.nodes[0]
        response = httpx.get(f"{node.base_url}/v1/cluster", headers={"X-ADMIN-KEY": ADMIN})
        response.raise_for_status()
        return response.json()

    def sessions_by_node(self) -> dict[str, int]:
        return {node["name"]: len(node["sessions"]) for node in self.report()["nodes"]}

    def mint_key(self, credits: int | None = None) -> str:
        body = {"name": "cluster-test"} | ({"credits": credits} if credits else {})
        response = httpx.post(
            f"{self.nodes[0].base_url}/v1/admin/keys", json=body, headers={"X-ADMIN-KEY": ADMIN}
        )
        response.raise_for_status()
        return response.json()["apiKey"]


def _node_flags(redis_url: str, name: str, *flags: str) -> tuple[str, ...]:
    return (
        "--redis-url",
        redis_url,
        "--node-name",
        name,
        "--max-sessions",
        "1",
        "--engine",
        "grade",
        "--admin-key",
        ADMIN,
        *flags,
    )


@contextmanager
def cluster_of(
    tmp: Path, postgres: PostgresServer, redis: RedisServer, count: int, *flags: str
) -> Iterator[Cluster]:
    database_url = postgres.new_database()
    env = {"LIVEMORPH_DATABASE_URL": database_url, "LIVEMORPH_CLUSTER_SECRET": SECRET}
    names = "abcdefgh"[:count]
    with ThreadPoolExecutor(count) as pool:
        nodes = list(
            pool.map(
                lambda name: start_server(
                    tmp / name, *_node_flags(redis.url, name, *flags), env=env
                ),
                names,
            )
        )
    cluster = Cluster(redis, database_url, nodes)
    try:
        # every node has heard of the others before the test places anything
        deadline = time.monotonic() + 15
        while len(cluster.report()["nodes"]) != count:
            assert time.monotonic() < deadline, cluster.report()
            time.sleep(0.1)
        yield cluster
    finally:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(stop_server, nodes))


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer, redis: RedisServer
) -> Iterator[Cluster]:
    """Three nodes that tests share; each test leaves it with no session."""
    with cluster_of(
        tmp_path_factory.mktemp("cluster"), postgres, redis, 3, "--max-sessions-per-key", "2"
    ) as three:
        yield three
        assert all(node.wait_sessions(0) == 0 for node in three.nodes)


def _serving_port(rt) -> int:
    return decode_subscribe_token(rt.subscribe_token).port


def _counted(exposition: str, series: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(series + " ")
    )


async def _frames(rt) -> None:
    sink = FrameSink(rt.video_track)
    try:
        await asyncio.wait_for(sink.fresh(), 20)
    finally:
        await sink.close()


async def test_sessions_through_one_node_land_on_three_and_a_fourth_is_refused(
    cluster: Cluster,
) -> None:
    entry = cluster.nodes[0]
    keys = [cluster.mint_key() for _ in range(4)]  # one each: the key limit is not tested here
    clients = [create_client(api_key=key, base_url=entry.base_url) for key in keys]
    sessions = []
    try:
        for client in clients[:3]:
            sessions.append(
                await client.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            )
        ports = {_serving_port(rt) for rt in sessions}
        assert ports == {cluster.port(node) for node in cluster.nodes}, "one per node"
        for rt in sessions:
            await _frames(rt)
        await eventually(lambda: sorted(cluster.sessions_by_node().values()) == [1, 1, 1])
        report = cluster.report(via=cluster.nodes[2])  # any node answers for all
        assert report["clustered"] and report["node"] == "c"
        for node in report["nodes"]:
            assert node["engines"]["mirage"] == "grade" and node["room"]["mirage"] == 0
            assert [s["model"] for s in node["sessions"]] == ["mirage"]

        with pytest.raises(LivemorphError) as refused:
            await clients[3].realtime.connect(SceneTrack(320, 176), model="mirage", retry=ONCE)
        assert AT_CAPACITY in str(refused.value)
        for rt in sessions:  # the refusal cost the running sessions nothing
            await _frames(rt)
    finally:
        for rt in sessions:
            await rt.disconnect()
        for client in clients:
            await client.aclose()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)


async def test_a_viewer_through_another_node_sees_the_session(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    # b's one place taken by a session opened on b itself; the watched one is relayed on
    async with (
        create_client(api_key=b.api_key, base_url=b.base_url) as on_b,
        create_client(api_key=a.api_key, base_url=b.base_url) as through_b,
    ):
        filler = await on_b.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
        watched = await through_b.realtime.connect(
            SceneTrack(320, 176), model="mirage", retry=QUICK
        )
        try:
            assert _serving_port(filler) == cluster.port(b)
            holder = cluster.node_at(_serving_port(watched))
            assert holder is not b, "placed elsewhere"
            # the viewer asks the third node, which holds neither: it finds the session's
            # node in redis
            third = next(node for node in cluster.nodes if node not in (b, holder))
            async with create_client(api_key=a.api_key, base_url=third.base_url) as viewing:
                viewer = await viewing.realtime.subscribe(watched.subscribe_token, retry=QUICK)
                try:
                    await _frames(viewer)
                finally:
                    await viewer.disconnect()
            async with httpx.AsyncClient() as http:
                on_third = (await http.get(f"{third.base_url}/metrics")).text
                on_b_metrics = (await http.get(f"{b.base_url}/metrics")).text
            assert _counted(on_third, 'livemorph_relays_total{kind="subscribe"}') >= 1
            assert _counted(on_b_metrics, 'livemorph_relays_total{kind="stream"}') >= 1
        finally:
            await watched.disconnect()
            await filler.disconnect()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)


async def test_a_key_at_its_session_limit_gets_no_third_on_another_node(
    cluster: Cluster,
) -> None:
    a = cluster.nodes[0]
    key = cluster.mint_key()
    async with (
        create_client(api_key=key, base_url=a.base_url) as through_a,
    ):
        first = await through_a.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
        second = await through_a.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
        try:
            taken = {_serving_port(first), _serving_port(second)}
            assert len(taken) == 2
            free = next(node for node in cluster.nodes if cluster.port(node) not in taken)
            assert free.active_sessions() == 0, "a node with room..."
            async with create_client(api_key=key, base_url=free.base_url) as on_free:
                with pytest.raises(LivemorphError) as refused:
                    await on_free.realtime.connect(SceneTrack(320, 176), model="mirage", retry=ONCE)
            assert TOO_MANY_SESSIONS in str(refused.value), "...refuses the key's third"
        finally:
            await first.disconnect()
            await second.disconnect()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)


async def test_credits_spent_on_two_nodes_are_debited_once_each(cluster: Cluster) -> None:
    a = cluster.nodes[0]
    key = cluster.mint_key(credits=600)
    ticks: dict[int, int] = {}
    async with create_client(api_key=key, base_url=a.base_url) as client:
        sessions = [
            await client.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            for _ in range(2)
        ]
        assert _serving_port(sessions[0]) != _serving_port(sessions[1])
        ids = [rt.session_id for rt in sessions]
        for index, rt in enumerate(sessions):
            rt.on("generation_tick", lambda tick, i=index: ticks.__setitem__(i, tick.seconds))
        await eventually(lambda: len(ticks) == 2 and min(ticks.values()) >= 3, within=20)
        for rt in sessions:
            await rt.disconnect()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)

    async with httpx.AsyncClient(base_url=a.base_url) as http:
        usage = (await http.get("/v1/usage", headers={"X-API-KEY": key})).json()
        path = f"/v1/admin/keys/{usage['keyId']}/usage"
        report = (await http.get(path, headers={"X-ADMIN-KEY": ADMIN})).json()
    recorded = {row["id"]: row["seconds"] for row in report["sessions"]}
    assert set(recorded) == set(ids), "each session recorded once, under its own id"
    for index, session_id in enumerate(ids):
        # counted by the node serving it, each second once: what the client was told, or
        # a second more that ticked as it hung up
        assert ticks[index] <= recorded[session_id] <= ticks[index] + 1
    assert report["totalSeconds"] == sum(recorded.values())
    assert report["credits"] == 600 - sum(recorded.values())


async def test_a_forged_relay_is_refused(cluster: Cluster) -> None:
    a = cluster.nodes[0]
    target = f"/v1/stream?api_key={a.api_key}&model=mirage"
    for header in ("123.abc", sign("not-the-secret", target), sign(SECRET, "/v1/stream?other")):
        async with websockets.connect(
            f"{a.ws_url}{target}", additional_headers={RELAY_HEADER: header}
        ) as ws:
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert message == {
                "type": "error",
                "error": "permission denied: invalid relay signature",
            }
    # signed with the secret, it is a member's relay: served like any client of that key
    async with websockets.connect(
        f"{a.ws_url}{target}", additional_headers={RELAY_HEADER: sign(SECRET, target)}
    ) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message["type"] == "session_id"
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)


async def test_a_killed_node_costs_its_client_a_reconnect_elsewhere_with_its_prompt(
    tmp_path, postgres: PostgresServer
) -> None:
    with redis_server() as redis, cluster_of(tmp_path, postgres, redis, 3) as three:
        a = three.nodes[0]
        async with create_client(api_key=a.api_key, base_url=a.base_url) as client:
            held = await client.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            rt = await client.realtime.connect(
                SceneTrack(320, 176),
                model="mirage",
                initial_state={"prompt": "sepia"},
                retry=QUICK,
            )
            before = three.node_at(_serving_port(rt))
            assert before is not a
            sink = FrameSink(rt.video_track)
            styled = await sink.fresh()
            await sink.close()
            states: list[str] = []
            rt.on("connection_change", states.append)
            old = rt.session_id

            before.process.kill()  # no goodbye: its sockets just close
            await eventually(lambda: "reconnecting" in states, within=15)
            await eventually(lambda: rt.get_connection_state() == "generating", within=30)
            assert rt.session_id != old
            after = three.node_at(_serving_port(rt))
            assert after not in (a, before), "placed on the node with room"
            sink = FrameSink(rt.video_track)
            restored = await sink.fresh()
            await sink.close()
            plain = photo(restored.shape[1], restored.shape[0])
            # the SDK restored "sepia": the new node's picture looks like the old one's
            assert mean_abs_diff(restored, styled) * 2 < mean_abs_diff(restored, plain)
            await rt.disconnect()
            await held.disconnect()
        before.process.wait()


async def test_a_redis_outage_refuses_new_sessions_and_spares_running_ones(
    tmp_path, postgres: PostgresServer
) -> None:
    with redis_server() as redis, cluster_of(tmp_path, postgres, redis, 2) as two:
        a, b = two.nodes
        async with (
            create_client(api_key=a.api_key, base_url=a.base_url) as on_a,
            create_client(api_key=b.api_key, base_url=b.base_url) as on_b,
        ):
            running = await on_a.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            relayed = await on_a.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            assert _serving_port(relayed) == two.port(b)
            redis.stop()
            with pytest.raises(LivemorphError) as refused:
                await on_b.realtime.connect(SceneTrack(320, 176), model="mirage", retry=ONCE)
            assert CLUSTER_UNAVAILABLE in str(refused.value)
            # both streams go on, the relayed one's signaling included: it takes a prompt
            await _frames(running)
            await _frames(relayed)
            await relayed.set_prompt("sepia")
            assert running.get_connection_state() == "generating"

            redis.start()  # empty, as after a restart without persistence: nodes re-announce
            await relayed.disconnect()
            await eventually(lambda: b.active_sessions() == 0)
            again = await on_b.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            await _frames(again)
            await again.disconnect()
            await running.disconnect()


async def test_the_published_client_is_relayed_unchanged(cluster: Cluster) -> None:
    """`decart==0.0.30` through a full node: its session runs on another node, its prompt
    steers it through the relay, and the media reaches it from there."""
    from decart import DecartClient, models

    from tests.test_decart_client import connect_official, video_of

    a, b, _ = cluster.nodes
    ours = create_client(api_key=a.api_key, base_url=a.base_url)
    filler = await ours.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
    client = DecartClient(api_key=b.api_key, base_url=a.base_url, realtime_base_url=a.ws_url)
    tracks: list = []
    try:
        assert _serving_port(filler) == cluster.port(a)
        model = models.realtime("mirage")
        source = SceneTrack(model.width, model.height, fps=model.fps)
        rt = await connect_official(client, model, source, tracks.append, "sepia")
        assert rt.session_id and rt.session_id != filler.session_id
        await eventually(lambda: rt.session_id in _session_ids(cluster, exclude=a))
        output = FrameSink(await video_of(tracks))
        try:
            sepia = await output.fresh()
            await rt.set_prompt("cyberpunk neon city")  # acked through the relay
            neon = await output.fresh()
            assert mean_abs_diff(neon, sepia) > 2, "the new prompt reached the serving node"
        finally:
            await output.close()
            await rt.disconnect()
    finally:
        await client.close()
        await filler.disconnect()
        await ours.aclose()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)


def _session_ids(cluster: Cluster, exclude: LiveServer) -> set[str]:
    """The sessions the nodes other than `exclude` hold, by what they announce."""
    port = cluster.port(exclude)
    return {
        session["id"]
        for node in cluster.report()["nodes"]
        if node["publicPort"] != port
        for session in node["sessions"]
    }


async def test_a_livekit_room_is_served_by_the_node_its_session_was_relayed_to(
    cluster: Cluster,
) -> None:
    a, _, _ = cluster.nodes
    filler, _ = await room_of(a.ws_url, a.api_key, "mirage")  # a's one place
    relayed, info = await room_of(a.ws_url, a.api_key, "mirage")
    client, viewer = RoomClient(), RoomClient()
    try:
        holder = cluster.node_at(int(info["livekit_url"].rsplit(":", 1)[1]))
        assert holder is not a, "the room is on the node that holds the session"
        assert info["livekit_url"] == holder.ws_url
        await client.join(info["livekit_url"], info["token"])
        await client.publish(SceneTrack(320, 176))
        output = FrameSink(await client.video())
        await output.fresh()
        await output.close()
        # a viewer asks the entry node, which holds no such room: the holder answers
        async with httpx.AsyncClient() as http:
            reply = await http.post(
                f"{a.base_url}/watch-stream/{info['room_name']}", headers={"x-api-key": a.api_key}
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["livekit_url"] == holder.ws_url
        await viewer.join(reply.json()["livekit_url"], reply.json()["token"])
        watched = FrameSink(await viewer.video())
        await watched.fresh()
        await watched.close()
    finally:
        await viewer.close()
        await client.close()
        await relayed.close()
        await filler.close()
    await eventually(lambda: sum(cluster.sessions_by_node().values()) == 0)
