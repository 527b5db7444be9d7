"""The wire protocol of docs/protocol.md, in one place for the server and the Python SDK.

Each message either side sends is one frozen dataclass below, named after its `type`, that
knows its own fields: `parse_client` and `parse_server` turn a WebSocket text frame into one
of them (or raise `MessageError` with the protocol's words for what is wrong), and
`serialise` turns one back into text. No other module reads a message's raw fields.

The constants the browser SDK (web/sdk/livemorph.js) repeats are checked against these by
tests/test_protocol.py.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import ClassVar, Final, Self

from aiortc import RTCIceCandidate, RTCIceServer
from aiortc.sdp import candidate_from_sdp

#: Error texts containing any of these end a client's retries (case-insensitive).
PERMANENT_ERROR_MARKERS = (
    "permission denied",
    "not allowed",
    "invalid session",
    "401",
    "invalid api key",
    "unauthorized",
)

#: `generation_ended` reasons after which a client must not reconnect: the account or the
#: token says no. Others (`server_shutdown`, a dropped connection) are worth a reconnect.
FINAL_END_REASONS = frozenset({"insufficient_credits", "max_duration"})

#: Largest decoded reference image a client may send.
MAX_IMAGE_BYTES = 10 * 1024 * 1024
#: What every uploaded file's id starts with (`/v1/files`): Decart's SDK sends a string that
#: does as `set_image`'s `image_ref`, any other as base64 in `image_data`.
FILE_ID_PREFIX: Final = "file_"

#: Largest WebSocket message either side accepts: a 10 MB image grows by 4/3 in base64,
#: plus the JSON around it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: Longest prompt, in characters.
MAX_PROMPT_CHARS = 2000

#: How long the published clients wait for a `prompt_ack`, and for a `set_image_ack`.
PROMPT_ACK_TIMEOUT = 15.0
IMAGE_ACK_TIMEOUT = 30.0

#: WebSocket close codes (docs/protocol.md, "Close codes").
CLOSE_NORMAL = 1000
#: After a fatal `error` with a permanent marker.
CLOSE_POLICY_VIOLATION = 1008
#: A server bug, after `internal server error, try again`.
CLOSE_INTERNAL_ERROR = 1011
#: A transient refusal: capacity or session-rate limits.
CLOSE_TRY_AGAIN_LATER = 1013

IMAGE_TOO_LARGE: Final = f"image too large: the limit is {MAX_IMAGE_BYTES // 2**20} MB"


def is_permanent_error(text: str) -> bool:
    """True when a client must not retry after an error with this text."""
    lowered = text.lower()
    return any(marker in lowered for marker in PERMANENT_ERROR_MARKERS)


# -- errors ---------------------------------------------------------------------------------


class MessageError(ValueError):
    """A message that does not follow docs/protocol.md; `str()` says what is wrong."""


class ClientError(MessageError):
    """Something a client got wrong. The server answers with `reply` (an `error` unless
    the protocol answers that request with a failed ack) and the session goes on."""

    def __init__(self, text: str, reply: ServerMessage | None = None) -> None:
        super().__init__(text)
        self.reply: ServerMessage = Error(text) if reply is None else reply


class UnknownMessage(ClientError):
    """A `type` this side does not take (here, or at all); `kind` is that type."""

    def __init__(self, kind: str) -> None:
        super().__init__(f"unknown message type {kind!r}")
        self.kind = kind


def check_prompt(value: object) -> str:
    """`value` once it is a prompt the protocol takes; else ValueError saying why."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("prompt must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800" in JSON): the tokenizers refuse it
        raise ValueError("prompt must be valid Unicode text: it has a lone surrogate") from None
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt too long: the limit is {MAX_PROMPT_CHARS} characters")
    return value


class _Fields:
    """One message's JSON object, read with the protocol's words for what is wrong."""

    def __init__(
        self, kind: str, data: Mapping[str, object], fail: Callable[[str], MessageError]
    ) -> None:
        self.kind = kind
        self.data = data
        self.fail = fail

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str) -> object:
        return self.data.get(key)

    def text(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value:
            raise self.fail(f"{self.kind} needs a string '{key}'")
        return value

    def optional_text(self, key: str) -> str | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, str):
            raise self.fail(f"{key} must be a string or null")
        return value

    def flag(self, key: str) -> bool | None:
        """A boolean; None when absent or null (the default applies)."""
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false")
        return value

    def whole(self, key: str) -> int:
        value = self.data.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(f"{self.kind} needs a whole number '{key}'")
        return value


