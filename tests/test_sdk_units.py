"""The Python SDK without a livemorph server: inputs, REST, acks, retries, reconnects.

Where a peer is needed, a few lines of `websockets` (and aiortc, for the media) stand in for
the server on localhost.
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import numpy as np
import pytest
from aiortc import (
    AudioStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from PIL import Image
from websockets.asyncio.server import ServerConnection, serve

import livemorph
from livemorph import ErrorCode, LivemorphError, create_client, models
from livemorph.errors import error_from_server_text
from livemorph.media.jitter import LowLatencyJitterBuffer
from livemorph.protocol import (
    MAX_IMAGE_BYTES,
    PERMANENT_ERROR_MARKERS,
    PromptAck,
    SessionId,
    SetImageAck,
    SubscribeTarget,
    decode_subscribe_token,
    encode_subscribe_token,
    is_permanent_error,
)
from livemorph.sdk import (
    ArrayVideoTrack,
    ClipAudioTrack,
    RealtimeClient,
    RetryPolicy,
    Signaling,
    decode_audio,
    should_retry,
)
from livemorph.sdk.images import image_to_base64

PNG_BYTES = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PNG_B64 = base64.b64encode(PNG_BYTES).decode()
FAST = RetryPolicy(attempts=5, base_delay=0.01, max_delay=0.02)


# -- helpers ------------------------------------------------------------------------------


class FakeWebSocket:
    """Records what the SDK sends; `feed()` plays server messages into its receive loop."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._incoming: asyncio.Queue[str | None] = asyncio.Queue()
        self.close_code: int | None = None

    async def send(self, message: str) -> None:
        self.sent.append(json.loads(message))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self._incoming.put_nowait(None)

    def feed(self, message: dict[str, Any]) -> None:
        self._incoming.put_nowait(json.dumps(message))

    def __aiter__(self) -> FakeWebSocket:
        return self

    async def __anext__(self) -> str:
        item = await self._incoming.get()
        if item is None:
            raise StopAsyncIteration
        return item


async def open_fake() -> tuple[Signaling, FakeWebSocket]:
    ws = FakeWebSocket()
    signaling = Signaling("ws://unused.invalid/v1/stream?api_key=k")
    await signaling.open(ws)
    return signaling, ws


async def until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def unconnected_client(**kwargs: Any) -> RealtimeClient:
    return RealtimeClient(
        "ws://unused.invalid/v1/stream",
        model="mirage",
        on_remote_stream=None,
        send=[],
        receive=(),
        ice_servers=(),
        customize_offer=None,
        retry=FAST,
        connect_timeout=5.0,
        **kwargs,
    )


def frame(value: int = 100, width: int = 64, height: int = 48) -> np.ndarray:
    return np.full((height, width, 3), value, np.uint8)


# -- images -------------------------------------------------------------------------------


async def test_image_inputs_all_encode_to_plain_base64(tmp_path: Path) -> None:
    path = tmp_path / "one.png"
    path.write_bytes(PNG_BYTES)
    inputs: list[Any] = [
        PNG_BYTES,
        bytearray(PNG_BYTES),
        path,
        str(path),
        PNG_B64,
        f"data:image/png;base64,{PNG_B64}",
        io.BytesIO(PNG_BYTES),
    ]
    for image in inputs:
        assert await image_to_base64(image) == PNG_B64, type(image)


async def test_numpy_images_are_sent_as_png() -> None:
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    for image in (rgb, np.dstack([rgb, np.full((4, 6), 255, np.uint8)]), rgb[..., 0]):
        data = base64.b64decode(await image_to_base64(image))
        assert data.startswith(b"\x89PNG")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
    for bad in (rgb.astype(np.float32), np.zeros((4, 6, 5), np.uint8), np.zeros((0, 6, 3))):
        with pytest.raises(LivemorphError) as info:
            await image_to_base64(bad)
        assert info.value.code is ErrorCode.INVALID_INPUT


async def test_image_from_url_uses_the_given_http_client() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/face.png"
        return httpx.Response(200, content=PNG_BYTES)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        assert await image_to_base64("https://images.example/face.png", http) == PNG_B64


@pytest.mark.parametrize("bad", ["not base64 at all!", "data:image/png,rawbytes", "", b"", 12345])
async def test_bad_images_are_invalid_input(bad: Any) -> None:
    with pytest.raises(LivemorphError) as info:
        await image_to_base64(bad)
    assert info.value.code is ErrorCode.INVALID_INPUT


async def test_missing_file_path_is_not_sent_as_base64(tmp_path: Path) -> None:
    with pytest.raises(LivemorphError) as info:
        await image_to_base64(tmp_path / "missing.png")
    assert info.value.code is ErrorCode.INVALID_INPUT


async def test_images_over_10_mb_are_refused_in_every_form(tmp_path: Path) -> None:
    big = b"\0" * (MAX_IMAGE_BYTES + 1)
    sparse = tmp_path / "big.png"
    with sparse.open("wb") as handle:
        handle.truncate(MAX_IMAGE_BYTES + 1)
    big_b64 = base64.b64encode(big).decode()
    for image in (big, sparse, str(sparse), big_b64, f"data:image/png;base64,{big_b64}"):
        with pytest.raises(LivemorphError) as info:
            await image_to_base64(image)
        assert info.value.code is ErrorCode.INVALID_INPUT
        assert "10 MB" in info.value.message
    exactly = b"\0" * MAX_IMAGE_BYTES
    assert await image_to_base64(exactly) == base64.b64encode(exactly).decode()


