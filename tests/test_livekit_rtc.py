"""The LiveKit room endpoint (`/rtc`), `livekit_join`, `/watch-stream` and the line at a full
node, against a real `livemorph serve`, with a bare aiortc participant (tests/livekit_signal.py)
and raw sockets for what no client sends on purpose."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import Iterator
from fractions import Fraction

import httpx
import numpy as np
import pytest
import websockets
from aiortc.mediastreams import MediaStreamTrack
from av import AudioFrame
from livekit.protocol import rtc
from PIL import Image

from livemorph.livekit import Grant, RoomTokens
from livemorph.livekit.tokens import ISSUER
from livemorph.models import CATALOG
from livemorph.testing import LiveServer, serve
from tests.livekit_signal import RoomClient, room_of
from tests.media import FrameSink, SceneTrack, mean_abs_diff, photo
from tests.support import eventually

pytestmark = pytest.mark.slow

MODEL = "mirage_v2"


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A node with room for one session and a short line."""
    with serve(
        tmp_path_factory.mktemp("one-slot"), "--max-sessions", "1", "--queue-wait", "20"
    ) as live:
        yield live


async def test_a_session_streams_through_its_room_and_a_viewer_watches(server) -> None:
    spec = CATALOG[MODEL]
    control, info = await room_of(server.ws_url, server.api_key, MODEL, "anime")
    assert info["room_name"] == info["session_id"]
    assert info["livekit_url"] == server.ws_url
    client, viewer = RoomClient(), RoomClient()
    source = SceneTrack(spec.width, spec.height, fps=spec.fps)
    try:
        await client.join(info["livekit_url"], info["token"])
        joined = client.joined
        assert joined is not None
        assert joined.participant.sid.startswith("PA_")
        assert joined.participant.permission.can_publish
        assert joined.server_info.version and joined.ping_interval and joined.ping_timeout
        (engine,) = joined.other_participants
        assert engine.identity.startswith("inference-server-")
        assert engine.tracks[0].sid.startswith("TR_")
        await client.offer(1)  # data channels only, as both clients begin
        published = await client.publish(source, offer_id=2)
        assert published.sid.startswith("TR_")
        # the output's media section names the engine participant and its track
        assert f"{engine.sid}|{engine.tracks[0].sid} {engine.tracks[0].sid}" in client.stream_ids
        output = FrameSink(await client.video())
        anime = await output.fresh()
        assert anime.shape == (spec.height, spec.width, 3)
        assert mean_abs_diff(anime, source.last_rgb) > 5, "the output is restyled"

        await control.send(json.dumps({"type": "prompt", "prompt": "cyberpunk neon city"}))
        await _until(control, "prompt_ack")
        neon = await output.fresh()
        assert mean_abs_diff(neon, anime) > 5, "a new prompt changes the output"

        async with httpx.AsyncClient() as http:
            refused = await http.post(
                f"{server.base_url}/watch-stream/{info['room_name']}",
                headers={"x-api-key": "lm_wrong"},
            )
            assert refused.status_code == 401
            missing = await http.post(
                f"{server.base_url}/watch-stream/nosuchroom", headers={"x-api-key": server.api_key}
            )
            assert missing.status_code == 404
            watch = (
                await http.post(
                    f"{server.base_url}/watch-stream/{info['room_name']}",
                    headers={"x-api-key": server.api_key},
                )
            ).json()
        assert watch["room_name"] == info["room_name"]
        await viewer.join(watch["livekit_url"], watch["token"], bearer=True)
        assert viewer.joined is not None
        assert not viewer.joined.participant.permission.can_publish
        # LiveKit's Rust client negotiates a publisher connection even as a viewer
        inactive = await viewer.offer(1, data=True)
        assert "m=application" in inactive.sdp
        watched = FrameSink(await viewer.video())
        seen = await watched.fresh()
        assert seen.shape == (spec.height, spec.width, 3)
        assert mean_abs_diff(seen, source.last_rgb) > 5
        await watched.close()
        await output.close()
    finally:
        await viewer.close()
        await client.close()
        await control.close()
    assert server.wait_sessions(0) == 0


async def _until(control, kind: str) -> dict:
    async with asyncio.timeout(20):
        while True:
            message = json.loads(await control.recv())
            if message["type"] == kind:
                return message


