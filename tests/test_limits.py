"""Limits: sessions per node and per key, rates of new sessions, token mints and messages,
and the largest WebSocket message; against a real server started with small limits."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from livemorph import RetryPolicy, create_client
from livemorph.cli import build_parser, settings_from_args
from livemorph.config import Settings
from livemorph.errors import error_from_server_text
from livemorph.protocol import is_permanent_error
from livemorph.server.limits import (
    AT_CAPACITY,
    TOO_MANY_MESSAGES,
    TOO_MANY_NEW_SESSIONS,
    TOO_MANY_SESSIONS,
    Limits,
    MemoryRateLimiter,
    MessageGate,
    TokenBucket,
    Unlimited,
    rate_limiter,
    retry_after,
)
from livemorph.server.state import AppState
from livemorph.sessions import SessionRegistry
from livemorph.storage import Principal, Store
from livemorph.testing import LiveServer, serve
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack
from tests.support import FakeClock, eventually

CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_MESSAGE_TOO_BIG = 1009
MAX_MESSAGE_BYTES = 300_000

LIMIT_FLAGS = (
    "--engine",
    "passthrough",
    "--max-sessions",
    "3",
    "--max-sessions-per-key",
    "2",
    "--new-session-rate",
    "0.1",
    "--new-session-burst",
    "6",
    "--token-mint-rate",
    "0.05",
    "--token-mint-burst",
    "3",
    "--message-rate",
    "20",
    "--message-burst",
    "40",
    "--max-message-bytes",
    str(MAX_MESSAGE_BYTES),
)


# -- the pieces, without a server ----------------------------------------------------------


def test_token_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, burst=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5), "one token comes back in 1/rate seconds"
    clock.advance(0.25)
    assert bucket.take() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.take() == 0.0
    clock.advance(3600)
    assert bucket.full
    assert [bucket.take() for _ in range(4)][-1] > 0, "refills only up to the burst"


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0), (1, 0.5)])
def test_token_bucket_refuses_impossible_figures(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


async def test_memory_limiter_keeps_one_bucket_per_name_and_forgets_idle_ones() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(rate=1.0, burst=2, clock=clock)
    assert [await limiter.acquire("a") for _ in range(3)][:2] == [0.0, 0.0]
    assert await limiter.acquire("a") > 0
    assert await limiter.acquire("b") == 0.0, "another key has its own bucket"
    for index in range(MemoryRateLimiter.SWEEP_AT):
        await limiter.acquire(f"key-{index}")
    clock.advance(10)  # every bucket refills
    await limiter.acquire("new")
    assert len(limiter) == 1, "refilled buckets are dropped once there are many"


async def test_a_rate_of_zero_switches_the_limit_off() -> None:
    limiter = rate_limiter(0, 0)
    assert isinstance(limiter, Unlimited)
    assert [await limiter.acquire("k") for _ in range(1000)] == [0.0] * 1000
    gate = MessageGate(0, 0)
    assert all(gate.admit() == (True, False) for _ in range(1000))


def test_message_gate_drops_the_excess_and_says_so_once_per_flood() -> None:
    clock = FakeClock()
    gate = MessageGate(rate=10, burst=5, clock=clock, notice_every=5.0)
    decisions = [gate.admit() for _ in range(100)]
    assert decisions[:5] == [(True, False)] * 5
    assert decisions[5] == (False, True), "the first drop is announced"
    assert decisions[6:] == [(False, False)] * 94, "the rest of the flood is dropped quietly"
    assert gate.dropped == 95
    clock.advance(0.1)
    assert gate.admit() == (True, False), "a sender that slows down gets through again"
    clock.advance(6)
    assert [gate.admit() for _ in range(6)][-1] == (False, True), "a later flood is told again"


def test_refusal_texts_are_transient_for_every_client() -> None:
    for text in (AT_CAPACITY, TOO_MANY_SESSIONS, TOO_MANY_NEW_SESSIONS, TOO_MANY_MESSAGES):
        assert not is_permanent_error(text), text
        assert not error_from_server_text(text).permanent, text
    assert "Server at capacity" in AT_CAPACITY
    assert retry_after(0.01) == 1 and retry_after(2.2) == 3


class FakeSession:
    def __init__(self, key_id: str) -> None:
        self.id = f"{key_id}-{id(self)}"
        self.principal = Principal(key_id=key_id)


async def test_sessions_are_counted_per_key_and_per_node() -> None:
    registry = SessionRegistry(max_sessions=3)
    limits = Limits(
        max_sessions_per_key=2,
        new_sessions=Unlimited(),
        token_mints=Unlimited(),
        message_rate=0,
        message_burst=0,
    )
    a1, a2, b1 = FakeSession("a"), FakeSession("a"), FakeSession("b")
    for session in (a1, a2):
        assert await limits.refuse_session("a", registry) is None
        registry.add(session)  # type: ignore[arg-type]
    assert await limits.refuse_session("a", registry) == TOO_MANY_SESSIONS
    assert await limits.refuse_session("b", registry) is None
    registry.add(b1)  # type: ignore[arg-type]
    assert await limits.refuse_session("c", registry) == AT_CAPACITY
    registry.remove(a1)  # type: ignore[arg-type]
    registry.remove(a1)  # type: ignore[arg-type]  # twice: counted once
    assert registry.count_for_key("a") == 1
    assert await limits.refuse_session("a", registry) is None
    registry.remove(a2)  # type: ignore[arg-type]
    assert registry.count_for_key("a") == 0 and len(registry) == 1


async def test_a_spent_rate_refuses_new_sessions_of_that_key_only() -> None:
    limits = Limits(
        max_sessions_per_key=None,
        new_sessions=MemoryRateLimiter(rate=0.001, burst=2),
        token_mints=Unlimited(),
        message_rate=0,
        message_burst=0,
    )
    registry = SessionRegistry()
    assert [await limits.refuse_session("a", registry) for _ in range(3)] == [
        None,
        None,
        TOO_MANY_NEW_SESSIONS,
    ]
    assert await limits.refuse_session("b", registry) is None


def test_limits_come_from_the_environment_and_flags_win(monkeypatch) -> None:
    monkeypatch.setenv("LIVEMORPH_MAX_SESSIONS", "7")
    monkeypatch.setenv("LIVEMORPH_MESSAGE_RATE", "12.5")
    monkeypatch.setenv("LIVEMORPH_MAX_SESSIONS_PER_KEY", "0")
    settings = Settings.from_env()
    assert (settings.max_sessions, settings.message_rate) == (7, 12.5)
    assert Limits.from_settings(settings).max_sessions_per_key is None, "0 is off"
    args = build_parser().parse_args(["serve", "--max-sessions", "2", "--token-mint-burst", "9"])
    from_flags = settings_from_args(args)
    assert (from_flags.max_sessions, from_flags.token_mint_burst) == (2, 9)
    assert from_flags.message_rate == 12.5, "what no flag names still comes from the env"


@pytest.mark.parametrize("value", ["-1", "lots", "nan"])
def test_bad_limit_values_are_refused_by_name(monkeypatch, value: str) -> None:
    monkeypatch.setenv("LIVEMORPH_MESSAGE_BURST", value)
    with pytest.raises(ValueError, match="LIVEMORPH_MESSAGE_BURST"):
        Settings.from_env()
    monkeypatch.delenv("LIVEMORPH_MESSAGE_BURST")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-sessions", value])


# -- a real server with small limits -------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("limited"), *LIMIT_FLAGS) as live:
        yield live


async def new_key(server: LiveServer, name: str) -> str:
    """A key of its own for each test, so their per-key budgets do not meet; written to the
    server's database as `livemorph keys create` would, without a process per key."""
    url = os.environ.get("LIVEMORPH_DATABASE_URL")
    store = Store(url) if url else Store.in_data_dir(server.data_dir)
    await store.open()
    try:
        secret, _ = await store.create_api_key(name)
    finally:
        await store.close()
    return secret