# -- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One JSON message; subclasses name their `type` and read and write their fields."""

    type: ClassVar[str]

    def body(self) -> dict[str, object]:
        """The fields on the wire, `type` aside. By default every field, as it is named."""
        return {field.name: getattr(self, field.name) for field in fields(self)}

    @classmethod
    def read(cls, message: _Fields) -> Self:
        """The message from its fields; raises `message.fail(...)` on a field that is wrong."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Candidate:
    """A trickled ICE candidate in the browser's `RTCIceCandidateInit` form (its field names)."""

    candidate: str
    sdpMid: str | None = None
    sdpMLineIndex: int | None = None
    usernameFragment: str | None = None

    def to_aiortc(self) -> RTCIceCandidate:
        """aiortc's candidate; ValueError (or IndexError) on a line that does not parse."""
        parsed = candidate_from_sdp(self.candidate.strip().removeprefix("candidate:"))
        parsed.sdpMid = self.sdpMid
        parsed.sdpMLineIndex = self.sdpMLineIndex
        return parsed


# Client to server.


@dataclass(frozen=True, slots=True)
class Prompt(Message):
    """Restyle by this text from the next frame on; answered by `prompt_ack`."""

    type: ClassVar[str] = "prompt"
    prompt: str
    #: Let the enhancer or engine read a fuller look into the prompt; None: yes (default).
    enhance_prompt: bool | None = None

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"prompt": self.prompt}
        if self.enhance_prompt is not None:
            body["enhance_prompt"] = self.enhance_prompt
        return body

    @classmethod
    def read(cls, message: _Fields) -> Self:
        raw = message.get("prompt")
        echo = raw if isinstance(raw, str) else None

        def refuse(text: str) -> ClientError:
            return ClientError(text, PromptAck(echo, success=False, error=text))

        try:
            prompt = check_prompt(raw)
        except ValueError as exc:
            raise refuse(str(exc)) from None
        return cls(prompt, _Fields(message.kind, message.data, refuse).flag("enhance_prompt"))