async def test_oversized_image_is_refused_before_anything_is_sent() -> None:
    signaling, ws = await open_fake()
    rt = unconnected_client()
    rt._signaling = signaling
    with pytest.raises(LivemorphError) as info:
        await rt.set_image(b"\0" * (MAX_IMAGE_BYTES + 1), prompt="too big")
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert ws.sent == []

    # The same call with a small image does reach the wire.
    task = asyncio.create_task(rt.set_image(PNG_BYTES, prompt="fine", enhance=False))
    await until(lambda: bool(ws.sent))
    assert ws.sent == [
        {"type": "set_image", "image_data": PNG_B64, "prompt": "fine", "enhance_prompt": False}
    ]
    await signaling.handle_message(SetImageAck(success=True))
    await task
    await signaling.close()


async def test_connect_refuses_oversized_initial_image_without_network() -> None:
    client = create_client("key", "http://127.0.0.1:9")  # nothing listens on port 9
    try:
        with pytest.raises(LivemorphError) as info:
            await client.realtime.connect(
                ArrayVideoTrack(),
                model=models.realtime("mirage"),
                initial_state={"image": b"\0" * (MAX_IMAGE_BYTES + 1)},
            )
        assert info.value.code is ErrorCode.INVALID_INPUT
    finally:
        await client.aclose()


# -- client and tokens --------------------------------------------------------------------


def test_create_client_reads_key_and_url_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("LIVEMORPH_API_KEY", "env-key")
    monkeypatch.setenv("LIVEMORPH_BASE_URL", "https://morph.example:8443/")
    client = create_client()
    assert client.api_key == "env-key"
    assert client.base_url == "https://morph.example:8443"
    assert client.ws_base_url == "wss://morph.example:8443"
    assert "env-key" not in repr(client)

    explicit = create_client("arg-key", "http://10.0.0.5:8000")
    assert explicit.api_key == "arg-key"
    assert explicit.ws_base_url == "ws://10.0.0.5:8000"


def test_create_client_defaults_to_local_server(monkeypatch) -> None:
    monkeypatch.delenv("LIVEMORPH_BASE_URL", raising=False)
    assert create_client("k").base_url == "http://127.0.0.1:8000"


def test_missing_key_is_invalid_api_key(monkeypatch) -> None:
    monkeypatch.delenv("LIVEMORPH_API_KEY", raising=False)
    for key in (None, "", "   "):
        with pytest.raises(LivemorphError) as info:
            create_client(key)
        assert info.value.code is ErrorCode.INVALID_API_KEY


@pytest.mark.parametrize(
    "url", ["ftp://host", "ws://host:8000", "localhost:8000", "http://", "not a url"]
)
def test_non_http_base_urls_are_refused(url: str) -> None:
    with pytest.raises(LivemorphError) as info:
        create_client("k", url)
    assert info.value.code is ErrorCode.INVALID_BASE_URL


async def test_token_request_has_key_header_and_camel_case_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json={
                "apiKey": "ek_abc",
                "expiresAt": "2030-01-01T00:00:00Z",
                "permissions": {"models": ["mirage_v2"]},
                "constraints": {"realtime": {"maxSessionDuration": 120}},
            },
        )

    async with create_client(
        "sk_secret", "http://srv:8000", transport=httpx.MockTransport(handler)
    ) as client:
        token = await client.tokens.create(
            expires_in=90,
            allowed_models=["mirage_v2", models.realtime("lucy_2_rt")],
            constraints={"realtime": {"maxSessionDuration": 120}},
        )
        await client.tokens.create()

    first, bare = seen
    assert first.method == "POST"
    assert str(first.url) == "http://srv:8000/v1/client/tokens"
    assert first.headers["X-API-KEY"] == "sk_secret"
    assert first.headers["content-type"] == "application/json"
    assert json.loads(first.content) == {
        "expiresIn": 90,
        "allowedModels": ["mirage_v2", "lucy_2_rt"],
        "constraints": {"realtime": {"maxSessionDuration": 120}},
    }
    assert json.loads(bare.content) == {}
    assert token.api_key == "ek_abc"
    assert token.expires_at == "2030-01-01T00:00:00Z"
    assert token.permissions == {"models": ["mirage_v2"]}
    assert token.constraints == {"realtime": {"maxSessionDuration": 120}}
    assert "ek_abc" not in repr(token)


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (401, ErrorCode.INVALID_API_KEY),
        (403, ErrorCode.TOKEN_CREATE_ERROR),
        (400, ErrorCode.TOKEN_CREATE_ERROR),
        (500, ErrorCode.TOKEN_CREATE_ERROR),
    ],
)
async def test_token_errors_carry_status_and_server_text(status: int, code: ErrorCode) -> None:
    transport = httpx.MockTransport(lambda _: httpx.Response(status, text="nope: because"))
    async with create_client("k", "http://srv", transport=transport) as client:
        with pytest.raises(LivemorphError) as info:
            await client.tokens.create(expires_in=5)
    assert info.value.code is code
    assert str(status) in info.value.message
    assert "nope: because" in info.value.message


