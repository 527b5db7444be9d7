"""This node's LiveKit rooms: one per session, named by the session's id.

A room holds the publishing client, its viewers, and a participant that stands for the
session's engine (`inference-server-<node>`), which publishes the output. Nothing about a
room is stored: its ids are derived from the session's, its tokens are signed with the
node's secret (livekit/tokens.py), and it ends with its session.
"""

from __future__ import annotations

import hashlib
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

from livekit.protocol import models
from starlette.requests import HTTPConnection

from ..config import Settings
from ..livekit import Grant, RoomTokens
from ..models import ModelSpec

#: The identity prefix the published clients look for on the participant whose tracks
#: are the model's output (`decart` and `@decartai/sdk`, `inference-server-`).
ENGINE_PREFIX = "inference-server-"


class Departing(Protocol):
    """A participant that can be told to go (`server/rtc.py`)."""

    async def replaced(self) -> None: ...


def reply_address(conn: HTTPConnection, settings: Settings) -> tuple[str, int]:
    """The host and port that reach this node, for `session_id`, subscribe tokens and
    LiveKit URLs: `--public-host`/`--public-port`, else the address the client used."""
    host = settings.public_host or conn.url.hostname or settings.host
    port = settings.public_port or conn.url.port or settings.port
    return host, int(port)


def livekit_url(conn: HTTPConnection, settings: Settings) -> str:
    """The LiveKit URL of this node's rooms (clients add `/rtc`): the address that reaches
    this node, in the scheme (TLS or not) the client came in on."""
    host, port = reply_address(conn, settings)
    scheme = "wss" if conn.url.scheme in ("wss", "https") else "ws"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _derived(prefix: str, *parts: str) -> str:
    """A LiveKit id (`PA_`, `TR_`, `RM_`) that is the same every time for the same parts."""
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12].upper()
    return prefix + digest


@dataclass(frozen=True, slots=True)
class RoomIds:
    """The LiveKit ids of one session's room."""

    room: str
    engine: str
    video: str
    audio: str

    @classmethod
    def of(cls, session_id: str) -> RoomIds:
        return cls(
            _derived("RM_", session_id),
            _derived("PA_", session_id, "engine"),
            _derived("TR_", session_id, "video"),
            _derived("TR_", session_id, "audio"),
        )


@dataclass
class Rooms:
    """Tokens for this node's rooms, and who publishes in each."""

    node: str = field(default_factory=socket.gethostname)
    tokens: RoomTokens = field(default_factory=RoomTokens)
    created: float = field(default_factory=time.time)
    #: The publishing participant of each session that has one; a new one replaces it.
    publishers: dict[str, Departing] = field(default_factory=dict)

    @property
    def engine_identity(self) -> str:
        return ENGINE_PREFIX + self.node

    def publisher_token(self, session_id: str) -> str:
        return self.tokens.mint(Grant(f"client-{session_id}", session_id, can_publish=True))

    def viewer_token(self, session_id: str, viewer: str) -> str:
        return self.tokens.mint(Grant(f"viewer-{viewer}", session_id, can_publish=False))

    def engine_info(self, spec: ModelSpec, ids: RoomIds, audio: bool) -> models.ParticipantInfo:
        """The engine's participant, publishing the output video (and the audio, if any)."""
        tracks = [
            models.TrackInfo(
                sid=ids.video,
                type=models.TrackType.VIDEO,
                source=models.TrackSource.CAMERA,
                name="output",
                mime_type="video/VP8",
                width=spec.width,
                height=spec.height,
            )
        ]
        if audio:
            tracks.append(
                models.TrackInfo(
                    sid=ids.audio,
                    type=models.TrackType.AUDIO,
                    source=models.TrackSource.MICROPHONE,
                    name="audio",
                    mime_type="audio/opus",
                )
            )
        return models.ParticipantInfo(
            sid=ids.engine,
            identity=self.engine_identity,
            name=self.engine_identity,
            state=models.ParticipantInfo.State.ACTIVE,
            tracks=tracks,
            joined_at=int(self.created),
            version=1 + len(tracks),  # clients drop an update whose version did not grow
            permission=models.ParticipantPermission(
                can_subscribe=True, can_publish=True, can_publish_data=True
            ),
        )