@pytest.mark.parametrize(
    ("token", "status"),
    [
        (None, 401),
        ("not-a-jwt", 401),
        # signed with another secret: another node's token, or a forgery
        (RoomTokens().mint(Grant("client-x", "some-room", True)), 401),
        # expired an hour ago
        (RoomTokens(clock=lambda: time.time() - 3600).mint(Grant("c", "r", True)), 401),
    ],
)
async def test_bad_tokens_are_refused_at_the_upgrade(server, token, status) -> None:
    query = f"?access_token={token}" if token else ""
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{server.ws_url}/rtc{query}")
    assert refused.value.response.status_code == status
    async with httpx.AsyncClient() as http:
        reply = await http.get(f"{server.base_url}/rtc/validate{query}")
    assert reply.status_code == status


async def test_the_single_connection_path_answers_404_so_clients_fall_back(server) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{server.ws_url}/rtc/v1?access_token=x")
    assert refused.value.response.status_code == 404
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{server.base_url}/rtc/v1/validate")).status_code == 404


async def test_a_token_for_an_ended_session_finds_no_room(server) -> None:
    control, info = await room_of(server.ws_url, server.api_key, MODEL)
    await control.close()
    assert server.wait_sessions(0) == 0
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"{info['livekit_url']}/rtc?access_token={info['token']}")
    assert refused.value.response.status_code == 404
    assert ISSUER  # the tokens name this server as their issuer


@pytest.mark.parametrize(
    "frame",
    [
        "a text frame",
        b"\xff\xff\xff\xff not protobuf",
        rtc.SignalRequest().SerializeToString() + b"",  # no message at all
        rtc.SignalRequest(ping=1).SerializeToString() * 1 + b"\x00" * (70 * 1024),  # oversized
    ],
    ids=["text", "garbage", "empty", "oversized"],
)
async def test_bad_frames_close_the_room_socket_and_nothing_else(server, frame) -> None:
    spec = CATALOG[MODEL]
    control, info = await room_of(server.ws_url, server.api_key, MODEL, "anime")
    client = RoomClient()
    source = SceneTrack(spec.width, spec.height, fps=spec.fps)
    try:
        await client.join(info["livekit_url"], info["token"])
        await client.publish(source)
        output = FrameSink(await client.video())
        await output.fresh()
        # a second participant in the same room misbehaves
        rogue = await websockets.connect(
            f"{info['livekit_url']}/rtc?access_token={(await _viewer_token(server, info))}"
        )
        await rogue.recv()  # join
        await rogue.send(frame)
        async with asyncio.timeout(10):
            with pytest.raises(websockets.ConnectionClosed) as closed:
                while True:
                    await rogue.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003
        # the session streams on, and takes a prompt
        await output.fresh()
        await control.send(json.dumps({"type": "prompt", "prompt": "oil painting"}))
        assert (await _until(control, "prompt_ack"))["success"]
        assert server.active_sessions() == 1
        await output.close()
    finally:
        await client.close()
        await control.close()
    assert server.wait_sessions(0) == 0


async def _viewer_token(server: LiveServer, info: dict) -> str:
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{server.base_url}/watch-stream/{info['room_name']}",
            headers={"x-api-key": server.api_key},
        )
    return reply.json()["token"]


async def test_a_silent_participant_is_let_go_after_the_ping_timeout(server) -> None:
    control, info = await room_of(server.ws_url, server.api_key, MODEL)
    try:
        silent = await websockets.connect(f"{info['livekit_url']}/rtc?access_token={info['token']}")
        join = rtc.SignalResponse.FromString(await silent.recv()).join
        started = time.monotonic()
        async with asyncio.timeout(join.ping_timeout + 10):
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await silent.recv()  # the server's subscriber offer, then the close
        assert time.monotonic() - started >= join.ping_timeout - 1
        await control.send(json.dumps({"type": "prompt", "prompt": "anime"}))
        assert (await _until(control, "prompt_ack"))["success"], "the session goes on"
    finally:
        await control.close()


async def test_pings_are_answered_in_both_forms(server) -> None:
    control, info = await room_of(server.ws_url, server.api_key, MODEL)
    client = RoomClient()
    try:
        await client.join(info["livekit_url"], info["token"])
        await client.send(ping=1234)
        await client.send(ping_req=rtc.Ping(timestamp=5678, rtt=3))
        await eventually(
            lambda: (
                any(r.WhichOneof("message") == "pong" and r.pong == 1234 for r in client.responses)
                and any(
                    r.WhichOneof("message") == "pong_resp"
                    and r.pong_resp.last_ping_timestamp == 5678
                    for r in client.responses
                )
            ),
            within=5,
        )
    finally:
        await client.close()
        await control.close()