# -- error classification and retries ----------------------------------------------------


@pytest.mark.parametrize("marker", PERMANENT_ERROR_MARKERS)
def test_permanent_markers_stop_retries(marker: str) -> None:
    text = f"Oops: {marker.upper()} here"
    assert is_permanent_error(text)
    assert not should_retry(error_from_server_text(text))


def test_transient_errors_are_retried() -> None:
    for text in ("Server at capacity, try again shortly", "peer connection failed"):
        assert not is_permanent_error(text)
        assert should_retry(error_from_server_text(text))
    assert should_retry(LivemorphError("ack timed out", ErrorCode.TIMEOUT))
    assert not should_retry(LivemorphError("moderation: refused", ErrorCode.INVALID_INPUT))


def test_server_texts_map_to_codes() -> None:
    assert error_from_server_text("invalid api key").code is ErrorCode.INVALID_API_KEY
    assert error_from_server_text("model not found: 'x'").code is ErrorCode.MODEL_NOT_FOUND
    assert not should_retry(error_from_server_text("model not found: 'x'"))
    assert error_from_server_text("Server at capacity").code is ErrorCode.WEB_RTC_ERROR


def test_backoff_schedule_doubles_and_caps() -> None:
    assert RetryPolicy().delays() == [1, 2, 4, 8]
    assert RetryPolicy(attempts=7).delays() == [1, 2, 4, 8, 10, 10]
    assert RetryPolicy(attempts=1).delays() == []


# -- acks ---------------------------------------------------------------------------------


async def test_prompt_acks_are_matched_by_text() -> None:
    signaling, ws = await open_fake()
    first = asyncio.create_task(signaling.send_prompt("anime"))
    second = asyncio.create_task(signaling.send_prompt("noir", enhance=False))
    await until(lambda: len(ws.sent) == 2)
    assert ws.sent[1] == {"type": "prompt", "prompt": "noir", "enhance_prompt": False}

    await signaling.handle_message(PromptAck("unrelated", success=True))
    await signaling.handle_message(PromptAck("noir", success=True))
    await second
    assert not first.done(), "an ack for another prompt must not resolve this one"

    await signaling.handle_message(PromptAck("anime", success=False, error="moderation: no"))
    with pytest.raises(LivemorphError) as info:
        await first
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert info.value.message == "moderation: no"
    await signaling.close()


async def test_image_acks_resolve_in_order_and_passthrough_format() -> None:
    signaling, ws = await open_fake()
    passthrough = asyncio.create_task(signaling.send_image(None, passthrough=True))
    clear = asyncio.create_task(signaling.send_image(None))
    await until(lambda: len(ws.sent) == 2)
    assert ws.sent == [
        {"type": "set_image", "image_data": None, "prompt": None},
        {"type": "set_image", "image_data": None},
    ]
    await signaling.handle_message(SetImageAck(success=True))
    await passthrough
    assert not clear.done()
    await signaling.handle_message(SetImageAck(success=False, error="bad"))
    with pytest.raises(LivemorphError, match="bad"):
        await clear
    await signaling.close()


async def test_ack_timeout_is_a_timeout_error() -> None:
    signaling, _ = await open_fake()
    with pytest.raises(LivemorphError) as info:
        await signaling.send_prompt("slow", ack_timeout=0.05)
    assert info.value.code is ErrorCode.TIMEOUT
    assert signaling._pending_prompts == {}
    await signaling.close()


async def test_error_while_connecting_fails_the_waiter_with_its_code() -> None:
    signaling, ws = await open_fake()
    waiter = asyncio.create_task(signaling.send_prompt("anime"))
    await until(lambda: bool(ws.sent))
    ws.feed({"type": "error", "error": "invalid api key"})
    with pytest.raises(LivemorphError) as info:
        await waiter
    assert info.value.code is ErrorCode.INVALID_API_KEY
    await signaling.close()


async def test_close_fails_pending_acks() -> None:
    signaling, ws = await open_fake()
    waiter = asyncio.create_task(signaling.send_prompt("anime"))
    await until(lambda: bool(ws.sent))
    await ws.close()
    with pytest.raises(LivemorphError) as info:
        await waiter
    assert info.value.code is ErrorCode.WEB_RTC_ERROR
    assert signaling.state == "disconnected"


async def test_set_sends_prompt_alone_as_a_prompt_message() -> None:
    signaling, ws = await open_fake()
    rt = unconnected_client()
    rt._signaling = signaling

    task = asyncio.create_task(rt.set(prompt="watercolor", enhance=False))
    await until(lambda: bool(ws.sent))
    assert ws.sent[-1] == {"type": "prompt", "prompt": "watercolor", "enhance_prompt": False}
    await signaling.handle_message(PromptAck("watercolor", success=True))
    await task

    task = asyncio.create_task(rt.set(image=None))
    await until(lambda: len(ws.sent) == 2)
    assert ws.sent[-1] == {"type": "set_image", "image_data": None}
    await signaling.handle_message(SetImageAck(success=True))
    await task

    for bad in ({}, {"prompt": "   "}):
        with pytest.raises(LivemorphError) as info:
            await rt.set(**bad)
        assert info.value.code is ErrorCode.INVALID_INPUT
    assert len(ws.sent) == 2
    await signaling.close()


