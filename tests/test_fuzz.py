"""Hostile input: hypothesis-made messages over real WebSockets to a real server, while
another session streams real video through it.

Every input must get a clear `error` (or a failed ack) or be ignored as docs/protocol.md says;
the server must never crash, the streaming session's frames must keep flowing, and the
stored data must stay consistent. The figures are printed and written to the terminal
summary (`fuzz: N cases sent, ...`) so they can be quoted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
import pytest
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode

from livemorph import create_client
from livemorph.protocol import (
    MAX_IMAGE_BYTES,
    MAX_MESSAGE_BYTES,
    SubscribeTarget,
    decode_subscribe_token,
    encode_subscribe_token,
    is_permanent_error,
)
from livemorph.server.limits import TOO_MANY_MESSAGES, TokenBucket
from livemorph.storage import Store
from livemorph.testing import LiveServer, serve
from tests.media import FrameSink, SceneTrack
from tests.support import eventually

T = TypeVar("T")

KNOWN_TYPES = ("prompt", "set_image", "offer", "ice-candidate")
SENTINEL = "fuzz-sentinel"
MAX_PROMPT_CHARS = 2000
#: Fuzz connections pace themselves under the server's default message rate (50/s).
CLIENT_RATE = 40.0
PUBLISHERS = 5

# What one message got back.
ERROR = "error"  # an `error` message
FAILED = "failed ack"  # an ack with success false, for a structural reason
REFUSED = "refused by moderation"  # an ack with success false from the moderator
OK = "ok ack"
ANSWER = "answer"
IGNORED = "ignored"
CRASH = "crash"
FAILURES = frozenset({FAILED, REFUSED})


# -- media the cases are made from ------------------------------------------------------------


def image_bytes(kind: str, size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, (30, 120, 200))
    image.putpixel((1, 1), (255, 0, 0))
    image.save(buffer, format=kind)
    return buffer.getvalue()


GOOD_IMAGES = {kind: image_bytes(kind) for kind in ("PNG", "JPEG", "WEBP")}
OTHER_FORMATS = {kind: image_bytes(kind) for kind in ("GIF", "BMP", "TIFF")}


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size: a decompression bomb's first bytes."""
    data = bytearray(GOOD_IMAGES["PNG"])
    data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = binascii.crc32(bytes(data[12:29])).to_bytes(4, "big")
    data[29:33] = crc
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- strategies -------------------------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
HUGE_STRINGS = st.builds(
    lambda char, count: char * count,
    st.sampled_from(["x", "é", " ", "\x00", '"', "\\", "\u202e", "😀", "\ufeff"]),
    st.sampled_from([3000, 100_000, 1_000_000, 2_500_000]),
)
PROMPT_TEXTS = (
    st.text(max_size=60)
    | st.sampled_from(["anime", "  ", "", "cyberpunk neon city", "n4k3d", "a" * MAX_PROMPT_CHARS])
    | st.sampled_from(["\ud800", "a\udfffb", "\x00", "\u202e\u0301", "ﷺ" * 300])
    | st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300)
)
FIELD_VALUES = JSON_VALUES | HUGE_STRINGS | PROMPT_TEXTS


@st.composite
def images(draw: st.DrawFn) -> str:
    """image_data: valid images, other formats, damaged ones, bombs, bad base64, noise."""
    kind = draw(st.sampled_from(["good", "other", "flipped", "cut", "bomb", "noise", "bad64"]))
    if kind == "good":
        return b64(GOOD_IMAGES[draw(st.sampled_from(sorted(GOOD_IMAGES)))])
    if kind == "other":
        return b64(OTHER_FORMATS[draw(st.sampled_from(sorted(OTHER_FORMATS)))])
    if kind in ("flipped", "cut"):
        data = bytearray(GOOD_IMAGES[draw(st.sampled_from(sorted(GOOD_IMAGES)))])
        if kind == "cut":
            return b64(bytes(data[: draw(st.integers(0, len(data) - 1))]))
        for _ in range(draw(st.integers(1, 6))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return b64(bytes(data))
    if kind == "bomb":
        return b64(png_claiming(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1))))
    if kind == "noise":
        return b64(draw(st.binary(max_size=300)))
    text = draw(st.text(max_size=80))
    return draw(st.sampled_from([text, "%%%" + text, "data:image/png;base64," + text, "AAA"]))


def optional(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda value: {key: value}))


