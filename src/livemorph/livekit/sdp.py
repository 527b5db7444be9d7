"""The SDP rewrites that let aiortc meet LiveKit's clients.

- **Simulcast.** LiveKit's clients publish video as simulcast: `a=rid` layers and an
  `a=simulcast:send` line, with no `a=ssrc`. aiortc reads neither, so its answer names no
  layer, and the browser then sends only its first encoding (for `livekit-client`, the
  quarter-size one). `keep_best_layer` answers as RFC 8853 lets a receiver do, accepting
  one layer, the largest, so the sender keeps that one alone; RTX is left out of such a
  section, because aiortc drops retransmissions from a stream whose SSRC was never signalled.
- **Bitrate.** LiveKit's server gives its publishers transport-wide congestion feedback,
  on which libwebrtc ramps up in a second or two; aiortc has only REMB, and on it the
  camera started at 250 kb/s and 640x352 and took 16 s to reach 960x528 (never its full
  size) in `bench/livekit_latency.py`. `hint_bitrate` writes libwebrtc's own
  `x-google-start-bitrate` and `x-google-min-bitrate` into the answer's video codecs.
- **Track names.** LiveKit's clients find the participant and the track a media section
  belongs to from its `a=msid:<participant sid>|<track sid> <track sid>`; aiortc writes
  random ids there. `label_tracks` writes LiveKit's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: LiveKit names its layers q(uarter), h(alf) and f(ull); best first.
_LAYER_ORDER = ("f", "h", "q")
_RID_EXTENSION = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"


def _sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    """The session lines and each media section's lines, without line ends."""
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    session: list[str] = []
    media: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def _join(session: list[str], media: list[list[str]]) -> str:
    return "\r\n".join([*session, *(line for section in media for line in section)]) + "\r\n"


def _mid(section: list[str]) -> str | None:
    for line in section:
        if line.startswith("a=mid:"):
            return line[len("a=mid:") :].strip()
    return None


def best_layer(section: list[str]) -> str | None:
    """The rid of the largest simulcast layer a media section sends; None without simulcast.
    LiveKit's names decide (f, then h, then q); other names: the first listed."""
    rids = [
        line[len("a=rid:") :].split()[0]
        for line in section
        if line.startswith("a=rid:") and line.split()[1:2] == ["send"]
    ]
    if not rids or not any(line.startswith("a=simulcast:") for line in section):
        return None
    for name in _LAYER_ORDER:
        if name in rids:
            return name
    return rids[0]


def _rtx_payloads(section: list[str]) -> set[str]:
    found = set()
    for line in section:
        match = re.match(r"a=rtpmap:(\d+) rtx/", line, re.IGNORECASE)
        if match:
            found.add(match.group(1))
    return found


def _without_payloads(section: list[str], payloads: set[str]) -> list[str]:
    if not payloads:
        return section
    kept: list[str] = []
    for line in section:
        if line.startswith("m="):
            fields = line.split()
            line = " ".join(fields[:3] + [pt for pt in fields[3:] if pt not in payloads])
        attribute = re.match(r"a=(?:rtpmap|fmtp|rtcp-fb):(\d+)", line)
        if (attribute and attribute.group(1) in payloads) or line.startswith("a=ssrc-group:FID"):
            continue
        kept.append(line)
    return kept


def keep_best_layer(offer: str, answer: str) -> str:
    """`answer` with each simulcast video section of `offer` answered by its best layer
    alone (`a=rid:<best> recv`, `a=simulcast:recv <best>`), and no RTX there. Every video
    section also accepts the rid header extension the offer proposes, simulcast or not:
    libwebrtc refuses to add a simulcast section later in a bundle that declined it
    ("negotiates simulcast but does not negotiate the RID RTP header extension")."""
    _, offered = _sections(offer)
    by_mid = {_mid(section): section for section in offered}
    session, media = _sections(answer)
    rewritten = []
    for section in media:
        source = by_mid.get(_mid(section))
        if source is None or not section[0].startswith("m=video"):
            rewritten.append(section)
            continue
        extension = next(
            (line for line in source if line.startswith("a=extmap:") and _RID_EXTENSION in line),
            None,
        )
        if extension is not None and not any(_RID_EXTENSION in line for line in section):
            direction = re.compile(r"/(sendonly|recvonly|sendrecv|inactive)")
            at = next((i for i, line in enumerate(section) if line.startswith("a=extmap:")), 1)
            section = [*section[:at], direction.sub("", extension), *section[at:]]
        layer = best_layer(source)
        if layer is not None:
            section = _without_payloads(section, _rtx_payloads(section))
            section = [*section, f"a=rid:{layer} recv", f"a=simulcast:recv {layer}"]
        rewritten.append(section)
    return _join(session, rewritten)


def hint_bitrate(answer: str, start_kbps: int, min_kbps: int) -> str:
    """`answer` with each video codec (not RTX) asking libwebrtc senders to start at
    `start_kbps` and not to go under `min_kbps` (`x-google-*` fmtp parameters)."""
    session, media = _sections(answer)
    hint = f"x-google-start-bitrate={start_kbps};x-google-min-bitrate={min_kbps}"
    for index, section in enumerate(media):
        if not section[0].startswith("m=video"):
            continue
        payloads = [pt for pt in section[0].split()[3:] if pt not in _rtx_payloads(section)]
        lines = []
        for line in section:
            match = re.match(r"a=fmtp:(\d+) ", line)
            if match and match.group(1) in payloads:
                line = f"{line};{hint}"
            lines.append(line)
        have = {m.group(1) for line in lines if (m := re.match(r"a=fmtp:(\d+) ", line))}
        for pt in payloads:
            if pt not in have:
                at = max(i for i, line in enumerate(lines) if line.startswith(f"a=rtpmap:{pt} "))
                lines.insert(at + 1, f"a=fmtp:{pt} {hint}")
        media[index] = lines
    return _join(session, media)


def label_tracks(sdp: str, labels: Mapping[str, tuple[str, str]]) -> str:
    """`sdp` with the media section of each mid in `labels` naming `(participant sid,
    track sid)` as LiveKit does: `a=msid:PA_x|TR_y TR_y`."""
    session, media = _sections(sdp)
    for section in media:
        label = labels.get(_mid(section) or "")
        if label is None:
            continue
        participant, track = label
        msid = f"a=msid:{participant}|{track} {track}"
        lines = [line for line in section if not line.startswith("a=msid:")]
        # the msid belongs after the mid, where aiortc writes it
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("a=mid:")), 1)
        section[:] = [*lines[:at], msid, *lines[at:]]
    return _join(session, media)