async def test_a_full_node_keeps_livekit_clients_in_line(one_slot: LiveServer) -> None:
    first, _ = await room_of(one_slot.ws_url, one_slot.api_key, MODEL)
    waiting = await websockets.connect(
        f"{one_slot.ws_url}/v1/stream?api_key={one_slot.api_key}&model={MODEL}"
    )
    try:
        await waiting.send(json.dumps({"type": "livekit_join"}))
        place = await _until(waiting, "queue_position")
        assert (place["position"], place["queue_size"]) == (1, 1)
        # the direct protocol cannot wait: it is refused as before
        direct = await websockets.connect(
            f"{one_slot.ws_url}/v1/stream?api_key={one_slot.api_key}&model={MODEL}"
        )
        await direct.send(json.dumps({"type": "prompt", "prompt": "anime"}))
        refusal = await _until(direct, "error")
        assert "capacity" in refusal["error"]
        await first.close()
        info = await _until(waiting, "livekit_room_info")
        assert info["session_id"]
    finally:
        await waiting.close()
        await first.close()
    assert one_slot.wait_sessions(0) == 0


async def test_leaving_the_line_frees_its_place(one_slot: LiveServer) -> None:
    first, _ = await room_of(one_slot.ws_url, one_slot.api_key, MODEL)
    url = f"{one_slot.ws_url}/v1/stream?api_key={one_slot.api_key}&model={MODEL}"
    early, late = await websockets.connect(url), await websockets.connect(url)
    try:
        await early.send(json.dumps({"type": "livekit_join"}))
        assert (await _until(early, "queue_position"))["position"] == 1
        await late.send(json.dumps({"type": "livekit_join"}))
        assert (await _until(late, "queue_position"))["position"] == 2
        await early.close()
        moved = await _until(late, "queue_position")
        assert (moved["position"], moved["queue_size"]) == (1, 1)
    finally:
        await late.close()
        await first.close()
    assert one_slot.wait_sessions(0) == 0


class ToneTrack(MediaStreamTrack):
    """A microphone: silence for `quiet` seconds, then a loud 440 Hz tone, in real time."""

    kind = "audio"

    def __init__(self, quiet: float) -> None:
        super().__init__()
        self.quiet = quiet
        self._sent = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        rate, samples = 48_000, 960
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._sent / rate
        if due > now:
            await asyncio.sleep(due - now)
        t = (self._sent + np.arange(samples)) / rate
        loud = self._sent / rate >= self.quiet
        wave = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767 * loud).astype(np.int16)
        frame = AudioFrame.from_ndarray(wave.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        frame.pts = self._sent
        frame.time_base = Fraction(1, rate)
        self._sent += samples
        return frame


@pytest.fixture(scope="module")
def meter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A node whose avatar engine lights the portrait by the loudness it hears."""
    with serve(tmp_path_factory.mktemp("meter"), "--engine", "meter") as live:
        yield live


async def test_the_avatar_hears_the_microphone_and_its_voice_joins_the_room(
    meter_server: LiveServer,
) -> None:
    spec = CATALOG["live_avatar"]
    buffer = io.BytesIO()
    Image.fromarray(photo(480, 640)).save(buffer, format="PNG")
    portrait = base64.b64encode(buffer.getvalue()).decode()
    control, info = await room_of(
        meter_server.ws_url, meter_server.api_key, "live_avatar", image=portrait
    )
    client = RoomClient()
    try:
        await client.join(info["livekit_url"], info["token"])
        await client.publish(ToneTrack(quiet=3.0))
        video = FrameSink(await client.video())
        quiet = await video.fresh(skip=5)
        assert quiet.shape == (spec.height, spec.width, 3)
        # the engine's voice begins with the microphone: the room offers it again
        voice = await client.track("audio")
        assert any(
            r.WhichOneof("message") == "update" and len(r.update.participants[0].tracks) == 2
            for r in client.responses
        ), "the engine participant announced its audio track"
        await asyncio.sleep(3.5)
        loud = await video.fresh()
        assert loud.mean() > 2.0 * quiet.mean(), "the engine heard the microphone"
        level = 0.0
        async with asyncio.timeout(15):
            while level < 0.1:  # the silence before the tone was queued first
                samples = (await voice.recv()).to_ndarray().astype(np.float64) / 32768.0
                level = float(np.sqrt(np.mean(samples**2)))
        # the voice came back through the room (a timeout above says it did not)
        await video.close()
    finally:
        await client.close()
        await control.close()
    assert meter_server.wait_sessions(0) == 0