@dataclass(frozen=True, slots=True)
class SetImage(Message):
    """Set or clear the reference image, maybe with a prompt; answered by `set_image_ack`.

    On the wire the image is `image_data`, bare base64 of the file; here it is the file's
    bytes, checked against `MAX_IMAGE_BYTES`. Or it is `image_ref`, the id of a file uploaded
    to `/v1/files` (`file_...`), whose bytes the server reads itself.
    """

    type: ClassVar[str] = "set_image"
    #: The image file (PNG, JPEG, WebP); None clears the reference image.
    image: bytes | None
    #: A new prompt with the image; None keeps the current one.
    prompt: str | None = None
    #: None keeps the session's current setting.
    enhance_prompt: bool | None = None
    #: `image_data: null` with an explicit `prompt: null`: no transformation at all.
    passthrough: bool = False
    #: `image_ref`: an uploaded file's id, for the server to read (`image` is None then).
    image_ref: str | None = None

    def body(self) -> dict[str, object]:
        data = None if self.image is None else base64.b64encode(self.image).decode("ascii")
        body: dict[str, object] = (
            {"image_ref": self.image_ref} if self.image_ref is not None else {"image_data": data}
        )
        if self.passthrough:
            body["prompt"] = None
        elif self.prompt is not None:
            body["prompt"] = self.prompt
        if self.enhance_prompt is not None and not self.passthrough:
            body["enhance_prompt"] = self.enhance_prompt
        return body

    @classmethod
    def read(cls, message: _Fields) -> Self:
        def refuse(text: str) -> ClientError:
            return ClientError(text, SetImageAck(success=False, error=text))

        fields = _Fields(message.kind, message.data, refuse)
        data = fields.get("image_data")
        if data is not None and not isinstance(data, str):
            raise refuse("image_data must be a base64 string or null")
        enhance = fields.flag("enhance_prompt")
        ref = fields.get("image_ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith(FILE_ID_PREFIX)):
            raise refuse(f"image_ref must be a file id ({FILE_ID_PREFIX}...) from /v1/files")
        if ref is None and data is None and fields.has("prompt") and fields.get("prompt") is None:
            return cls(None, enhance_prompt=enhance, passthrough=True)
        prompt = None
        if fields.get("prompt") is not None:
            try:
                prompt = check_prompt(fields.get("prompt"))
            except ValueError as exc:
                raise refuse(str(exc)) from None
        if ref is not None:
            return cls(None, prompt, enhance, image_ref=ref)
        image = None if data is None else _image_bytes(data, refuse)
        return cls(image, prompt, enhance)


def _image_bytes(data: str, refuse: Callable[[str], ClientError]) -> bytes:
    """The file in `image_data`; its size checked before and after decoding base64."""
    if len(data) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise refuse(IMAGE_TOO_LARGE)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise refuse("image_data is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise refuse(IMAGE_TOO_LARGE)
    return raw


@dataclass(frozen=True, slots=True)
class Offer(Message):
    """The client's SDP offer; answered by `answer`, or an `error`."""

    type: ClassVar[str] = "offer"
    sdp: str

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.text("sdp"))


@dataclass(frozen=True, slots=True)
class IceCandidate(Message):
    """A trickled candidate; None (or an empty candidate line) is the end of candidates."""

    type: ClassVar[str] = "ice-candidate"
    candidate: Candidate | None

    def body(self) -> dict[str, object]:
        if self.candidate is None:
            return {"candidate": None}
        # decart==0.0.30 needs sdpMid and sdpMLineIndex present, null or not.
        return {"candidate": {f.name: getattr(self.candidate, f.name) for f in fields(Candidate)}}

    @classmethod
    def read(cls, message: _Fields) -> Self:
        payload = message.get("candidate")
        if payload is None:
            return cls(None)
        if not isinstance(payload, dict):
            raise message.fail("ice-candidate needs a candidate object or null")
        inner = _Fields(message.kind, payload, _invalid_candidate(message))
        if not inner.get("candidate"):
            return cls(None)  # an empty line also ends the candidates
        line = inner.optional_text("candidate") or ""
        mid = inner.optional_text("sdpMid")
        fragment = inner.optional_text("usernameFragment")
        index = inner.get("sdpMLineIndex")
        if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
            raise inner.fail("sdpMLineIndex must be a whole number or null")
        if not line.strip():
            return cls(None)
        return cls(Candidate(line, mid, index, fragment))


@dataclass(frozen=True, slots=True)
class LiveKitJoin(Message):
    """Carry this session's media over a LiveKit room instead of `offer`: answered by
    `livekit_room_info` (after `queue_position` updates while the node is full). Sent by
    the published clients that speak LiveKit (`decart>=0.1`, `@decartai/sdk>=0.1`)."""

    type: ClassVar[str] = "livekit_join"
    #: The browser client's "no initial state: pass the camera through"; None: not said.
    passthrough: bool | None = None

    def body(self) -> dict[str, object]:
        return {} if self.passthrough is None else {"passthrough": self.passthrough}

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.flag("passthrough"))


def _invalid_candidate(message: _Fields) -> Callable[[str], MessageError]:
    return lambda text: message.fail(f"invalid ice-candidate: {text}")


# Server to client.


@dataclass(frozen=True, slots=True)
class SessionId(Message):
    """The session exists; `server_ip` and `server_port` name the node that holds it."""

    type: ClassVar[str] = "session_id"
    session_id: str
    server_ip: str
    server_port: int

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(
            message.text("session_id"), message.text("server_ip"), message.whole("server_port")
        )


@dataclass(frozen=True, slots=True)
class Answer(Message):
    """The server's SDP answer to an `offer`."""

    type: ClassVar[str] = "answer"
    sdp: str

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.text("sdp"))


