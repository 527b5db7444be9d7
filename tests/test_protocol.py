"""The wire protocol's one definition: each message parses and serialises as docs/protocol.md
says, bad fields get the protocol's words, and the browser SDK agrees with Python."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from livemorph import __version__, protocol
from livemorph.errors import ErrorCode
from livemorph.protocol import (
    CLIENT_MESSAGES,
    IMAGE_TOO_LARGE,
    LIVEKIT_MESSAGES,
    MAX_IMAGE_BYTES,
    SERVER_MESSAGES,
    VIEWER_MESSAGES,
    Answer,
    Candidate,
    ClientError,
    Error,
    GenerationEnded,
    GenerationStarted,
    GenerationTick,
    IceCandidate,
    MessageError,
    Offer,
    Prompt,
    PromptAck,
    SessionId,
    SetImage,
    SetImageAck,
    UnknownMessage,
    parse_client,
    parse_server,
    serialise,
)
from livemorph.sdk import RetryPolicy

JS_SDK = Path(protocol.__file__).parent / "web" / "sdk" / "livemorph.js"

EVERY_MESSAGE = [
    Prompt("anime"),
    Prompt("noir", enhance_prompt=False),
    SetImage(b"\x89PNG fake", "watercolor", enhance_prompt=True),
    SetImage(b"\x89PNG fake"),
    SetImage(None),
    SetImage(None, passthrough=True),
    Offer("v=0\r\n"),
    IceCandidate(Candidate("candidate:1 1 udp 2130706431 10.0.0.1 5000 typ host", "0", 0)),
    IceCandidate(None),
    SessionId("abc", "10.0.0.1", 8000),
    Answer("v=0\r\n"),
    PromptAck("anime", success=True, enhanced_prompt="cel-shaded anime"),
    PromptAck("anime", success=False, error="prompt refused by moderation: no"),
    PromptAck(None, success=False, error="prompt must be a non-empty string"),
    SetImageAck(success=True),
    SetImageAck(success=False, error="image_data is not valid base64"),
    GenerationStarted(),
    GenerationTick(3),
    GenerationEnded(7, "max_duration"),
    Error("invalid api key"),
    protocol.LiveKitJoin(),
    protocol.LiveKitJoin(passthrough=True),
    protocol.LiveKitRoomInfo("wss://node-1:8000", "eyJ.token", "room-1", "room-1"),
    protocol.QueuePosition(2, 5),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: f"{m.type}")
def test_every_message_survives_its_round_trip(message: protocol.Message) -> None:
    text = serialise(message)
    assert json.loads(text)["type"] == message.type
    if message.type in CLIENT_MESSAGES:
        assert parse_client(text) == message
    if message.type in SERVER_MESSAGES:
        assert parse_server(text) == message


def test_the_wire_forms_the_published_clients_expect() -> None:
    def wire(message: protocol.Message) -> object:
        return json.loads(serialise(message))

    assert wire(SetImage(None, passthrough=True)) == {
        "type": "set_image",
        "image_data": None,
        "prompt": None,
    }
    assert wire(SetImage(None)) == {"type": "set_image", "image_data": None}
    assert wire(SetImage(b"ab", "x", enhance_prompt=False)) == {
        "type": "set_image",
        "image_data": base64.b64encode(b"ab").decode(),
        "prompt": "x",
        "enhance_prompt": False,
    }
    # decart==0.0.30 reads sdpMid and sdpMLineIndex unconditionally.
    assert wire(IceCandidate(Candidate("candidate:1 1 udp 1 h 1 typ host"))) == {
        "type": "ice-candidate",
        "candidate": {
            "candidate": "candidate:1 1 udp 1 h 1 typ host",
            "sdpMid": None,
            "sdpMLineIndex": None,
            "usernameFragment": None,
        },
    }
    # Acks carry error and enhanced_prompt only when they say something; the prompt always.
    assert wire(PromptAck(None, success=False, error="e")) == {
        "type": "prompt_ack",
        "prompt": None,
        "success": False,
        "error": "e",
    }
    assert wire(SetImageAck(success=True)) == {"type": "set_image_ack", "success": True}
    assert wire(GenerationStarted()) == {"type": "generation_started"}


def test_the_browser_clients_shapes_parse() -> None:
    """What @decartai/sdk and decart==0.0.30 send, byte for byte in shape."""
    candidate = {
        "candidate": "candidate:842163049 1 udp 1677729535 192.0.2.1 51234 typ srflx",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
        "usernameFragment": "abcd",
    }
    parsed = parse_client(json.dumps({"type": "ice-candidate", "candidate": candidate}))
    assert parsed == IceCandidate(Candidate(**candidate))
    assert parsed.candidate is not None
    assert parsed.candidate.to_aiortc().port == 51234
    # an empty line, or none, ends the candidates
    for ending in (None, {"candidate": ""}, {"candidate": "", "sdpMid": "0"}, {}):
        assert parse_client(json.dumps({"type": "ice-candidate", "candidate": ending})) == (
            IceCandidate(None)
        )
    opening = {"type": "set_image", "image_data": "aGk=", "prompt": "anime"}
    assert parse_client(json.dumps(opening)) == SetImage(b"hi", "anime")
    # extra fields are ignored: clients may say more than the server reads
    assert parse_client('{"type": "offer", "sdp": "v=0", "extra": [1]}') == Offer("v=0")


def _refusal(text: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        parse_client(text)
    return info.value


@pytest.mark.parametrize(
    ("frame", "said"),
    [
        ("not json", "invalid message: not valid JSON"),
        ("[" * 5000, "invalid message: not valid JSON"),
        ("[1]", "invalid message: expected an object with a string 'type'"),
        ('{"type": 5}', "invalid message: expected an object with a string 'type'"),
        ('{"type": "dance"}', "unknown message type 'dance'"),
        ('{"type": "offer"}', "offer needs a string 'sdp'"),
        ('{"type": "offer", "sdp": ""}', "offer needs a string 'sdp'"),
        (
            '{"type": "ice-candidate", "candidate": 3}',
            "ice-candidate needs a candidate object or null",
        ),
        (
            '{"type": "ice-candidate", "candidate": {"candidate": "c", "sdpMLineIndex": "0"}}',
            "invalid ice-candidate: sdpMLineIndex must be a whole number or null",
        ),
        (
            '{"type": "ice-candidate", "candidate": {"candidate": 7}}',
            "invalid ice-candidate: candidate must be a string or null",
        ),
    ],
)
def test_malformed_messages_are_answered_with_an_error(frame: str, said: str) -> None:
    refused = _refusal(frame)
    assert str(refused) == said
    assert refused.reply == Error(said)


def test_a_binary_frame_is_refused() -> None:
    with pytest.raises(ClientError, match="expected a JSON text frame"):
        parse_client(b'{"type": "offer", "sdp": "v=0"}')


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"prompt": ""}, "prompt must be a non-empty string"),
        ({"prompt": "   "}, "prompt must be a non-empty string"),
        ({"prompt": 7}, "prompt must be a non-empty string"),
        ({"prompt": "x" * 2001}, "prompt too long: the limit is 2000 characters"),
        ({"prompt": "a\ud800"}, "prompt must be valid Unicode text: it has a lone surrogate"),
        ({"prompt": "ok", "enhance_prompt": "yes"}, "enhance_prompt must be true or false"),
    ],
)
def test_a_bad_prompt_is_answered_by_a_failed_ack(fields: dict[str, object], said: str) -> None:
    refused = _refusal(json.dumps({"type": "prompt", **fields}))
    echo = fields["prompt"] if isinstance(fields["prompt"], str) else None
    assert refused.reply == PromptAck(echo, success=False, error=said)


@pytest.mark.parametrize(
    ("fields", "said"),
    [
        ({"image_data": 5}, "image_data must be a base64 string or null"),
        ({"image_data": "not base64!"}, "image_data is not valid base64"),
        ({"image_data": "A" * ((MAX_IMAGE_BYTES * 4) // 3 + 8)}, IMAGE_TOO_LARGE),
        ({"image_data": None, "prompt": ""}, "prompt must be a non-empty string"),
        ({"image_data": None, "enhance_prompt": 1}, "enhance_prompt must be true or false"),
    ],
)
def test_a_bad_image_is_answered_by_a_failed_ack(fields: dict[str, object], said: str) -> None:
    refused = _refusal(json.dumps({"type": "set_image", **fields}))
    assert refused.reply == SetImageAck(success=False, error=said)


def test_an_image_just_over_the_limit_is_refused_after_decoding() -> None:
    # Base64 within the length bound that decodes to one byte too many.
    data = base64.b64encode(b"\0" * (MAX_IMAGE_BYTES + 1)).decode()
    assert len(data) <= (MAX_IMAGE_BYTES * 4) // 3 + 4
    refused = _refusal(json.dumps({"type": "set_image", "image_data": data}))
    assert str(refused) == IMAGE_TOO_LARGE


def test_set_image_passthrough_and_keeping_the_prompt() -> None:
    def read(fields: dict[str, object]) -> object:
        return parse_client(json.dumps({"type": "set_image", **fields}))

    assert read({"image_data": None, "prompt": None}) == SetImage(None, passthrough=True)
    assert read({"image_data": None}) == SetImage(None), "clears the image, keeps the prompt"
    assert read({"image_data": "aGk=", "prompt": None}) == SetImage(b"hi")


def test_a_viewer_may_only_negotiate() -> None:
    with pytest.raises(UnknownMessage) as info:
        parse_client('{"type": "prompt", "prompt": "hijack"}', VIEWER_MESSAGES)
    assert info.value.kind == "prompt"
    assert parse_client('{"type": "offer", "sdp": "v=0"}', VIEWER_MESSAGES) == Offer("v=0")


def test_server_messages_the_sdk_does_not_know_are_told_apart_from_broken_ones() -> None:
    with pytest.raises(UnknownMessage):
        parse_server('{"type": "ready"}')  # the browser SDK's own event, never sent here
    with pytest.raises(MessageError, match="generation_tick needs a whole number 'seconds'"):
        parse_server('{"type": "generation_tick", "seconds": "3"}')
    with pytest.raises(MessageError, match="session_id needs a string 'server_ip'"):
        parse_server('{"type": "session_id", "session_id": "a", "server_port": 1}')
    assert not isinstance(_server_refusal('{"type": "answer"}'), ClientError)


def _server_refusal(text: str) -> MessageError:
    with pytest.raises(MessageError) as info:
        parse_server(text)
    return info.value


# -- the browser SDK agrees -------------------------------------------------------------


def _js_constants() -> dict[str, object]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (scripts/install-system-deps.sh installs it)")
    script = (
        f"const m = await import({json.dumps(JS_SDK.as_uri())});"
        "console.log(JSON.stringify(Object.fromEntries("
        "Object.entries(m).filter(([k]) => /^[A-Z_]+$/.test(k)))));"
    )
    result = subprocess.run(
        [node, "--input-type=module", "-e", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return json.loads(result.stdout)


def test_the_browser_sdk_constants_agree_with_python() -> None:
    js = _js_constants()
    assert js["PERMANENT_ERRORS"] == list(protocol.PERMANENT_ERROR_MARKERS)
    assert sorted(js["FINAL_END_REASONS"]) == sorted(protocol.FINAL_END_REASONS)
    assert js["MAX_IMAGE_BYTES"] == protocol.MAX_IMAGE_BYTES
    assert js["PROMPT_TIMEOUT_MS"] == protocol.PROMPT_ACK_TIMEOUT * 1000
    assert js["IMAGE_TIMEOUT_MS"] == protocol.IMAGE_ACK_TIMEOUT * 1000
    retry = RetryPolicy()
    assert js["DEFAULT_RETRY"] == {
        "attempts": retry.attempts,
        "baseDelay": retry.base_delay * 1000,
        "maxDelay": retry.max_delay * 1000,
    }
    assert js["VERSION"] == __version__
    codes = js["ERROR_CODES"]
    assert isinstance(codes, dict)
    # The browser SDK has one code more, for options the Python SDK takes as keywords.
    assert {code.value for code in ErrorCode} == set(codes) - {"INVALID_OPTIONS"}


def test_the_browser_sdk_speaks_the_same_messages() -> None:
    source = JS_SDK.read_text()
    sent = set(re.findall(r'(?:sendRaw\(|const message = )\{\s*type: "([^"]+)"', source))
    handler = source[source.index("async handleMessage(") : source.index("  _resolve(")]
    handled = set(re.findall(r'case "([^"]+)":', handler))
    assert sent == set(CLIENT_MESSAGES) - LIVEKIT_MESSAGES
    assert handled == set(SERVER_MESSAGES) - LIVEKIT_MESSAGES