# -- subscribe tokens ---------------------------------------------------------------------


def test_subscribe_token_round_trip() -> None:
    target = SubscribeTarget("sess_123", "10.1.2.3", 8443)
    token = encode_subscribe_token(target)
    assert decode_subscribe_token(token) == target
    assert decode_subscribe_token(token.rstrip("=")) == target
    assert json.loads(base64.urlsafe_b64decode(token)) == {
        "sid": "sess_123",
        "ip": "10.1.2.3",
        "port": 8443,
        "room_name": "sess_123",  # what decart>=0.1 and @decartai/sdk>=0.1 read
    }


def test_a_current_clients_token_names_the_session_alone() -> None:
    # decart==0.2.4 and @decartai/sdk@0.1.20 encode {"room_name": ...}
    token = base64.urlsafe_b64encode(json.dumps({"room_name": "sess_9"}).encode()).decode()
    assert decode_subscribe_token(token) == SubscribeTarget("sess_9", "", 0)
    for bad in ({"room_name": ""}, {"room_name": 3}, {}, []):
        encoded = base64.urlsafe_b64encode(json.dumps(bad).encode()).decode()
        with pytest.raises(ValueError, match="invalid subscribe token"):
            decode_subscribe_token(encoded)


async def test_session_id_message_gives_subscribe_token() -> None:
    signaling, _ = await open_fake()
    rt = unconnected_client()
    signaling._on_event = lambda event: rt._on_signal(signaling, event)
    rt._signaling = signaling
    assert rt.subscribe_token is None
    await signaling.handle_message(SessionId("abc", "1.2.3.4", 9))
    assert rt.session_id == "abc"
    assert decode_subscribe_token(rt.subscribe_token or "") == SubscribeTarget("abc", "1.2.3.4", 9)
    await signaling.close()


async def test_subscribe_with_garbage_token_is_invalid_input() -> None:
    async with create_client("k", "http://127.0.0.1:9") as client:
        with pytest.raises(LivemorphError) as info:
            await client.realtime.subscribe("definitely-not-a-token")
    assert info.value.code is ErrorCode.INVALID_INPUT


# -- sources ------------------------------------------------------------------------------


async def test_array_track_pushes_frames_with_increasing_timestamps() -> None:
    track = ArrayVideoTrack()
    track.push(frame(10))
    track.push(frame(20))
    track.push(frame(30))  # queue of 2: the oldest is dropped
    got = [await track.recv(), await track.recv()]
    assert [int(f.to_ndarray(format="rgb24")[0, 0, 0]) for f in got] == [20, 30]
    assert got[0].pts is not None and got[1].pts is not None and got[1].pts > got[0].pts
    waiting = asyncio.create_task(track.recv())
    await asyncio.sleep(0.01)
    track.stop()
    with pytest.raises(MediaStreamError):
        await waiting


async def test_array_track_plays_a_list_at_its_fps() -> None:
    track = ArrayVideoTrack([frame(1), frame(2)], fps=50, loop=False)
    start = time.monotonic()
    first, second = await track.recv(), await track.recv()
    assert time.monotonic() - start >= 0.015  # the second frame waits one interval
    assert (first.pts, second.pts) == (0, 1800)
    assert first.width == 64 and first.height == 48
    with pytest.raises(MediaStreamError):
        await track.recv()


def test_array_track_rejects_bad_frames() -> None:
    with pytest.raises(LivemorphError):
        ArrayVideoTrack().push(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(LivemorphError):
        ArrayVideoTrack().push(np.zeros((4, 4, 5), np.uint8))


# -- against a stand-in server ------------------------------------------------------------

Handler = Callable[[ServerConnection], Awaitable[None]]


@asynccontextmanager
async def stand_in(handler: Handler) -> AsyncIterator[tuple[str, list[ServerConnection]]]:
    """A WebSocket server on localhost; yields its http base URL and the connections seen."""
    seen: list[ServerConnection] = []

    async def track(ws: ServerConnection) -> None:
        seen.append(ws)
        await handler(ws)

    async with serve(track, "127.0.0.1", 0, max_size=2**24) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}", seen


def refuse(text: str, code: int = 1008) -> Handler:
    async def handler(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "error", "error": text}))
        await ws.close(code)

    return handler


class StandInSession:
    """The publishing side of docs/protocol.md in miniature, with a real aiortc answer."""

    def __init__(self) -> None:
        self.first_messages: list[dict[str, Any]] = []
        self.pcs: list[RTCPeerConnection] = []
        self.live: list[ServerConnection] = []

    async def __call__(self, ws: ServerConnection) -> None:
        number = len(self.first_messages)
        await ws.send(
            json.dumps(
                {
                    "type": "session_id",
                    "session_id": f"s{number}",
                    "server_ip": "127.0.0.1",
                    "server_port": 1234,
                }
            )
        )
        async for raw in ws:
            message = json.loads(raw)
            kind = message["type"]
            if len(self.first_messages) == number:
                self.first_messages.append(message)
            if kind == "prompt":
                await ws.send(
                    json.dumps({"type": "prompt_ack", "prompt": message["prompt"], "success": True})
                )
            elif kind == "set_image":
                await ws.send(json.dumps({"type": "set_image_ack", "success": True}))
            elif kind == "offer":
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                self.pcs.append(pc)
                await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                pc.addTrack(VideoStreamTrack())
                await pc.setLocalDescription(await pc.createAnswer())
                await ws.send(json.dumps({"type": "answer", "sdp": pc.localDescription.sdp}))
                self.live.append(ws)
                await ws.send(json.dumps({"type": "generation_started"}))
                await ws.send(json.dumps({"type": "generation_tick", "seconds": 1}))

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()