def message(kind: str, *parts: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[str]:
    def build(pieces: tuple[dict[str, Any], ...]) -> str:
        body: dict[str, Any] = {"type": kind}
        for piece in pieces:
            body.update(piece)
        text = json.dumps(body, ensure_ascii=False)
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates travel escaped
            return json.dumps(body)
        return text

    return st.tuples(*parts).map(build)


CANDIDATE_LINES = st.sampled_from(
    [
        "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
        "candidate:1 1 udp 1 1.2.3.4 5 typ host",
        "candidate:x",
        "candidate:1 1 tcp 1 ::1 70000 typ host tcptype passive",
        "",
    ]
) | st.text(max_size=80)
CANDIDATES = (
    st.none()
    | JSON_VALUES
    | st.fixed_dictionaries(
        {},
        optional={
            "candidate": CANDIDATE_LINES | JSON_VALUES,
            "sdpMid": JSON_VALUES,
            "sdpMLineIndex": JSON_VALUES,
            "usernameFragment": JSON_VALUES,
        },
    )
)
EXTRA_FIELDS = st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), JSON_VALUES)

PROMPTS = message(
    "prompt",
    optional("prompt", FIELD_VALUES),
    optional("enhance_prompt", st.booleans() | JSON_VALUES),
    EXTRA_FIELDS,
)
SET_IMAGES = message(
    "set_image",
    optional("image_data", st.none() | images() | FIELD_VALUES),
    optional("prompt", st.none() | FIELD_VALUES),
    optional("enhance_prompt", st.booleans() | JSON_VALUES),
)
OFFERS = message("offer", optional("sdp", FIELD_VALUES), EXTRA_FIELDS)
ICE = message("ice-candidate", optional("candidate", CANDIDATES), EXTRA_FIELDS)
UNKNOWN = message(
    "",
    st.fixed_dictionaries(
        {"type": st.text(max_size=30).filter(lambda t: t not in KNOWN_TYPES) | HUGE_STRINGS}
    ),
    EXTRA_FIELDS,
)
NOT_OBJECTS = JSON_VALUES.filter(lambda v: not isinstance(v, dict)).map(json.dumps)
BAD_TYPES = st.dictionaries(st.just("type"), JSON_VALUES.filter(lambda v: not isinstance(v, str)))
NO_STRING_TYPE = (BAD_TYPES | EXTRA_FIELDS).map(json.dumps)
NESTED = st.builds(
    lambda depth, opener: opener * depth, st.integers(10, 200_000), st.sampled_from(["[", '{"a":'])
)
LONG_NUMBERS = st.integers(4300, 100_000).map(lambda n: '{"type": "prompt", "prompt": ' + "9" * n)
MALFORMED = (
    st.text(max_size=200).filter(lambda t: not _parses(t))
    | NESTED
    | LONG_NUMBERS.map(lambda t: t + "}")
    | st.sampled_from(["", " ", "{", '{"type": "prompt",}', "NaN", '{"type": "\\ud800"}'])
)
BINARY = st.binary(max_size=2000)


@dataclass(frozen=True)
class SdpMutation:
    """Line edits to a real offer: the SDP is known only once the test runs."""

    edits: tuple[tuple[str, int, str], ...]

    def apply(self, sdp: str) -> str:
        lines = sdp.splitlines()
        for op, index, text in self.edits:
            at = index % max(1, len(lines))
            if op == "drop" and lines:
                del lines[at]
            elif op == "dup" and lines:
                lines.insert(at, lines[at])
            elif op == "replace" and lines:
                lines[at] = text
            elif op == "insert":
                lines.insert(at, text)
            elif op == "cut":
                return "\r\n".join(lines)[: index % (len(sdp) + 1)]
        return "\r\n".join(lines) + "\r\n"


SDP_MUTATIONS = st.builds(
    SdpMutation,
    st.lists(
        st.tuples(
            st.sampled_from(["drop", "dup", "replace", "insert", "cut"]),
            st.integers(0, 10_000),
            st.text(max_size=40) | st.sampled_from(["m=video 9 UDP/TLS/RTP/SAVPF 96", "a=", "v=1"]),
        ),
        min_size=1,
        max_size=4,
    ).map(tuple),
)

Payload = str | bytes | SdpMutation


@dataclass(frozen=True)
class Case:
    target: str  # "publisher" or "viewer"
    payload: Payload


PAYLOADS = st.one_of(
    PROMPTS,
    SET_IMAGES,
    OFFERS,
    ICE,
    UNKNOWN,
    NOT_OBJECTS,
    NO_STRING_TYPE,
    MALFORMED,
    BINARY,
    SDP_MUTATIONS,
)
CASES = st.builds(Case, st.sampled_from(["publisher"] * (PUBLISHERS + 1) + ["viewer"]), PAYLOADS)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# -- what docs/protocol.md says each message must get ----------------------------------------------


