"""LiveKit's signal protocol, as much of it as livemorph's rooms need.

Decart's current clients (`decart>=0.1` on PyPI, `@decartai/sdk>=0.1` on npm) carry their
media over LiveKit: the realtime WebSocket hands them a room (`livekit_room_info`), and they
join it with LiveKit's own client libraries. livemorph answers those libraries itself, so a
single machine needs no LiveKit server: a room is one session, holding the client and a
participant that is the session's engine (`inference-server-<node>`).

This package is the protocol alone, below the server and the sessions: access tokens
(`tokens`), protobuf signal frames (`signal`) and the SDP rewrites aiortc needs to meet
LiveKit's clients (`sdp`). `server/rtc.py` is the endpoint that uses them.
"""

from .signal import SignalError, new_sid, parse_request, respond
from .tokens import Grant, RoomTokens, TokenError

__all__ = [
    "Grant",
    "RoomTokens",
    "SignalError",
    "TokenError",
    "new_sid",
    "parse_request",
    "respond",
]