@dataclass(frozen=True, slots=True)
class LiveKitRoomInfo(Message):
    """Where this session's media goes: the LiveKit URL of the node serving it, an access
    token for its room, and the room's name (which the clients turn into a subscribe
    token for viewers, `POST /watch-stream/{room_name}`)."""

    type: ClassVar[str] = "livekit_room_info"
    livekit_url: str
    token: str
    room_name: str
    session_id: str

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(
            message.text("livekit_url"),
            message.text("token"),
            message.text("room_name"),
            message.text("session_id"),
        )


@dataclass(frozen=True, slots=True)
class QueuePosition(Message):
    """The node is full: this client waits, `position` of `queue_size` (1 is next)."""

    type: ClassVar[str] = "queue_position"
    position: int
    queue_size: int

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.whole("position"), message.whole("queue_size"))


@dataclass(frozen=True, slots=True)
class PromptAck(Message):
    """A `prompt` was applied to the next frame, or refused (`error` says why).

    The published clients find the ack by `prompt`, the request's text echoed exactly (None
    when the request had no text). `enhanced_prompt` is ours: the fuller reading the
    enhancer or the engine made of the prompt."""

    type: ClassVar[str] = "prompt_ack"
    prompt: str | None
    success: bool
    error: str | None = None
    enhanced_prompt: str | None = None

    def body(self) -> dict[str, object]:
        return _without_none({"prompt": self.prompt, "success": self.success}, self)

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(
            message.optional_text("prompt"),
            bool(message.flag("success")),
            message.optional_text("error"),
            message.optional_text("enhanced_prompt"),
        )


@dataclass(frozen=True, slots=True)
class SetImageAck(Message):
    """A `set_image` was applied, or refused (`error` says why)."""

    type: ClassVar[str] = "set_image_ack"
    success: bool
    error: str | None = None
    enhanced_prompt: str | None = None

    def body(self) -> dict[str, object]:
        return _without_none({"success": self.success}, self)

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(
            bool(message.flag("success")),
            message.optional_text("error"),
            message.optional_text("enhanced_prompt"),
        )


def _without_none(body: dict[str, object], ack: PromptAck | SetImageAck) -> dict[str, object]:
    """An ack's optional fields go on the wire only when they say something."""
    if ack.error is not None:
        body["error"] = ack.error
    if ack.enhanced_prompt is not None:
        body["enhanced_prompt"] = ack.enhanced_prompt
    return body


@dataclass(frozen=True, slots=True)
class GenerationStarted(Message):
    """The first output frame was produced: usage is counted from here."""

    type: ClassVar[str] = "generation_started"

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls()


@dataclass(frozen=True, slots=True)
class GenerationTick(Message):
    """Generation time so far, cumulative for the session: the unit of billing."""

    type: ClassVar[str] = "generation_tick"
    seconds: int

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.whole("seconds"))


@dataclass(frozen=True, slots=True)
class GenerationEnded(Message):
    """The server ended the session; `reason` in `FINAL_END_REASONS` means do not reconnect."""

    type: ClassVar[str] = "generation_ended"
    seconds: int
    reason: str

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.whole("seconds"), message.text("reason"))


@dataclass(frozen=True, slots=True)
class Error(Message):
    """Any failure the client should hear about, in words for a person."""

    type: ClassVar[str] = "error"
    error: str

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(message.optional_text("error") or "unknown server error")


#: A STUN or TURN URL (RFC 7064, RFC 7065): scheme, host, optional port, and for TURN an
#: optional transport. No bracketed IPv6 address: aiortc cannot read one.
_ICE_URL = re.compile(
    r"(?P<scheme>stuns?|turns?):(?P<host>[^\s?:/@\[\]]+)"
    r"(?::(?P<port>[0-9]{1,5}))?(?:\?transport=(?P<transport>udp|tcp))?"
)