def _valid_prompt(value: Any) -> bool:
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_PROMPT_CHARS:
        return False
    try:
        value.encode()  # lone surrogates are no text
    except UnicodeEncodeError:
        return False
    return True


def _decodes(data: str) -> bytes | None:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return None


def allowed(target: str, frame: str | bytes) -> frozenset[str]:
    """The outcomes docs/protocol.md allows for one frame sent on a session without media."""
    if isinstance(frame, bytes):
        return frozenset({ERROR})
    try:
        body = json.loads(frame)
    except (ValueError, RecursionError):
        return frozenset({ERROR})
    if not isinstance(body, dict) or not isinstance(body.get("type"), str):
        return frozenset({ERROR})
    kind = body["type"]
    if kind == "ice-candidate":
        candidate = body.get("candidate")
        if candidate is None or (isinstance(candidate, dict) and not candidate.get("candidate")):
            return frozenset({IGNORED})  # end of candidates
        return frozenset({ERROR})  # not an object, or before any offer
    if kind == "offer":
        sdp = body.get("sdp")
        return frozenset({ERROR, ANSWER} if isinstance(sdp, str) and sdp else {ERROR})
    if kind not in ("prompt", "set_image") or target == "viewer":
        return frozenset({ERROR})  # unknown, or a viewer trying to steer
    enhance = body.get("enhance_prompt")
    if enhance is not None and not isinstance(enhance, bool):
        return frozenset({FAILED})
    if kind == "prompt":
        return frozenset({OK, REFUSED} if _valid_prompt(body.get("prompt")) else {FAILED})
    return _set_image_outcomes(body)


def _set_image_outcomes(body: dict[str, Any]) -> frozenset[str]:
    data, prompt = body.get("image_data"), body.get("prompt")
    if data is not None and not isinstance(data, str):
        return frozenset({FAILED})
    if "prompt" in body and prompt is None and data is None:
        return frozenset({OK})  # passthrough
    if prompt is not None and not _valid_prompt(prompt):
        return frozenset({FAILED})
    moderated = {REFUSED} if prompt is not None else set()
    if data is None:
        return frozenset({OK, *moderated})
    raw = _decodes(data) if len(data) <= MAX_IMAGE_BYTES * 4 // 3 + 4 else None
    if raw is None:
        return frozenset({FAILED})
    if raw in GOOD_IMAGES.values():
        return frozenset({OK, *moderated})
    if raw in OTHER_FORMATS.values():
        return FAILURES
    return frozenset({OK, *FAILURES})  # damaged or odd: refused, unless it still decodes


def outcome(answers: list[dict[str, Any]], sent: str | bytes) -> str:
    """The one outcome of a frame, from what came back before the sentinel's answer."""
    assert len(answers) <= 1, f"one answer per message, got {answers!r}"
    if not answers:
        return IGNORED
    answer = answers[0]
    kind = answer.get("type")
    if kind == "error":
        text = answer.get("error")
        assert isinstance(text, str) and text, answer
        assert "internal" not in text, answer
        return ERROR
    if kind in ("prompt_ack", "set_image_ack"):
        if kind == "prompt_ack":
            asked = json.loads(sent).get("prompt")
            echo = asked if isinstance(asked, str) else None
            assert answer.get("prompt") == echo, "acks echo the prompt's text"
        if answer.get("success") is True:
            return OK
        assert answer.get("success") is False, answer
        text = answer.get("error")
        assert isinstance(text, str) and text, answer
        return REFUSED if "refused by moderation" in text else FAILED
    if kind == "answer":
        assert isinstance(answer.get("sdp"), str) and answer["sdp"].startswith("v=0")
        return ANSWER
    raise AssertionError(f"unexpected answer {answer!r}")


# -- the running system ------------------------------------------------------------------------