async def test_bad_key_fails_at_once_without_retries() -> None:
    async with (
        stand_in(refuse("invalid api key")) as (base, seen),
        create_client("wrong", base) as client,
    ):
        with pytest.raises(LivemorphError) as info:
            await client.realtime.connect(ArrayVideoTrack(), model="mirage", retry=FAST)
    assert info.value.code is ErrorCode.INVALID_API_KEY
    assert len(seen) == 1


async def test_unknown_model_goes_to_the_server_and_is_model_not_found() -> None:
    async with (
        stand_in(refuse("model not found: 'nope'")) as (base, seen),
        create_client("k", base) as client,
    ):
        with pytest.raises(LivemorphError) as info:
            await client.realtime.connect(ArrayVideoTrack(), model="nope", retry=FAST)
    assert info.value.code is ErrorCode.MODEL_NOT_FOUND
    query = parse_qs(urlsplit(seen[0].request.path).query)
    assert query["model"] == ["nope"]
    assert query["api_key"] == ["k"]
    assert query["user_agent"] == [f"livemorph-python/{livemorph.__version__}"]


async def test_capacity_is_retried_with_backoff_then_reported(monkeypatch) -> None:
    policy = RetryPolicy(attempts=4, base_delay=0.05, max_delay=0.1)
    stamps: list[float] = []
    original = Signaling.open

    async def stamped(self: Signaling, ws: Any = None) -> None:
        stamps.append(time.monotonic())
        await original(self, ws)

    monkeypatch.setattr(Signaling, "open", stamped)
    capacity = refuse("Server at capacity, try again shortly", 1013)
    async with stand_in(capacity) as (base, seen), create_client("k", base) as client:
        with pytest.raises(LivemorphError) as info:
            await client.realtime.connect(ArrayVideoTrack(), model="mirage", retry=policy)
    assert "capacity" in info.value.message
    assert len(seen) == 4
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert len(gaps) == len(policy.delays()) == 3
    for gap, delay in zip(gaps, policy.delays(), strict=True):
        assert gap >= delay * 0.9


async def test_subscribe_opens_the_viewer_url_and_stops_on_invalid_session() -> None:
    token = encode_subscribe_token(SubscribeTarget("sess/1", "10.0.0.7", 8001))
    async with (
        stand_in(refuse("invalid session: sess/1")) as (base, seen),
        create_client("viewer-key", base) as client,
    ):
        with pytest.raises(LivemorphError, match="invalid session"):
            await client.realtime.subscribe(token, retry=FAST)
    assert len(seen) == 1
    url = urlsplit(seen[0].request.path)
    assert url.path == "/subscribe/sess%2F1"
    assert parse_qs(url.query) == {"IP": ["10.0.0.7"], "port": ["8001"], "api_key": ["viewer-key"]}


async def test_full_session_reconnects_with_its_last_prompt() -> None:
    server = StandInSession()
    remote: list[Any] = []
    async with stand_in(server) as (base, seen):
        client = create_client("k", base)
        rt = await client.realtime.connect(
            ArrayVideoTrack([frame()], fps=25),
            model=models.realtime("mirage"),
            on_remote_stream=remote.append,
            initial_state={"prompt": {"text": "anime", "enhance": False}},
            retry=FAST,
        )
        states: list[str] = []
        ticks: list[int] = []
        rt.on("connection_change", states.append)
        rt.on("generation_tick", lambda tick: ticks.append(tick.seconds))
        try:
            assert rt.is_connected()
            assert server.first_messages[0] == {
                "type": "prompt",
                "prompt": "anime",
                "enhance_prompt": False,
            }
            assert rt.session_id == "s0"
            assert decode_subscribe_token(rt.subscribe_token or "").port == 1234
            assert rt.video_track is not None and remote == [rt.video_track]
            assert rt.signaling is not None and rt.signaling.pc is not None
            receiver = rt.signaling.pc.getTransceivers()[0].receiver
            assert isinstance(receiver._RTCRtpReceiver__jitter_buffer, LowLatencyJitterBuffer)
            received = await asyncio.wait_for(rt.video_track.recv(), 10)
            assert (received.width, received.height) == (640, 480)
            await until(lambda: rt.get_connection_state() == "generating" and ticks == [1])

            await rt.set_prompt("noir")
            await server.live[0].close()  # the server drops the session
            await until(lambda: len(seen) == 2 and rt.get_connection_state() == "generating")
            assert "reconnecting" in states
            assert server.first_messages[1] == {
                "type": "prompt",
                "prompt": "noir",
                "enhance_prompt": True,
            }
            assert rt.session_id == "s1"
            assert len(remote) == 2 and rt.video_track is remote[1]
        finally:
            await rt.disconnect()
            await client.aclose()
            await server.close()
    assert rt.get_connection_state() == "disconnected"
    assert states[-1] == "disconnected"
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in others if "livemorph" in repr(t.get_coro())]


