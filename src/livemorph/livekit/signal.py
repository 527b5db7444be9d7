"""LiveKit signal frames: `SignalRequest` in, `SignalResponse` out, protobuf on a binary
WebSocket (`livekit_rtc.proto`; the stubs are the `livekit-protocol` package's).

Both clients treat a frame they cannot read as fatal (the Rust one panics inside its FFI),
so every response is built from the stubs and every request is checked here before the
endpoint sees it.
"""

from __future__ import annotations

import secrets
from typing import Any

from google.protobuf.message import DecodeError
from livekit.protocol import rtc

#: Largest signal frame read: an SDP offer with its candidates is a few kilobytes, and the
#: largest request the clients send (a browser's offer with three simulcast layers and
#: every codec) stays under 16 KiB.
MAX_SIGNAL_BYTES = 64 * 1024


class SignalError(ValueError):
    """A frame that is not a signal request this server can read."""


def new_sid(prefix: str) -> str:
    """A LiveKit id: the kind's prefix (`RM_`, `PA_`, `TR_`), then 12 random characters.
    The Rust client checks the prefixes."""
    return prefix + secrets.token_hex(6).upper()


def parse_request(frame: bytes | str) -> rtc.SignalRequest:
    """The request in a frame; `SignalError` for text, an oversized frame, bytes that are
    not a `SignalRequest`, or one that carries no message."""
    if isinstance(frame, str):
        raise SignalError("expected a binary protobuf frame")
    if len(frame) > MAX_SIGNAL_BYTES:
        raise SignalError(f"frame too large: the limit is {MAX_SIGNAL_BYTES} bytes")
    request = rtc.SignalRequest()
    try:
        request.ParseFromString(frame)
    except (DecodeError, RecursionError, ValueError):
        raise SignalError("not a SignalRequest") from None
    if request.WhichOneof("message") is None:
        raise SignalError("a SignalRequest with no message")
    return request


def respond(**message: Any) -> bytes:
    """One `SignalResponse` carrying `message` (a single field, as the oneof has it)."""
    if len(message) != 1:
        raise TypeError("a SignalResponse carries exactly one message")
    return rtc.SignalResponse(**message).SerializeToString()
