"""LiveKit access tokens, minted by the node that serves a session and checked by it.

A token is a JWT signed with HS256 and carries LiveKit's claims (`iss`, `sub` the identity,
`nbf`, `exp`, and a `video` grant naming one room and whether the holder may publish), so
LiveKit's clients treat it as they would one of LiveKit's own: neither client decodes it,
but a LiveKit server would accept the same shape. The signing secret is the node's own,
made at start and never sent anywhere: a token is good on the node that minted it, for the
room it names, until it expires.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt

#: LiveKit's `iss`: the API key the token was minted with. livemorph has one per node.
ISSUER = "livemorph"
#: How long a room token may be used to join: long enough for a queued client's
#: handshake and a reconnect after a dropped network, short enough that a leaked token is
#: soon worthless. It never extends a session: the session ends with its WebSocket.
JOIN_WINDOW = 600
_ALGORITHM = "HS256"


class TokenError(ValueError):
    """A token that does not admit its holder: malformed, forged, expired or not a room's."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token lets its holder do: join `room` as `identity`, publishing or not."""

    identity: str
    room: str
    can_publish: bool
    name: str = ""


class RoomTokens:
    """Mints and checks this node's room tokens."""

    def __init__(
        self,
        secret: bytes | None = None,
        *,
        window: float = JOIN_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._window = window
        self._clock = clock

    def mint(self, grant: Grant) -> str:
        now = int(self._clock())
        claims = {
            "iss": ISSUER,
            "sub": grant.identity,
            "name": grant.name or grant.identity,
            "nbf": now - 1,
            "exp": now + int(self._window),
            "video": {
                "roomJoin": True,
                "room": grant.room,
                "canPublish": grant.can_publish,
                "canPublishData": grant.can_publish,
                "canSubscribe": True,
            },
        }
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify(self, token: str | None) -> Grant:
        """The token's grant; `TokenError` unless this node signed it, for a room, and it
        has not expired."""
        if not token:
            raise TokenError("no access token")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[_ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "nbf", "sub", "iss"]},
                leeway=0,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("the access token has expired") from None
        except jwt.PyJWTError:
            raise TokenError("invalid access token") from None
        video = claims.get("video")
        if not isinstance(video, dict) or video.get("roomJoin") is not True:
            raise TokenError("the access token does not grant joining a room")
        room, identity = video.get("room"), claims.get("sub")
        if not isinstance(room, str) or not room or not isinstance(identity, str) or not identity:
            raise TokenError("the access token names no room or identity")
        name = claims.get("name")
        return Grant(
            identity, room, video.get("canPublish") is True, name if isinstance(name, str) else ""
        )