async def test_sent_tracks_outlive_a_reconnect_and_end_with_the_session() -> None:
    server = StandInSession()
    camera = ArrayVideoTrack([frame()], fps=25)
    async with stand_in(server) as (base, seen), create_client("k", base) as client:
        rt = await client.realtime.connect(camera, model="mirage", retry=FAST)
        try:
            await server.live[0].close()  # closing the old peer connection stops its sender
            await until(lambda: len(seen) == 2 and rt.is_connected())
            assert camera.readyState == "live", "the camera goes on to the new connection"
            assert rt.signaling is not None and rt.signaling.pc is not None
            senders = rt.signaling.pc.getSenders()
            assert [getattr(s.track, "source", None) for s in senders] == [camera]
        finally:
            await rt.disconnect()
            await server.close()
    assert camera.readyState == "ended", "and stops with the session, as before"


async def test_permanent_error_after_connect_stops_without_reconnecting() -> None:
    server = StandInSession()
    async with stand_in(server) as (base, seen):
        async with create_client("k", base) as client:
            rt = await client.realtime.connect(ArrayVideoTrack([frame()]), model="mirage")
            errors: list[LivemorphError] = []
            states: list[str] = []
            rt.on("error", errors.append)
            rt.on("connection_change", states.append)
            await asyncio.sleep(0)  # buffered connect events flush on the next loop turn
            ws = server.live[0]
            await ws.send(json.dumps({"type": "error", "error": "invalid session"}))
            await ws.close(1008)
            await until(lambda: rt.get_connection_state() == "disconnected")
            # a reconnect would have said "reconnecting" first, whatever its delay
            assert "reconnecting" not in states and len(seen) == 1
            assert [e.message for e in errors] == ["invalid session"]
            await rt.disconnect()
        await server.close()


async def test_generation_ended_is_not_followed_by_a_reconnect() -> None:
    server = StandInSession()
    async with stand_in(server) as (base, seen):
        async with create_client("k", base) as client:
            rt = await client.realtime.connect(ArrayVideoTrack([frame()]), model="mirage")
            ended: list[Any] = []
            states: list[str] = []
            rt.on("generation_ended", ended.append)
            rt.on("connection_change", states.append)
            await asyncio.sleep(0)
            ws = server.live[0]
            await ws.send(
                json.dumps(
                    {"type": "generation_ended", "seconds": 3, "reason": "insufficient_credits"}
                )
            )
            await ws.close()
            await until(lambda: rt.get_connection_state() == "disconnected")
            # a reconnect would have said "reconnecting" first, whatever its delay
            assert "reconnecting" not in states and len(seen) == 1
            assert [(e.seconds, e.reason) for e in ended] == [(3, "insufficient_credits")]
        await server.close()


