"""The WebSocket signaling of docs/protocol.md, spoken raw: errors, acks, refusals."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from livemorph.config import Settings
from livemorph.protocol import MAX_IMAGE_BYTES
from tests.inprocess import serve_in_process

HOST_CANDIDATE = "candidate:1 1 udp 1 1.2.3.4 5 typ host"


def stream_url(server, key: str | None = None, model: str = "mirage") -> str:
    return f"{server.ws_url}/v1/stream?api_key={key or server.api_key}&model={model}"


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        return json.loads(await ws.recv())


async def recv_type(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        message = await recv_json(ws)
        if message["type"] == kind:
            return message


async def expect_fatal(url: str, words: str) -> None:
    async with connect(url) as ws:
        message = await recv_json(ws)
        assert message["type"] == "error"
        assert words in message["error"].lower()
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


def png_b64(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


async def test_bad_key_is_fatal(server) -> None:
    await expect_fatal(stream_url(server, key="lm_not_a_key"), "invalid api key")


async def test_unknown_model_is_fatal_and_named(server) -> None:
    async with connect(stream_url(server, model="warp_drive")) as ws:
        message = await recv_json(ws)
        assert "model not found" in message["error"] and "warp_drive" in message["error"]


async def test_an_avatar_offer_without_a_portrait_is_refused_clearly(server) -> None:
    """live_avatar has no camera: it needs the portrait first, and says so; the session
    stays, so the client can send the portrait and offer again."""
    async with connect(stream_url(server, model="live_avatar")) as ws:
        await ws.send(json.dumps({"type": "offer", "sdp": "v=0"}))
        message = await recv_type(ws, "error")
        assert "needs a portrait image" in message["error"]
        assert "set_image" in message["error"]
        await ws.send(json.dumps({"type": "prompt", "prompt": "smile"}))
        assert (await recv_type(ws, "prompt_ack"))["type"] == "prompt_ack"


async def test_session_id_names_this_node(server) -> None:
    async with connect(stream_url(server)) as ws:
        message = await recv_json(ws)
        assert message["type"] == "session_id"
        assert message["server_ip"] == "127.0.0.1"
        assert message["server_port"] == int(server.base_url.rsplit(":", 1)[1])
        assert message["session_id"]


async def test_prompt_ack_echoes_the_prompt(server) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        await ws.send(json.dumps({"type": "prompt", "prompt": "Anime  style ✨"}))
        ack = await recv_type(ws, "prompt_ack")
        enhanced = ack.pop("enhanced_prompt")
        assert ack == {"type": "prompt_ack", "prompt": "Anime  style ✨", "success": True}
        assert enhanced, "the engine's reading of an enhanced prompt comes back with the ack"
        await ws.send(json.dumps({"type": "prompt", "prompt": "exact", "enhance_prompt": False}))
        assert "enhanced_prompt" not in await recv_type(ws, "prompt_ack")


@pytest.mark.parametrize(
    ("message", "ack_type", "words"),
    [
        ({"type": "prompt", "prompt": ""}, "prompt_ack", "non-empty"),
        ({"type": "prompt", "prompt": 42}, "prompt_ack", "non-empty"),
        ({"type": "prompt", "prompt": "x" * 5000}, "prompt_ack", "too long"),
        (
            {"type": "prompt", "prompt": "ok", "enhance_prompt": "yes"},
            "prompt_ack",
            "true or false",
        ),
        ({"type": "set_image", "image_data": "%%%not base64"}, "set_image_ack", "base64"),
        (
            {"type": "set_image", "image_data": base64.b64encode(b"hello").decode()},
            "set_image_ack",
            "invalid image",
        ),
        ({"type": "set_image", "image_data": 12}, "set_image_ack", "base64 string"),
        (
            {"type": "set_image", "image_data": "A" * (MAX_IMAGE_BYTES * 4 // 3 + 400)},
            "set_image_ack",
            "too large",
        ),
    ],
)
async def test_refused_controls_get_a_failed_ack(server, message, ack_type, words) -> None:
    async with connect(stream_url(server), max_size=None) as ws:
        await recv_type(ws, "session_id")
        await ws.send(json.dumps(message))
        ack = await recv_type(ws, ack_type)
        assert ack["success"] is False
        assert words in ack["error"]
        # The session goes on: a good prompt still works.
        await ws.send(json.dumps({"type": "prompt", "prompt": "still here"}))
        assert (await recv_type(ws, "prompt_ack"))["success"] is True


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("{nope", "not valid json"),
        ("[1,2]", "expected an object"),
        ('{"type": 5}', "expected an object"),
        ('{"type": "dance"}', "unknown message type"),
        ('{"type": "offer"}', "offer needs a string 'sdp'"),
        ('{"type": "offer", "sdp": "v=0 garbage"}', "invalid offer"),
        (
            json.dumps({"type": "ice-candidate", "candidate": {"candidate": HOST_CANDIDATE}}),
            "before offer",
        ),
        ('{"type": "ice-candidate", "candidate": "x"}', "candidate object"),
    ],
)
async def test_malformed_messages_get_an_error(server, raw: str, words: str) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        await ws.send(raw)
        error = await recv_type(ws, "error")
        assert words in error["error"].lower()
        await ws.send(json.dumps({"type": "prompt", "prompt": "still here"}))
        assert (await recv_type(ws, "prompt_ack"))["success"] is True


async def test_binary_frames_and_null_candidates(server) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        await ws.send(b"\x00\x01binary")
        assert "text frame" in (await recv_type(ws, "error"))["error"]
        await ws.send(json.dumps({"type": "ice-candidate", "candidate": None}))
        await ws.send(json.dumps({"type": "ice-candidate", "candidate": {"candidate": ""}}))
        await ws.send(json.dumps({"type": "prompt", "prompt": "after candidates"}))
        ack = await recv_json(ws)
        assert ack["type"] == "prompt_ack", "end-of-candidates is accepted silently"


async def test_set_image_variants_are_acked(server) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        for message in (
            {"type": "set_image", "image_data": png_b64()},
            {"type": "set_image", "image_data": png_b64(), "prompt": "watercolor"},
            {"type": "set_image", "image_data": None},
            {"type": "set_image", "image_data": None, "prompt": None},
        ):
            await ws.send(json.dumps(message))
            ack = await recv_type(ws, "set_image_ack")
            ack.pop("enhanced_prompt", None)
            assert ack == {"type": "set_image_ack", "success": True}


async def test_client_token_limits(tmp_path) -> None:
    """In-process, so the token expires when the test moves the server's clock, however
    long the sessions before that took to open."""
    async with serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server:
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            minted = await http.post(
                "/v1/client/tokens",
                headers={"X-API-KEY": server.api_key},
                json={"allowedModels": ["mirage"], "expiresIn": 1},
            )
        token = minted.json()["apiKey"]
        await expect_fatal(stream_url(server, key=token, model="lucy_2_rt"), "permission denied")
        async with connect(stream_url(server, key=token, model="mirage")) as ws:
            assert (await recv_json(ws))["type"] == "session_id"
        server.clock.advance(1)
        await expect_fatal(stream_url(server, key=token, model="mirage"), "invalid api key")


async def test_viewer_of_unknown_session(server) -> None:
    url = f"{server.ws_url}/subscribe/nope?IP=127.0.0.1&port=1&api_key={server.api_key}"
    await expect_fatal(url, "invalid session")


async def test_viewer_with_bad_key(server) -> None:
    async with connect(stream_url(server)) as ws:
        session_id = (await recv_type(ws, "session_id"))["session_id"]
        url = f"{server.ws_url}/subscribe/{session_id}?api_key=lm_bad"
        await expect_fatal(url, "invalid api key")


async def test_viewer_cannot_steer(server) -> None:
    async with connect(stream_url(server)) as ws:
        session_id = (await recv_type(ws, "session_id"))["session_id"]
        url = f"{server.ws_url}/subscribe/{session_id}?IP=127.0.0.1&port=1&api_key={server.api_key}"
        async with connect(url) as viewer:
            for message in (
                {"type": "prompt", "prompt": "take over"},
                {"type": "set_image", "image_data": None, "prompt": None},
            ):
                await viewer.send(json.dumps(message))
                assert "not allowed" in (await recv_type(viewer, "error"))["error"]
        await ws.send(json.dumps({"type": "prompt", "prompt": "mine"}))
        assert (await recv_type(ws, "prompt_ack"))["success"] is True


async def test_closing_the_socket_ends_the_session(server) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        assert server.active_sessions() >= 1
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0
