"""livemorph.livekit: room tokens, signal frames and the SDP rewrites, without a server."""

from __future__ import annotations

import time

import jwt
import pytest
from livekit.protocol import rtc

from livemorph.livekit import (
    Grant,
    RoomTokens,
    SignalError,
    TokenError,
    new_sid,
    parse_request,
    respond,
)
from livemorph.livekit.sdp import best_layer, hint_bitrate, keep_best_layer, label_tracks
from livemorph.livekit.signal import MAX_SIGNAL_BYTES

#: A browser's publisher offer, cut to what matters: one simulcast H.264 section with RTX,
#: listed low to high as livekit-client does, and an audio section.
OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=video 9 UDP/TLS/RTP/SAVPF 102 103",
        "a=mid:0",
        "a=sendonly",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
        "a=rtpmap:102 H264/90000",
        "a=rtpmap:103 rtx/90000",
        "a=fmtp:103 apt=102",
        "a=rid:q send",
        "a=rid:h send",
        "a=rid:f send",
        "a=simulcast:send q;h;f",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:1",
        "a=sendonly",
        "a=rtpmap:111 opus/48000/2",
        "",
    ]
)

#: What aiortc answers to it: no layers, RTX kept, no rid extension.
ANSWER = "\r\n".join(
    [
        "v=0",
        "o=- 3 4 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=video 9 UDP/TLS/RTP/SAVPF 102 103",
        "a=recvonly",
        "a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid",
        "a=mid:0",
        "a=rtpmap:102 H264/90000",
        "a=rtcp-fb:102 nack",
        "a=rtpmap:103 rtx/90000",
        "a=fmtp:103 apt=102",
        "a=ssrc-group:FID 1 2",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=recvonly",
        "a=mid:1",
        "a=rtpmap:111 opus/48000/2",
        "",
    ]
)


def _section(sdp: str, mid: str) -> list[str]:
    sections = sdp.split("m=")[1:]
    return next(s.splitlines() for s in sections if f"a=mid:{mid}" in s)


def test_a_simulcast_offer_is_answered_with_its_best_layer_alone() -> None:
    answer = keep_best_layer(OFFER, ANSWER)
    video = _section(answer, "0")
    assert "a=rid:f recv" in video and "a=simulcast:recv f" in video
    assert not any(line.startswith("a=rid:q") or line.startswith("a=rid:h") for line in video)
    assert "a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id" in video
    assert video[0].split()[3:] == ["102"], "RTX left out"
    assert not any("103" in line or "FID" in line for line in video[1:])
    assert _section(answer, "1") == _section(ANSWER, "1"), "audio untouched"
    assert answer.endswith("\r\n")


def test_layers_without_livekit_names_keep_the_first_listed() -> None:
    assert best_layer(["m=video", "a=rid:hi send", "a=rid:lo send", "a=simulcast:send hi;lo"])
    assert best_layer(["m=video", "a=rid:b send", "a=rid:a send", "a=simulcast:send b;a"]) == "b"
    assert best_layer(["m=video", "a=rid:f send"]) is None, "no simulcast line"


def test_an_offer_without_simulcast_is_answered_as_aiortc_answers() -> None:
    plain = OFFER.replace("a=simulcast:send q;h;f\r\n", "").replace("a=rid:", "a=x-rid:")
    plain = plain.replace("a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n", "")
    assert keep_best_layer(plain, ANSWER) == ANSWER


def test_tracks_are_labelled_with_livekit_ids() -> None:
    labelled = label_tracks(
        ANSWER.replace("a=mid:0", "a=mid:0\r\na=msid:s t"), {"0": ("PA_1", "TR_2")}
    )
    video = _section(labelled, "0")
    assert "a=msid:PA_1|TR_2 TR_2" in video
    assert "a=msid:s t" not in video


def test_room_tokens_admit_their_room_until_they_expire() -> None:
    tokens = RoomTokens()
    grant = Grant("client-1", "room-1", can_publish=True)
    assert tokens.verify(tokens.mint(grant)) == Grant("client-1", "room-1", True, "client-1")
    claims = jwt.decode(tokens.mint(grant), options={"verify_signature": False})
    assert claims["video"] == {
        "roomJoin": True,
        "room": "room-1",
        "canPublish": True,
        "canPublishData": True,
        "canSubscribe": True,
    }
    old = RoomTokens(tokens._secret, clock=lambda: time.time() - 3600).mint(grant)
    with pytest.raises(TokenError, match="expired"):
        tokens.verify(old)
    with pytest.raises(TokenError, match="invalid"):
        RoomTokens().verify(tokens.mint(grant))  # another node's secret
    with pytest.raises(TokenError):
        tokens.verify(None)
    unsigned = jwt.encode({"sub": "x", "video": {"roomJoin": True, "room": "r"}}, "k" * 32)
    with pytest.raises(TokenError):
        tokens.verify(unsigned)


def test_signal_frames_are_checked_before_use() -> None:
    assert parse_request(rtc.SignalRequest(ping=7).SerializeToString()).ping == 7
    for bad in ("text", b"\xff\xff", b"", b"\x00" * (MAX_SIGNAL_BYTES + 1)):
        with pytest.raises(SignalError):
            parse_request(bad)
    assert rtc.SignalResponse.FromString(respond(pong=3)).pong == 3
    with pytest.raises(TypeError):
        respond(pong=1, refresh_token="x")
    assert new_sid("PA_").startswith("PA_") and len(new_sid("TR_")) == 15


def test_a_publishers_answer_asks_for_a_starting_and_a_least_bitrate() -> None:
    hinted = hint_bitrate(keep_best_layer(OFFER, ANSWER), 1700, 800)
    video = _section(hinted, "0")
    assert "a=fmtp:102 x-google-start-bitrate=1700;x-google-min-bitrate=800" in video
    assert _section(hinted, "1") == _section(ANSWER, "1"), "audio untouched"
    with_fmtp = ANSWER.replace(
        "a=rtpmap:102 H264/90000", "a=rtpmap:102 H264/90000\r\na=fmtp:102 packetization-mode=1"
    )
    video = _section(hint_bitrate(with_fmtp, 1700, 800), "0")
    assert (
        "a=fmtp:102 packetization-mode=1;x-google-start-bitrate=1700;x-google-min-bitrate=800"
        in video
    )
    assert "a=fmtp:103 apt=102" in video, "RTX keeps its own parameters"
