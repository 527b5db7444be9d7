"""`--ice-servers`: the node's peer connections gather with them, and clients are handed them
(`ice_servers`, docs/protocol.md) for their own. Nothing here reaches a STUN or TURN server:
127.0.0.1:9 answers nobody, so what is checked is the configuration, and that sessions still
connect on loopback with it set."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from websockets.asyncio.client import connect

from livemorph import create_client
from livemorph.config import Settings, ice_servers
from livemorph.protocol import IceServer, IceServers, parse_server, serialise
from livemorph.sdk import signaling
from livemorph.sessions import session as sessions
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack

#: A STUN and a TURN server nobody answers at: gathering gives up on them (aioice waits at
#: most 5 s) and the host candidates carry the session on loopback.
UNREACHABLE = (
    '[{"urls": "stun:127.0.0.1:9"}, '
    '{"urls": ["turn:127.0.0.1:9?transport=udp"], "username": "node", "credential": "s3cret"}]'
)
SERVERS = ice_servers(UNREACHABLE)


@pytest.fixture
def node_ice_servers() -> Iterator[tuple[IceServer, ...]]:
    """The node's ICE servers set as `livemorph serve` sets them, and unset afterwards."""
    sessions.set_ice_servers(SERVERS)
    try:
        yield SERVERS
    finally:
        sessions.set_ice_servers(())


def record_configurations(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[RTCConfiguration]:
    """Every `RTCConfiguration` `module` makes a peer connection with, from now on."""
    made: list[RTCConfiguration] = []

    def peer_connection(configuration: RTCConfiguration | None = None) -> RTCPeerConnection:
        assert configuration is not None
        made.append(configuration)
        return RTCPeerConnection(configuration)

    monkeypatch.setattr(module, "RTCPeerConnection", peer_connection)
    return made


def as_json(configuration: RTCConfiguration) -> list[dict[str, object]]:
    return [
        {"urls": server.urls, "username": server.username, "credential": server.credential}
        for server in configuration.iceServers or []
    ]


EXPECTED = [
    {"urls": ["stun:127.0.0.1:9"], "username": None, "credential": None},
    {"urls": ["turn:127.0.0.1:9?transport=udp"], "username": "node", "credential": "s3cret"},
]


def test_the_message_round_trips_and_keeps_the_credential_out_of_repr() -> None:
    message = IceServers(SERVERS)
    assert json.loads(serialise(message)) == {
        "type": "ice_servers",
        "ice_servers": [
            {"urls": ["stun:127.0.0.1:9"]},
            {
                "urls": ["turn:127.0.0.1:9?transport=udp"],
                "username": "node",
                "credential": "s3cret",
            },
        ],
    }
    assert parse_server(serialise(message)) == message
    assert "s3cret" not in repr(message)


async def test_the_node_peer_connections_use_the_ice_servers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made = record_configurations(monkeypatch, sessions)
    pc = sessions.new_peer_connection()
    await pc.close()
    assert made[-1].iceServers == []  # none set: no STUN, not even aiortc's default Google one
    sessions.set_ice_servers(SERVERS)
    try:
        pc = sessions.new_peer_connection()
        await pc.close()
    finally:
        sessions.set_ice_servers(())
    assert as_json(made[-1]) == EXPECTED


async def test_clients_are_handed_the_ice_servers_in_order(
    tmp_path, node_ice_servers: tuple[IceServer, ...]
) -> None:
    """Publisher: `session_id`, then `ice_servers` before the reply to its first message.
    Viewer: `ice_servers` first, before it has said anything."""
    handed = json.loads(serialise(IceServers(node_ice_servers)))
    async with serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with connect(url) as publisher:
            first = json.loads(await asyncio.wait_for(publisher.recv(), 10))
            assert first["type"] == "session_id"
            await publisher.send(json.dumps({"type": "prompt", "prompt": "ink"}))
            assert json.loads(await asyncio.wait_for(publisher.recv(), 10)) == handed
            ack = json.loads(await asyncio.wait_for(publisher.recv(), 10))
            assert ack["type"] == "prompt_ack" and ack["success"] is True
            await publisher.send(json.dumps({"type": "prompt", "prompt": "oil"}))
            ack = json.loads(await asyncio.wait_for(publisher.recv(), 10))
            assert ack["type"] == "prompt_ack", "handed over once per socket"

            watch = f"{server.ws_url}/subscribe/{first['session_id']}?api_key={server.api_key}"
            async with connect(watch) as viewer:
                assert json.loads(await asyncio.wait_for(viewer.recv(), 10)) == handed


async def test_nothing_is_handed_without_ice_servers(tmp_path) -> None:
    async with serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with connect(url) as publisher:
            assert json.loads(await asyncio.wait_for(publisher.recv(), 10))["type"] == "session_id"
            await publisher.send(json.dumps({"type": "prompt", "prompt": "ink"}))
            ack = json.loads(await asyncio.wait_for(publisher.recv(), 10))
            assert ack["type"] == "prompt_ack"


async def test_the_python_sdk_configures_its_peer_connection_and_still_connects(
    tmp_path, monkeypatch: pytest.MonkeyPatch, node_ice_servers: tuple[IceServer, ...]
) -> None:
    """Through a real server: the SDK's peer connection gathers with the servers it was
    handed (after its own), the node's with the node's, and the session and a viewer
    connect on loopback although neither server answers."""
    on_node = record_configurations(monkeypatch, sessions)
    on_client = record_configurations(monkeypatch, signaling)
    own = {"urls": ["stun:127.0.0.2:9"], "username": None, "credential": None}
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        rt = await client.realtime.connect(
            SceneTrack(320, 176),
            model="mirage",
            initial_state={"prompt": {"text": "ink"}},
            ice_servers=[RTCIceServer(["stun:127.0.0.2:9"])],
        )
        output = FrameSink(rt.video_track)
        try:
            await output.fresh()
            assert as_json(on_client[0]) == [own, *EXPECTED]
            assert as_json(on_node[0]) == EXPECTED

            viewer = await client.realtime.subscribe(rt.subscribe_token)
            watched = FrameSink(viewer.video_track)
            try:
                await watched.fresh()
                # a viewer offers at once: it keeps what it was handed for its next attempt
                assert [s.urls for s in viewer._handed_ice_servers] == [e["urls"] for e in EXPECTED]
                assert as_json(on_node[1]) == EXPECTED
            finally:
                await watched.close()
                await viewer.disconnect()
        finally:
            await output.close()
            await rt.disconnect()