def stream_url(server: LiveServer, key: str, model: str = "mirage") -> str:
    return f"{server.ws_url}/v1/stream?api_key={key}&model={model}"


async def recv_json(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(10):
        return json.loads(await ws.recv())


async def refusal(url: str) -> tuple[str, int | None]:
    """The `error` a refused session gets, and the close code that follows it."""
    async with connect(url) as ws:
        message = await recv_json(ws)
        assert message["type"] == "error", message
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    return message["error"], closed.value.rcvd.code if closed.value.rcvd else None


class Sessions:
    """Raw publishing sessions held open until the test lets go of them."""

    def __init__(self) -> None:
        self.open: list[ClientConnection] = []

    async def start(self, url: str) -> ClientConnection:
        ws = await connect(url)
        message = await recv_json(ws)
        assert message["type"] == "session_id", message
        self.open.append(ws)
        return ws

    async def stop(self, ws: ClientConnection) -> None:
        self.open.remove(ws)
        await ws.close()


@pytest.fixture
async def sessions(limited: LiveServer) -> AsyncIterator[Sessions]:
    held = Sessions()
    try:
        yield held
    finally:
        for ws in held.open:
            await ws.close()
        assert await asyncio.to_thread(limited.wait_sessions, 0) == 0


async def test_sessions_per_key_then_per_node(limited: LiveServer, sessions: Sessions) -> None:
    key_a, key_b = await new_key(limited, "a"), await new_key(limited, "b")
    first = await sessions.start(stream_url(limited, key_a))
    await sessions.start(stream_url(limited, key_a))
    text, code = await refusal(stream_url(limited, key_a))
    assert (text, code) == (TOO_MANY_SESSIONS, CLOSE_TRY_AGAIN_LATER)

    async with httpx.AsyncClient(base_url=limited.base_url) as http:
        minted = await http.post("/v1/client/tokens", headers={"X-API-KEY": key_a})
    token = minted.json()["apiKey"]
    assert await refusal(stream_url(limited, token)) == (TOO_MANY_SESSIONS, 1013), (
        "a client token counts for the key that minted it"
    )

    await sessions.start(stream_url(limited, key_b))  # the node's third and last
    text, code = await refusal(stream_url(limited, key_b))
    assert (text, code) == (AT_CAPACITY, CLOSE_TRY_AGAIN_LATER)
    assert not is_permanent_error(text)

    await sessions.stop(first)
    await asyncio.to_thread(limited.wait_sessions, 2)
    await sessions.start(stream_url(limited, token))  # a freed place is taken again
    assert limited.process.poll() is None


async def test_new_sessions_per_key_are_rate_limited(
    limited: LiveServer, sessions: Sessions
) -> None:
    key, other = await new_key(limited, "hasty"), await new_key(limited, "patient")
    for _ in range(6):  # the burst
        ws = await sessions.start(stream_url(limited, key))
        await sessions.stop(ws)
        assert await asyncio.to_thread(limited.wait_sessions, 0) == 0
    text, code = await refusal(stream_url(limited, key))
    assert (text, code) == (TOO_MANY_NEW_SESSIONS, CLOSE_TRY_AGAIN_LATER)
    assert not is_permanent_error(text)
    await sessions.start(stream_url(limited, other))  # other keys are not held back


async def test_token_minting_is_rate_limited_with_retry_after(limited: LiveServer) -> None:
    key, other = await new_key(limited, "minter"), await new_key(limited, "other-minter")
    async with httpx.AsyncClient(base_url=limited.base_url) as http:
        statuses = [
            (await http.post("/v1/client/tokens", headers={"X-API-KEY": key})).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 200]
        refused = await http.post("/v1/client/tokens", headers={"X-API-KEY": key}, json={})
        assert refused.status_code == 429
        assert int(refused.headers["Retry-After"]) >= 1
        assert "rate limit" in refused.json()["error"]
        assert not is_permanent_error(refused.json()["error"])
        assert (
            await http.post("/v1/client/tokens", headers={"X-API-KEY": other})
        ).status_code == 200
        bad = await http.post("/v1/client/tokens", headers={"X-API-KEY": "lm_nope"})
        assert bad.status_code == 401, "a bad key is refused before any rate is counted"


async def test_the_sdk_retries_a_full_key_until_a_place_frees(
    limited: LiveServer, sessions: Sessions
) -> None:
    key = await new_key(limited, "retrying")
    held = [await sessions.start(stream_url(limited, key)) for _ in range(2)]
    refusals = limited.log.count(TOO_MANY_SESSIONS)
    async with create_client(api_key=key, base_url=limited.base_url) as client:
        connecting = asyncio.create_task(
            client.realtime.connect(
                SceneTrack(320, 176),
                model="mirage",
                retry=RetryPolicy(attempts=5, base_delay=0.5, max_delay=1.0),
            )
        )
        await eventually(lambda: limited.log.count(TOO_MANY_SESSIONS) > refusals)
        assert not connecting.done(), "a transient refusal is retried, not raised"
        await sessions.stop(held[0])
        async with asyncio.timeout(20):
            rt = await connecting
        try:
            assert rt.is_connected()
        finally:
            await rt.disconnect()


async def test_a_message_flood_is_dropped_with_one_error_and_frames_keep_flowing(
    tmp_path,
) -> None:
    """In-process, on a clock the test moves: at one message in 100 s, only the test's
    clock refills the bucket in the time the test takes."""
    settings = Settings(
        data_dir=tmp_path, engine="passthrough", message_rate=0.01, message_burst=40
    )
    async with (
        serve_in_process(settings) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        rt = await client.realtime.connect(SceneTrack(320, 176), model="mirage")
        errors: list[str] = []
        rt.on("error", lambda error: errors.append(error.message))
        output = FrameSink(rt.video_track)
        try:
            await output.fresh()
            signaling = rt.signaling
            assert signaling is not None
            for index in range(300):
                await signaling.send_raw({"type": "ice-candidate", "candidate": None, "n": index})
            before = output.count
            await eventually(lambda: output.count > before + 10)
            await eventually(lambda: TOO_MANY_MESSAGES in errors)
            server.clock.advance(1000)  # ten messages' worth: what follows is within the rate
            await rt.set_prompt("after the flood")
            assert errors == [TOO_MANY_MESSAGES], "one error for the whole flood"
            assert rt.is_connected()
        finally:
            await output.close()
            await rt.disconnect()
        await eventually(lambda: len(server.state.sessions) == 0)


async def test_an_oversized_message_closes_with_1009_and_a_reason(limited: LiveServer) -> None:
    key = await new_key(limited, "big")
    async with connect(stream_url(limited, key), max_size=None) as ws:
        assert (await recv_json(ws))["type"] == "session_id"
        await ws.send(json.dumps({"type": "prompt", "prompt": "x" * (MAX_MESSAGE_BYTES + 1)}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_MESSAGE_TOO_BIG
    assert "exceeds limit" in closed.value.rcvd.reason
    assert await asyncio.to_thread(limited.wait_sessions, 0) == 0
    async with connect(stream_url(limited, key)) as ws:  # the key and the node are fine
        assert (await recv_json(ws))["type"] == "session_id"
        await ws.send(json.dumps({"type": "prompt", "prompt": "x" * (MAX_MESSAGE_BYTES // 2)}))
        ack = await recv_json(ws)
        assert ack["type"] == "prompt_ack" and "too long" in ack["error"]
    assert "Traceback" not in limited.log


def test_the_server_state_takes_its_limits_from_the_settings(tmp_path) -> None:
    settings = Settings(data_dir=tmp_path, max_sessions=2, max_sessions_per_key=1)
    settings.new_session_rate = 0
    state = AppState.from_settings(settings)
    try:
        assert state.sessions.max_sessions == 2
        assert state.limits.max_sessions_per_key == 1
        assert isinstance(state.limits.new_sessions, Unlimited)
        assert isinstance(state.limits.token_mints, MemoryRateLimiter)
    finally:
        state.executor.shutdown()