@dataclass(frozen=True, slots=True)
class IceServer:
    """One STUN or TURN server in WebRTC's `RTCIceServer` form (`urls`, `username`,
    `credential`), the form a browser's `new RTCPeerConnection({iceServers})` takes as is.

    TURN needs a username and a credential; STUN has neither. The credential is a secret:
    out of repr, so out of the logs."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = field(default=None, repr=False)

    @classmethod
    def from_json(cls, data: object, fail: Callable[[str], MessageError]) -> IceServer:
        """One server from its JSON object; `fail(...)` says what is wrong."""
        if not isinstance(data, dict):
            raise fail('an ICE server must be an object like {"urls": "stun:host:3478"}')
        if unknown := sorted(set(data) - {"urls", "username", "credential"}):
            raise fail(f"an ICE server has urls, username and credential, not {unknown[0]!r}")
        urls = data.get("urls")
        listed = [urls] if isinstance(urls, str) else urls
        if not isinstance(listed, list) or not listed:
            raise fail("an ICE server needs 'urls': a URL or a list of them")
        for url in listed:
            if not isinstance(url, str) or not (match := _ICE_URL.fullmatch(url)):
                raise fail(
                    f"not a STUN or TURN URL: {url!r} (stun:host:3478, "
                    "turn:host:3478?transport=udp, turns:host:5349)"
                )
            if match["scheme"].startswith("stun") and match["transport"]:
                raise fail(f"a STUN URL takes no transport: {url!r}")
            if match["port"] and not 0 < int(match["port"]) < 65536:
                raise fail(f"not a port: {url!r}")
        username, credential = data.get("username"), data.get("credential")
        for key, value in (("username", username), ("credential", credential)):
            if value is not None and not isinstance(value, str):
                raise fail(f"an ICE server's {key} must be a string")
        if any(url.startswith("turn") for url in listed) and not (username and credential):
            raise fail(f"a TURN server needs a username and a credential: {listed[0]!r}")
        return cls(tuple(listed), username, credential)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {"urls": list(self.urls)}
        if self.username is not None:
            data["username"] = self.username
        if self.credential is not None:
            data["credential"] = self.credential
        return data

    def to_aiortc(self) -> RTCIceServer:
        return RTCIceServer(list(self.urls), self.username, self.credential)


def ice_servers_from_json(
    data: object, fail: Callable[[str], MessageError]
) -> tuple[IceServer, ...]:
    """A list of servers (or one server's object) from JSON; `fail(...)` says what is wrong."""
    listed = [data] if isinstance(data, dict) else data
    if not isinstance(listed, list):
        raise fail('ICE servers are a JSON list like [{"urls": "stun:host:3478"}]')
    return tuple(IceServer.from_json(item, fail) for item in listed)


@dataclass(frozen=True, slots=True)
class IceServers(Message):
    """The STUN and TURN servers the node uses (`--ice-servers`), handed to the client for
    its own peer connection; sent only by a node that has some.

    Ours, not the published clients': `@decartai/sdk@0.0.46` knows an `ice-restart` that
    carries one TURN server (`turn_config: {server_url, username, credential}`), but on it
    the browser closes its peer connection and sends a new offer on the same socket, and
    this server answers one offer per socket; before its first offer the browser drops it
    unread. `decart==0.0.30` reads neither. So this is a message of its own, which both
    published clients ignore, in the browser's `RTCIceServer` form.

    Sent once on each socket before anything the client's peer connection needs: to a
    publisher right after `session_id`, before the reply to its first message; to a viewer
    at once. Our SDKs use the servers when they arrived before they made their peer connection
    (a publisher that sends its initial state first, as the Python SDK always does) and on
    every later attempt of the same connection. A client that never hears them still
    reaches the node: the node's own server-reflexive and relayed candidates are in its
    `answer`; the client's own matter where its network lets it reach no relay but its
    own TURN server (UDP blocked: TURN over TCP or TLS)."""

    type: ClassVar[str] = "ice_servers"
    ice_servers: tuple[IceServer, ...]

    def body(self) -> dict[str, object]:
        return {"ice_servers": [server.to_json() for server in self.ice_servers]}

    @classmethod
    def read(cls, message: _Fields) -> Self:
        return cls(ice_servers_from_json(message.get("ice_servers"), message.fail))


ClientMessage = Prompt | SetImage | Offer | IceCandidate | LiveKitJoin
ServerMessage = (
    SessionId
    | Answer
    | IceCandidate
    | PromptAck
    | SetImageAck
    | GenerationStarted
    | GenerationTick
    | GenerationEnded
    | Error
    | IceServers
    | LiveKitRoomInfo
    | QueuePosition
)

#: What clients send, by `type`.
CLIENT_MESSAGES: Mapping[str, type[ClientMessage]] = {
    kind.type: kind for kind in (Prompt, SetImage, Offer, IceCandidate, LiveKitJoin)
}
#: The messages of the LiveKit transport (Decart's current clients; server/rtc.py), which
#: livemorph's own SDKs, on the direct one, neither send nor expect.
LIVEKIT_MESSAGES = frozenset({LiveKitJoin.type, LiveKitRoomInfo.type, QueuePosition.type})
#: What a viewer (`/subscribe/{id}`) may send: it watches, it never steers.
VIEWER_MESSAGES: Mapping[str, type[ClientMessage]] = {
    kind.type: kind for kind in (Offer, IceCandidate)
}
#: What the server sends, by `type`.
SERVER_MESSAGES: Mapping[str, type[ServerMessage]] = {
    kind.type: kind
    for kind in (
        SessionId,
        Answer,
        IceCandidate,
        PromptAck,
        SetImageAck,
        GenerationStarted,
        GenerationTick,
        GenerationEnded,
        Error,
        IceServers,
        LiveKitRoomInfo,
        QueuePosition,
    )
}


def _envelope(
    text: str | bytes, fail: Callable[[str], MessageError]
) -> tuple[str, dict[str, object]]:
    if not isinstance(text, str):
        raise fail("invalid message: expected a JSON text frame")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # also too deep, or a number too long
        raise fail("invalid message: not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise fail("invalid message: expected an object with a string 'type'")
    return data["type"], data


def parse_client(
    text: str | bytes, accepted: Mapping[str, type[ClientMessage]] = CLIENT_MESSAGES
) -> ClientMessage:
    """A client's message; `ClientError` (whose `reply` answers it) when it is not one of
    `accepted` (`UnknownMessage`) or a field is wrong."""
    kind, data = _envelope(text, ClientError)
    message = accepted.get(kind)
    if message is None:
        raise UnknownMessage(kind)
    return message.read(_Fields(kind, data, ClientError))


def parse_server(text: str | bytes) -> ServerMessage:
    """A server's message; `MessageError` when a field is wrong, `UnknownMessage` for a type
    this SDK does not know (which a client ignores: servers may say more than it knows)."""
    kind, data = _envelope(text, MessageError)
    message = SERVER_MESSAGES.get(kind)
    if message is None:
        raise UnknownMessage(kind)
    return message.read(_Fields(kind, data, MessageError))


def serialise(message: Message) -> str:
    """The message as the text frame the other side parses."""
    return json.dumps({"type": message.type, **message.body()})


# -- subscribe tokens ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscribeTarget:
    """What a subscribe token names: a session and the node that hosts it (`ip` empty and
    `port` 0 when the token names only the room: the current clients' form)."""

    session_id: str
    ip: str
    port: int


def encode_subscribe_token(target: SubscribeTarget) -> str:
    """URL-safe base64 of `{"sid", "ip", "port", "room_name"}`: the direct-WebRTC clients
    read the first three, the current (LiveKit) ones `room_name`, so either generation can
    watch a session any client started. The room is the session."""
    payload = json.dumps(
        {
            "sid": target.session_id,
            "ip": target.ip,
            "port": target.port,
            "room_name": target.session_id,
        }
    )
    return base64.urlsafe_b64encode(payload.encode()).decode()


def decode_subscribe_token(token: str) -> SubscribeTarget:
    """Either generation's token: `{"sid", "ip", "port"}`, or the current clients'
    `{"room_name"}`, which names the session alone (on the server the viewer talks to)."""
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
        if "sid" not in data and isinstance(data.get("room_name"), str):
            return SubscribeTarget(_nonempty(data["room_name"]), "", 0)
        target = SubscribeTarget(str(data["sid"]), str(data["ip"]), int(data["port"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError("invalid subscribe token") from exc
    if not target.session_id or not target.ip or target.port <= 0:
        raise ValueError("invalid subscribe token")
    return target


def _nonempty(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text