# -- the avatar ---------------------------------------------------------------------------


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """int16 samples, (n,) or (n, channels), as a WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1 if samples.ndim == 1 else samples.shape[1])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes())
    return buffer.getvalue()


def ticking(step: float = 0.02) -> Callable[[], float]:
    """A clock that advances `step` each time it is read: a track paced by it never sleeps."""
    counter = itertools.count()
    return lambda: next(counter) * step


async def test_clip_track_sends_silence_then_the_clip_in_20_ms_frames() -> None:
    track = ClipAudioTrack(clock=ticking())
    frames = [await track.recv() for _ in range(2)]
    clip = np.arange(1, 2 * 960 + 481, dtype=np.int16)  # two and a half frames
    done = track.play(clip)
    frames += [await track.recv() for _ in range(2)]
    assert not done.done() and track.playing
    frames.append(await track.recv())
    assert done.done() and done.result() is True and not track.playing
    frames.append(await track.recv())
    for i, frame in enumerate(frames):
        assert (frame.samples, frame.sample_rate) == (960, 48_000)
        assert (frame.format.name, frame.layout.name) == ("s16", "mono")
        assert frame.pts == i * 960 and frame.time_base == Fraction(1, 48_000)
    sent = np.concatenate([f.to_ndarray().reshape(-1) for f in frames])
    assert not sent[: 2 * 960].any() and not sent[-960 - 480 :].any()
    assert np.array_equal(sent[2 * 960 : 2 * 960 + len(clip)], clip)


async def test_clip_track_a_new_claim_stops_the_clip_under_way() -> None:
    track = ClipAudioTrack(clock=ticking())
    first = track.play(np.ones(10 * 960, np.int16))
    await track.recv()
    claim = track.claim()
    assert first.result() is False and not track.playing
    stale = track.claim()
    assert track.play(np.ones(960, np.int16), claim).result() is False, "overtaken"
    second = track.play(np.full(960, 7, np.int16), stale)
    assert (await track.recv()).to_ndarray().max() == 7 and second.result() is True
    assert track.play(np.zeros(0, np.int16)).result() is True, "an empty clip is played out"
    third = track.play(np.ones(960, np.int16))
    track.stop()
    assert third.result() is False
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_clip_track_takes_up_the_clock_after_a_gap_instead_of_bursting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    track = ClipAudioTrack(clock=lambda: now[0])
    waits: list[float] = []

    async def sleep(seconds: float) -> None:  # the track's waits, noted rather than slept
        waits.append(seconds)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    await track.recv()
    now[0] = 5.0  # nobody pulled frames for 5 s (a reconnect)
    await track.recv()  # late: sent at once, and the clock starts again from here
    assert waits == []
    await track.recv()  # so the next frame waits its 20 ms instead of bursting 250 frames
    assert waits == [pytest.approx(0.02)]


def test_decode_audio_reads_files_bytes_and_arrays(tmp_path: Path) -> None:
    tone = (8000 * np.sin(np.arange(8000) / 5)).astype(np.int16)  # 0.5 s at 16 kHz
    wav = wav_bytes(tone, 16_000)
    path = tmp_path / "tone.wav"
    path.write_bytes(wav)
    for audio in (wav, bytearray(wav), path, str(path), io.BytesIO(wav)):
        samples = decode_audio(audio)
        assert samples.dtype == np.int16 and abs(len(samples) - 24_000) <= 960, type(audio)
        assert 5000 < np.abs(samples).max() <= 8100
    stereo = decode_audio(wav_bytes(np.stack([tone, tone], axis=1), 16_000))
    assert abs(len(stereo) - 24_000) <= 960 and np.abs(stereo).max() > 5000

    floats = np.sin(np.arange(4800) / 5).astype(np.float32) * 0.5  # 0.1 s at 48 kHz
    assert np.array_equal(decode_audio(floats, 48_000), np.round(floats * 32767).astype(np.int16))
    assert abs(len(decode_audio(floats.astype(np.float64), 24_000)) - 9600) <= 960
    two = np.stack([tone, np.zeros_like(tone)], axis=1)
    mixed = decode_audio(two, 16_000)
    assert abs(len(mixed) - 24_000) <= 960 and 3000 < np.abs(mixed).max() < 4200, "mixed to mono"
    assert np.abs(decode_audio(np.full(4800, 3.0), 48_000)).max() == 32767, "clipped to -1..1"


@pytest.mark.parametrize(
    ("audio", "rate", "message"),
    [
        (b"", None, "empty"),
        (b"not audio at all" * 20, None, "cannot decode"),
        (np.zeros(100, np.float32), None, "sample_rate is required"),
        (np.zeros(100, np.int32), 16_000, "float .* or int16"),
        (np.zeros((2, 4000), np.float32), 16_000, r"\(n, channels\)"),
        (np.zeros((4, 4, 4), np.float32), 16_000, r"\(n,\) or \(n, channels\)"),
        (np.array([0.0, np.nan]), 16_000, "finite"),
        (np.zeros(100, np.float32), 10, "out of range"),
        (np.zeros(100, np.float32), 16_000.0, "integer"),
        ("no/such/file.wav", None, "no such audio file"),
        (12345, None, "unsupported audio type"),
    ],
)
def test_decode_audio_refuses_what_it_cannot_play(audio: Any, rate: Any, message: str) -> None:
    with pytest.raises(LivemorphError, match=message) as info:
        decode_audio(audio, rate)
    assert info.value.code is ErrorCode.INVALID_INPUT


def test_sample_rate_is_refused_for_files() -> None:
    with pytest.raises(LivemorphError, match="only for numpy arrays"):
        decode_audio(wav_bytes(np.zeros(160, np.int16), 16_000), 16_000)


class AvatarStandIn:
    """A publishing server in miniature that records every message of every connection."""

    def __init__(self) -> None:
        self.messages: list[list[dict[str, Any]]] = []
        self.pcs: list[RTCPeerConnection] = []
        self.live: list[ServerConnection] = []

    async def __call__(self, ws: ServerConnection) -> None:
        seen: list[dict[str, Any]] = []
        self.messages.append(seen)
        async for raw in ws:
            message = json.loads(raw)
            seen.append(message)
            kind = message["type"]
            if kind == "prompt":
                ack = {"type": "prompt_ack", "prompt": message["prompt"], "success": True}
                await ws.send(json.dumps(ack))
            elif kind == "set_image":
                await ws.send(json.dumps({"type": "set_image_ack", "success": True}))
            elif kind == "offer":
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                self.pcs.append(pc)
                await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                pc.addTrack(VideoStreamTrack())
                await pc.setLocalDescription(await pc.createAnswer())
                await ws.send(json.dumps({"type": "answer", "sdp": pc.localDescription.sdp}))
                self.live.append(ws)

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()


def media_sections(sdp: str) -> list[tuple[str, str]]:
    """(kind, direction) of each m= section of an SDP, in order."""
    sections: list[tuple[str, str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            sections.append((line[2:].split()[0], ""))
        elif line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive") and sections:
            sections[-1] = (sections[-1][0], line[2:])
    return sections


async def test_avatar_connect_sends_portrait_prompt_offer_and_restores_them() -> None:
    server = AvatarStandIn()
    portrait = np.full((64, 48, 3), 90, np.uint8)
    async with stand_in(server) as (base, seen), create_client("k", base) as client:
        rt = await client.realtime.connect(
            None,
            model=models.realtime("live_avatar"),
            avatar={"image": portrait},
            initial_state={"prompt": {"text": "Smile warmly", "enhance": False}},
            retry=FAST,
        )
        try:
            portrait_b64 = await image_to_base64(portrait)
            first = server.messages[0]
            assert first[:2] == [
                {"type": "set_image", "image_data": portrait_b64},
                {"type": "prompt", "prompt": "Smile warmly", "enhance_prompt": False},
            ]
            assert first[2]["type"] == "offer"
            assert media_sections(first[2]["sdp"]) == [("video", "recvonly"), ("audio", "sendrecv")]

            assert await rt.play_audio(np.full(4800, 0.5, np.float32), 48_000) is True

            with pytest.raises(LivemorphError, match="needs its portrait"):
                await rt.set_image(None)
            with pytest.raises(LivemorphError, match="needs its portrait"):
                await rt.passthrough()
            await rt.set_image(PNG_BYTES)  # a new portrait replaces the first
            await server.live[0].close()  # the server drops the session
            await until(lambda: len(seen) == 2 and rt.is_connected())
            again = server.messages[1]
            assert again[:2] == [
                {"type": "set_image", "image_data": PNG_B64},
                {"type": "prompt", "prompt": "Smile warmly", "enhance_prompt": False},
            ]
            assert media_sections(again[2]["sdp"]) == [("video", "recvonly"), ("audio", "sendrecv")]
            assert await rt.play_audio(np.zeros(960, np.int16), 48_000) is True
        finally:
            await rt.disconnect()
            await server.close()
    with pytest.raises(LivemorphError, match="not connected"):
        await rt.play_audio(np.zeros(960, np.int16), 48_000)


async def test_a_dropped_connection_stops_the_clip_under_way() -> None:
    server = AvatarStandIn()
    async with stand_in(server) as (base, seen), create_client("k", base) as client:
        rt = await client.realtime.connect(
            None, model="live_avatar", avatar={"image": PNG_BYTES}, retry=FAST
        )

        def clip_under_way() -> bool:
            return rt._clip_track is not None and rt._clip_track.playing

        try:
            playing = asyncio.create_task(rt.play_audio(np.zeros(48_000 * 5, np.int16), 48_000))
            await until(clip_under_way)
            await server.live[0].close()
            assert await asyncio.wait_for(playing, 2) is False
            await until(lambda: len(seen) == 2 and rt.is_connected())
            playing = asyncio.create_task(rt.play_audio(np.zeros(48_000 * 5, np.int16), 48_000))
            await until(clip_under_way)
            rt.stop_audio()
            assert await asyncio.wait_for(playing, 1) is False
            cancelled = asyncio.create_task(rt.play_audio(np.zeros(48_000 * 5, np.int16), 48_000))
            await until(clip_under_way)
            cancelled.cancel()
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            assert rt._clip_track is not None and not rt._clip_track.playing
        finally:
            await rt.disconnect()
            await server.close()


async def test_play_audio_needs_an_avatar_without_an_audio_source() -> None:
    server = AvatarStandIn()
    async with stand_in(server) as (base, _), create_client("k", base) as client:
        own_voice = AudioStreamTrack()
        rt = await client.realtime.connect(
            own_voice, model="live_avatar", avatar={"image": PNG_BYTES}, retry=FAST
        )
        camera = await client.realtime.connect(ArrayVideoTrack([frame()]), model="mirage")
        try:
            assert media_sections(server.messages[0][-1]["sdp"]) == [
                ("video", "recvonly"),
                ("audio", "sendrecv"),
            ]
            with pytest.raises(LivemorphError, match="audio source of its own") as info:
                await rt.play_audio(wav_bytes(np.zeros(160, np.int16), 16_000))
            assert info.value.code is ErrorCode.INVALID_INPUT
            with pytest.raises(LivemorphError, match="not an avatar"):
                await camera.play_audio(wav_bytes(np.zeros(160, np.int16), 16_000))
        finally:
            await rt.disconnect()
            await camera.disconnect()
            own_voice.stop()
            await server.close()


@pytest.mark.parametrize(
    ("stream", "options", "message"),
    [
        (None, {}, "live_avatar needs a portrait"),
        (None, {"avatar": {}}, "live_avatar needs a portrait"),
        (None, {"avatar": {"photo": PNG_BYTES}}, "unknown avatar keys"),
        (None, {"avatar": PNG_BYTES}, "avatar must be a mapping"),
        (
            None,
            {"avatar": {"image": PNG_BYTES}, "initial_state": {"image": PNG_BYTES}},
            "give the portrait once",
        ),
        (ArrayVideoTrack(), {"avatar": {"image": PNG_BYTES}}, "listens to audio"),
        (None, {"avatar": {"image": np.zeros((4, 4), np.float32)}}, "uint8"),
    ],
)
async def test_avatar_arguments_are_checked_before_connecting(
    stream: Any, options: dict[str, Any], message: str
) -> None:
    client = create_client("key", "http://127.0.0.1:9")  # nothing listens on port 9
    try:
        with pytest.raises(LivemorphError, match=message) as info:
            await client.realtime.connect(stream, model="live_avatar", retry=FAST, **options)
        assert info.value.code is ErrorCode.INVALID_INPUT
        with pytest.raises(LivemorphError, match="avatar is only for live_avatar"):
            await client.realtime.connect(
                ArrayVideoTrack(), model=models.realtime("mirage"), avatar={"image": PNG_BYTES}
            )
    finally:
        await client.aclose()