class LoopThread:
    """An event loop in a thread of its own: the streaming session keeps running between
    hypothesis examples, which the test drives from the main thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Figures:
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    crashes: list[str] = field(default_factory=list)
    rate_limited: int = 0
    flood: int = 0  # messages sent at once, not counted as cases

    def count(self, result: str, detail: str = "") -> None:
        self.sent += 1
        self.outcomes[result] += 1
        if result == CRASH:
            self.crashes.append(detail)

    @property
    def errors(self) -> int:
        return self.outcomes[ERROR] + self.outcomes[FAILED] + self.outcomes[REFUSED]

    def summary(self) -> str:
        accepted = self.outcomes[OK] + self.outcomes[ANSWER]
        closed = self.outcomes["closed as expected"]
        return (
            f"fuzz: {self.sent} cases sent, {self.errors} errors answered "
            f"({self.outcomes[REFUSED]} by moderation), {self.outcomes[IGNORED]} ignored, "
            f"{accepted} accepted, {closed} closed as expected, {len(self.crashes)} crashes; "
            f"a flood of {self.flood} messages got 1 error and went on"
        )


class Connection:
    """One fuzzing WebSocket: a publisher session without media, or a viewer of the stream."""

    def __init__(self, env: Fuzz, target: str) -> None:
        self.env = env
        self.target = target
        self.ws: ClientConnection | None = None
        self.pace = TokenBucket(CLIENT_RATE, CLIENT_RATE / 2)

    async def open(self) -> ClientConnection:
        if self.ws is None:
            if self.target == "viewer":
                url = f"{self.env.server.ws_url}/subscribe/{self.env.session_id}"
                url += f"?IP=127.0.0.1&port=1&api_key={self.env.server.api_key}"
                self.ws = await connect(url, max_size=None)
            else:
                self.ws = await connect(self.env.stream_url, max_size=None)
                first = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
                assert first["type"] == "session_id", first
        return self.ws

    async def retire(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None

    async def send(self, frame: str | bytes) -> None:
        while wait := self.pace.take():  # noqa: ASYNC110 - a rate, not an event
            await asyncio.sleep(wait)
        assert self.ws is not None
        await self.ws.send(frame)

    async def exchange(self, frame: str | bytes) -> list[dict[str, Any]]:
        """Send one frame, then a sentinel; what came back in between."""
        ws = await self.open()
        self.env.serial += 1
        sentinel = f"{SENTINEL}-{self.env.serial}"
        await self.send(frame)
        await self.send(json.dumps({"type": sentinel}))
        answers = []
        async with asyncio.timeout(60):
            while True:
                answer = json.loads(await ws.recv())
                if answer.get("type") == "error" and sentinel in answer.get("error", ""):
                    return answers
                answers.append(answer)

    async def run(self, case: Case) -> None:
        frame = case.payload
        if isinstance(frame, SdpMutation):
            frame = json.dumps({"type": "offer", "sdp": frame.apply(self.env.valid_sdp)})
        too_big = len(frame.encode() if isinstance(frame, str) else frame) > MAX_MESSAGE_BYTES
        for _ in range(3):
            try:
                answers = await self.exchange(frame)
            except ConnectionClosed as exc:
                self.ws = None
                if too_big and exc.rcvd is not None and exc.rcvd.code == 1009:
                    self.env.figures.count("closed as expected")
                else:
                    self.env.figures.count(CRASH, f"{case!r:.300}: closed {exc.rcvd}")
                return
            if any(a.get("error") == TOO_MANY_MESSAGES for a in answers):
                self.env.figures.rate_limited += 1
                await asyncio.sleep(3)  # paced too fast: wait for the bucket, resend
                continue
            break
        assert not too_big, f"a message over the size limit was taken: {_short(frame)}"
        result = outcome(answers, frame)
        self.env.figures.count(result)
        assert result in allowed(self.target, frame), (
            f"{self.target} sent {_short(frame)}: got {result} {answers!r:.300}"
        )
        if result == ANSWER:
            await self.retire()  # it has a peer connection now: start afresh


def _short(frame: Any) -> str:
    text = repr(frame)
    return text if len(text) < 300 else f"{text[:300]}... ({len(text)} chars)"


class Fuzz:
    """The server under test, the session that streams through it, and the fuzzers."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.stream_url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        self.figures = Figures()
        self.serial = 0
        self.valid_sdp = ""
        self.session_id = ""
        self.ticks: list[int] = []
        self.frame_checks: list[tuple[float, int]] = []

    async def start(self) -> None:
        self.client = create_client(api_key=self.server.api_key, base_url=self.server.base_url)
        self.rt = await self.client.realtime.connect(
            SceneTrack(320, 176), model="mirage", initial_state={"prompt": {"text": "anime"}}
        )
        self.rt.on("generation_tick", lambda tick: self.ticks.append(tick.seconds))
        self.sink = FrameSink(self.rt.video_track)
        await self.sink.fresh()
        assert self.rt.session_id
        self.session_id = self.rt.session_id
        self.offerer = RTCPeerConnection()
        self.offerer.addTrack(SceneTrack(320, 176))
        await self.offerer.setLocalDescription(await self.offerer.createOffer())
        self.valid_sdp = self.offerer.localDescription.sdp
        self.connections = [Connection(self, "publisher") for _ in range(PUBLISHERS)]
        self.connections.append(Connection(self, "viewer"))

    async def run_batch(self, cases: list[Case]) -> None:
        queues: dict[str, list[Case]] = {"publisher": [], "viewer": []}
        for case in cases:
            queues[case.target].append(case)
        publishers = self.connections[:PUBLISHERS]
        work = [
            self._drain(publishers[i], queues["publisher"][i::PUBLISHERS])
            for i in range(PUBLISHERS)
        ]
        work.append(self._drain(self.connections[-1], queues["viewer"]))
        frames, started = self.sink.count, time.monotonic()
        results = await asyncio.gather(*work, return_exceptions=True)
        self.frame_checks.append((time.monotonic() - started, self.sink.count - frames))
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _drain(self, connection: Connection, cases: list[Case]) -> None:
        for case in cases:
            await connection.run(case)

    async def stop(self) -> None:
        for connection in self.connections:
            await connection.retire()
        await self.offerer.close()
        await self.sink.close()
        await self.rt.disconnect()
        await self.client.aclose()


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # Default message limits (the flood below meets them); sessions come and go quickly here.
    flags = ("--new-session-rate", "100", "--new-session-burst", "1000")
    with serve(tmp_path_factory.mktemp("fuzz"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def fuzz(fuzz_server: LiveServer) -> Iterator[tuple[Fuzz, LoopThread]]:
    thread = LoopThread()
    env = Fuzz(fuzz_server)
    thread.run(env.start())
    try:
        yield env, thread
    finally:
        thread.run(env.stop())
        thread.close()


# -- the properties -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
# aiortc draws from `random` in the streaming session's thread while hypothesis generates.
@pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
@settings(
    max_examples=int(os.environ.get("LIVEMORPH_FUZZ_EXAMPLES", "40")),
    deadline=None,
    database=None,
    print_blob=True,
    # No shrinking: each example is a batch against a live server, and a failure already
    # names the one message that broke the rule.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases=st.lists(CASES, min_size=20, max_size=60))
def test_every_message_is_answered_or_ignored_as_the_protocol_says(
    fuzz: tuple[Fuzz, LoopThread], cases: list[Case]
) -> None:
    env, thread = fuzz
    crashes = len(env.figures.crashes)
    thread.run(env.run_batch(cases))
    assert not env.figures.crashes[crashes:], env.figures.crashes[crashes:]
    assert env.server.process.poll() is None, "the server is alive"


@pytest.mark.slow
@settings(max_examples=60, deadline=None, database=None)
@given(
    session_id=st.text(min_size=1, max_size=300).filter(lambda s: s not in (".", "..")),
    key=st.none() | st.text(max_size=300) | st.just("valid"),
)
def test_subscribe_with_a_bad_session_or_key_is_refused(
    fuzz: tuple[Fuzz, LoopThread], session_id: str, key: str | None
) -> None:
    env, thread = fuzz
    api_key = env.server.api_key if key == "valid" else key

    async def attempt() -> str:
        params = {"IP": "127.0.0.1", "port": "1"}
        if api_key is not None:
            params["api_key"] = api_key
        url = f"{env.server.ws_url}/subscribe/{quote(session_id, safe='')}?{urlencode(params)}"
        try:
            ws = await connect(url, max_size=None)
        except InvalidStatus as exc:  # an id with "/" matches no route: refused at handshake
            assert "/" in session_id and exc.response.status_code in (403, 404), exc
            return "invalid session" if key == "valid" else "invalid api key"
        async with ws:
            refusal = json.loads(await asyncio.wait_for(ws.recv(), 10))
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        return refusal["error"]

    try:
        text = thread.run(attempt())
    except ConnectionClosed as exc:  # a refusal without its message: a crash
        env.figures.count(CRASH, f"subscribe {session_id!r}: {exc}")
        raise
    env.figures.count(ERROR)
    expected = "invalid session" if key == "valid" else "invalid api key"
    assert expected in text
    assert is_permanent_error(text)


@given(st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b64(b)))
@settings(max_examples=300, database=None)
def test_subscribe_tokens_decode_or_raise_value_error(token: str) -> None:
    try:
        target = decode_subscribe_token(token)
    except ValueError:
        return
    assert decode_subscribe_token(encode_subscribe_token(target)) == target


def test_subscribe_tokens_round_trip() -> None:
    target = SubscribeTarget("abc", "10.0.0.1", 8000)
    assert decode_subscribe_token(encode_subscribe_token(target)) == target


# -- scenarios that need more than one message -------------------------------------------------


async def _expect_close(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed) as closed:
        async with asyncio.timeout(15):
            while True:
                await ws.recv()
    return closed.value.rcvd.code if closed.value.rcvd else None


async def _flood(env: Fuzz) -> None:
    """Floods: 600 messages without waiting: one `error`, the rest dropped, session alive."""
    async with connect(env.stream_url) as ws:
        await ws.recv()
        for index in range(600):
            await ws.send(json.dumps({"type": "ice-candidate", "candidate": None, "n": index}))
        env.figures.flood = 600
        await asyncio.sleep(2.5)  # the bucket refills
        await ws.send(json.dumps({"type": "prompt", "prompt": "after the flood"}))
        answers = []
        async with asyncio.timeout(15):
            while not answers or answers[-1]["type"] != "prompt_ack":
                answers.append(json.loads(await ws.recv()))
        assert [a["error"] for a in answers if a["type"] == "error"] == [TOO_MANY_MESSAGES]
        assert answers[-1]["success"] is True, "the flooded session goes on"


async def _offers(env: Fuzz) -> None:
    """A second offer is refused; an offer after invalid ones is still answered."""
    async with connect(env.stream_url, max_size=None) as ws:
        await ws.recv()
        no_ice = "".join(
            line for line in env.valid_sdp.splitlines(True) if not line.startswith("a=ice-")
        )
        for sdp in ("v=0\r\ngarbage", no_ice):
            await ws.send(json.dumps({"type": "offer", "sdp": sdp}))
            answer = json.loads(await ws.recv())
            assert "invalid offer" in answer.get("error", ""), answer
            env.figures.count(ERROR)
        await ws.send(json.dumps({"type": "offer", "sdp": env.valid_sdp}))
        assert json.loads(await ws.recv())["type"] == "answer", "a failed offer leaves no trace"
        env.figures.count(ANSWER)
        await ws.send(json.dumps({"type": "offer", "sdp": env.valid_sdp}))
        assert "already has a peer connection" in json.loads(await ws.recv())["error"]
        env.figures.count(ERROR)


async def _oversized(env: Fuzz) -> None:
    """Images over 10 MB get a failed ack; a message over the size limit closes with 1009."""
    async with connect(env.stream_url, max_size=None) as ws:
        await ws.recv()
        big = b64(os.urandom(MAX_IMAGE_BYTES + 1024))
        await ws.send(json.dumps({"type": "set_image", "image_data": big}))
        ack = json.loads(await ws.recv())
        assert ack["success"] is False and "too large" in ack["error"]
        env.figures.count(FAILED)
        await ws.send(json.dumps({"type": "prompt", "prompt": "y" * MAX_MESSAGE_BYTES}))
        assert await _expect_close(ws) == 1009
        env.figures.count("closed as expected")


async def _invalid_utf8(env: Fuzz) -> None:
    """A text frame that is not UTF-8 closes the socket with 1007 (invalid data)."""
    async with connect(env.stream_url) as ws:
        await ws.recv()
        ws.protocol.send_text(b'{"type": "prompt", "prompt": "\xff\xfe"}')
        ws.send_data()
        assert await _expect_close(ws) == 1007
        env.figures.count("closed as expected")


async def _after_close(env: Fuzz) -> None:
    """Messages after close: after our close frame, and after the server closed on us."""
    async with connect(env.stream_url) as ws:
        await ws.recv()
        ws.protocol.send_close(1000)
        ws.send_data()  # the close frame first, then frames the protocol forbids
        for text in ('{"type": "prompt", "prompt": "late"}', "{nope"):
            ws.transport.write(Frame(Opcode.TEXT, text.encode()).serialize(mask=True))
        env.figures.sent += 2
        env.figures.outcomes[IGNORED] += 2
        await _expect_close(ws)
    async with connect(env.stream_url.replace("api_key=", "api_key=lm_bad")) as ws:
        assert "invalid api key" in json.loads(await ws.recv())["error"]
        env.figures.count(ERROR)
        for _ in range(5):
            try:
                await ws.send(json.dumps({"type": "prompt", "prompt": "after the close"}))
            except ConnectionClosed:
                break
            env.figures.sent += 1
            env.figures.outcomes[IGNORED] += 1
        assert await _expect_close(ws) == 1008


async def _state_is_consistent(env: Fuzz) -> None:
    """Keys still authenticate and mint; the streaming session's seconds were recorded."""
    await eventually(lambda: bool(env.ticks))  # its first second, however early this runs
    async with httpx.AsyncClient(base_url=env.server.base_url) as http:
        assert (await http.get("/healthz")).json()["status"] == "ok"
        minted = await http.post("/v1/client/tokens", headers={"X-API-KEY": env.server.api_key})
        assert minted.status_code == 200
    url = os.environ.get("LIVEMORPH_DATABASE_URL")
    store = Store(url) if url else Store.in_data_dir(env.server.data_dir)
    await store.open()
    try:
        principal = await store.authenticate(env.server.api_key)
        assert principal is not None
        assert await store.authenticate(minted.json()["apiKey"]) is not None
        rows = {row.id: row for row in await store.session_usage(principal.key_id, limit=10_000)}
        usage = rows[env.session_id]
        assert env.ticks, "the streaming session ticked"
        assert abs(usage.seconds - env.ticks[-1]) <= 1, (usage.seconds, env.ticks[-1])
        assert usage.ended_at is None, "the streaming session still runs"
    finally:
        await store.close()


#: uvicorn logs its own refusal of a text frame that is not UTF-8 (a 1007 close) with a
#: traceback: noise from the web server, not a failure of livemorph's.
UVICORN_UTF8_REFUSAL = "Invalid UTF-8 sequence received from client."


def unexpected_tracebacks(log: str) -> list[str]:
    """The tracebacks in a server log, but for uvicorn's UTF-8 refusals."""
    found = []
    start = log.find("Traceback")
    while start >= 0:
        if UVICORN_UTF8_REFUSAL not in log[max(0, start - 200) : start]:
            found.append(log[max(0, start - 1000) : start + 3000])
        start = log.find("Traceback", start + 1)
    return found


SCENARIOS = [_flood, _offers, _oversized, _invalid_utf8, _after_close]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.__name__.strip("_"))
def test_scenarios(fuzz: tuple[Fuzz, LoopThread], scenario: Any) -> None:
    env, thread = fuzz
    frames = env.sink.count
    thread.run(scenario(env))
    thread.run(env.sink.fresh())
    assert env.sink.count > frames
    assert env.server.process.poll() is None


@pytest.mark.slow
def test_after_the_fuzz_the_stream_and_the_data_are_intact(
    fuzz: tuple[Fuzz, LoopThread], request: pytest.FixtureRequest
) -> None:
    env, thread = fuzz
    before = env.sink.count
    thread.run(env.sink.fresh(10))
    assert env.sink.count > before, "the streaming session's frames keep flowing after the fuzz"
    stalled = [check for check in env.frame_checks if check[0] >= 1.0 and check[1] == 0]
    assert not stalled, f"batches during which no frame arrived: {stalled}"
    assert env.rt.is_connected()
    thread.run(_state_is_consistent(env))
    log = env.server.log
    for sign in ("Exception in ASGI application", "message loop failed", "engine failed"):
        assert sign not in log, log[log.index(sign) - 2000 : log.index(sign) + 3000]
    assert not unexpected_tracebacks(log)
    assert env.server.process.poll() is None
    assert not env.figures.crashes
    summary = env.figures.summary()
    if env.figures.rate_limited:
        summary += f" ({env.figures.rate_limited} resent after the rate limit)"
    print(summary)
    request.node.user_properties.append(("fuzz", summary))
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(summary)


# -- regressions: what the fuzz found, each on the shared server --------------------------------


async def _session(server: LiveServer) -> ClientConnection:
    url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
    ws = await connect(url, max_size=None)
    assert json.loads(await ws.recv())["type"] == "session_id"
    return ws


async def _reply(ws: ClientConnection, frame: str) -> dict[str, Any]:
    await ws.send(frame)
    async with asyncio.timeout(20):
        return json.loads(await ws.recv())


async def _still_up(ws: ClientConnection) -> None:
    ack = await _reply(ws, json.dumps({"type": "prompt", "prompt": "still here"}))
    assert ack["type"] == "prompt_ack" and ack["success"] is True, ack


@pytest.mark.parametrize(
    "frame",
    [
        "[" * 100_000,  # json.loads raised RecursionError: the session ended without a word
        '{"type": "prompt", "prompt": ' + "9" * 5000 + "}",  # ValueError: too many digits
    ],
    ids=["deep-nesting", "long-number"],
)
async def test_json_that_python_cannot_read_is_an_error_not_a_dead_session(
    server: LiveServer, frame: str
) -> None:
    ws = await _session(server)
    try:
        answer = await _reply(ws, frame)
        assert answer == {"type": "error", "error": "invalid message: not valid JSON"}
        await _still_up(ws)
    finally:
        await ws.close()


@pytest.mark.parametrize(
    "message",
    [
        {"type": "prompt", "prompt": "a\ud800b"},
        {"type": "set_image", "image_data": None, "prompt": "\udfff"},
    ],
)
async def test_a_prompt_with_a_lone_surrogate_is_refused(
    server: LiveServer, message: dict[str, Any]
) -> None:
    """The neural engine's tokenizer raised on it, which ended the session."""
    ws = await _session(server)
    try:
        ack = await _reply(ws, json.dumps(message))
        assert ack["success"] is False and "valid Unicode" in ack["error"], ack
        if message["type"] == "prompt":
            assert ack["prompt"] == message["prompt"], "the ack still echoes the prompt"
        await _still_up(ws)
    finally:
        await ws.close()


async def test_an_offer_without_media_is_refused_and_a_good_one_follows(
    server: LiveServer,
) -> None:
    """An offer of "v=0\\r\\ngarbage" parsed as one of nothing and was answered; and any
    refused offer left its peer connection behind, so the next offer was refused too."""
    offerer = RTCPeerConnection()
    offerer.addTrack(SceneTrack(320, 176))
    await offerer.setLocalDescription(await offerer.createOffer())
    ws = await _session(server)
    try:
        for sdp, words in (("v=0\r\ngarbage", "no video"), ("v=0\r\nm=", "invalid offer")):
            answer = await _reply(ws, json.dumps({"type": "offer", "sdp": sdp}))
            assert answer["type"] == "error" and words in answer["error"], answer
        answer = await _reply(
            ws, json.dumps({"type": "offer", "sdp": offerer.localDescription.sdp})
        )
        assert answer["type"] == "answer" and "m=video" in answer["sdp"]
        again = await _reply(ws, json.dumps({"type": "offer", "sdp": offerer.localDescription.sdp}))
        assert "already has a peer connection" in again["error"]
        await _still_up(ws)
    finally:
        await ws.close()
        await offerer.close()


class RecordingChannel:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.closed: int | None = None

    async def error(self, text: str) -> None:
        self.errors.append(text)

    async def close(self, code: int = 1000) -> None:
        self.closed = code


async def test_a_failing_message_loop_is_logged_and_closes_with_1011(caplog) -> None:
    """It used to end the session with a normal close and nothing in the log."""
    from livemorph.server.stream import _until_either

    async def broken() -> None:
        raise KeyError("a bug")

    channel = RecordingChannel()
    await _until_either(channel, broken(), asyncio.Event())  # type: ignore[arg-type]
    assert channel.closed == 1011
    assert channel.errors == ["internal server error, try again"]
    assert not is_permanent_error(channel.errors[0]), "clients reconnect"
    assert "message loop failed" in caplog.text and "a bug" in caplog.text

    async def leaves() -> None:
        return None

    quiet = RecordingChannel()
    await _until_either(quiet, leaves(), asyncio.Event())  # type: ignore[arg-type]
    assert quiet.closed is None and not quiet.errors


async def test_an_engine_that_fails_on_controls_refuses_them_in_the_ack() -> None:
    from types import SimpleNamespace

    from livemorph.engines.base import Controls
    from livemorph.sessions.pipeline import SessionClosedError
    from livemorph.sessions.session import InputRefused, Session

    class Failing:
        def __init__(self, error: Exception) -> None:
            self.error = error

        async def apply(self, controls: Controls) -> None:
            raise self.error

    def session(error: Exception) -> Any:
        return SimpleNamespace(pipeline=Failing(error), controls=Controls())

    with pytest.raises(InputRefused, match=r"^the engine could not apply this input$"):
        await Session.apply(session(TypeError("tokenizer")), Controls(prompt="x"))
    with pytest.raises(SessionClosedError):
        await Session.apply(session(SessionClosedError("closed")), Controls())


async def test_a_session_that_ends_under_a_pending_input_closes_quietly() -> None:
    """A prompt waiting on the engine when credits ran out (or max_duration, or shutdown)
    used to surface as "message loop failed" and a 1011 close, hiding the real reason."""

    from livemorph.protocol import ClientMessage, ServerMessage
    from livemorph.server.stream import _parse, _publisher_loop
    from livemorph.sessions.pipeline import SessionClosedError

    class Ending:
        async def set_prompt(self, prompt: str, enhance: bool | None = None) -> str | None:
            raise SessionClosedError("the session ended")

    class Recording:
        def __init__(self) -> None:
            self.sent: list[ServerMessage | dict[str, Any]] = []

        async def messages(self) -> Any:
            yield json.dumps({"type": "prompt", "prompt": "anime"})
            yield json.dumps({"type": "prompt", "prompt": "never read: the loop has ended"})

        async def receive(self, frame: str | bytes) -> ClientMessage:
            return await _parse(frame)

        async def send(self, message: ServerMessage) -> None:
            self.sent.append(message)

        async def error(self, text: str) -> None:
            self.sent.append({"type": "error", "error": text})

    channel = Recording()
    await _publisher_loop(channel, Ending())  # type: ignore[arg-type]
    assert channel.sent == [], "no ack and no error: `stream` tells the client why it ended"
