"""Pieces of the wire protocol (see docs/protocol.md) that both the server and the SDK need."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from aiortc import RTCIceCandidate
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

#: Largest WebSocket message either side accepts: a 10 MB image grows by 4/3 in base64,
#: plus the JSON around it.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: WebSocket close code sent after a fatal `error` (policy violation).
CLOSE_POLICY_VIOLATION = 1008


def is_permanent_error(text: str) -> bool:
    """True when a client must not retry after an error with this text."""
    lowered = text.lower()
    return any(marker in lowered for marker in PERMANENT_ERROR_MARKERS)


@dataclass(frozen=True, slots=True)
class SubscribeTarget:
    """What a subscribe token names: a session and the node that hosts it."""

    session_id: str
    ip: str
    port: int


def encode_subscribe_token(target: SubscribeTarget) -> str:
    """Encode as both published SDKs do: URL-safe base64 of `{"sid", "ip", "port"}`."""
    payload = json.dumps({"sid": target.session_id, "ip": target.ip, "port": target.port})
    return base64.urlsafe_b64encode(payload.encode()).decode()


def decode_subscribe_token(token: str) -> SubscribeTarget:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()).decode())
        target = SubscribeTarget(str(data["sid"]), str(data["ip"]), int(data["port"]))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ValueError("invalid subscribe token") from exc
    if not target.session_id or not target.ip or target.port <= 0:
        raise ValueError("invalid subscribe token")
    return target


def parse_candidate(payload: dict[str, Any]) -> RTCIceCandidate | None:
    """An aiortc candidate from the wire form; None for an end-of-candidates marker.

    Raises ValueError (or IndexError) on a candidate line that does not parse.
    """
    text = str(payload.get("candidate") or "").strip()
    if not text:
        return None
    candidate = candidate_from_sdp(text.removeprefix("candidate:"))
    candidate.sdpMid = payload.get("sdpMid")
    index = payload.get("sdpMLineIndex")
    candidate.sdpMLineIndex = int(index) if index is not None else None
    return candidate
