"""`/rtc`: LiveKit's signal endpoint, for the rooms this node's sessions hold.

Decart's current clients join the room `livekit_room_info` names with LiveKit's own client
libraries; this endpoint answers them as a LiveKit server would, in LiveKit's classic mode:
two peer connections per participant, the publisher one offered by the client (its camera
and microphone in) and the subscriber one offered by the server (the engine participant's
output out). What it refuses, and how:

- the single-connection mode (`/rtc/v1`): an upgrade there, and `GET /rtc/v1/validate`,
  are answered 404, which both clients take as "use `/rtc`";
- resuming a connection (`reconnect=1`): answered with a leave that asks for a full
  rejoin, which both clients do at once;
- data channels, track settings, subscriptions and the rest: accepted and ignored (the
  engine participant has one output and everyone in the room receives it).

One participant's signaling is handled in order, one request at a time, on its socket.
Frames are `SignalRequest`/`SignalResponse` protobuf (livekit/signal.py); a frame that is
not one closes the socket with 1003 and touches nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
from aiortc import RTCPeerConnection, RTCSessionDescription
from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, PlainTextResponse
from livekit.protocol import models, rtc
from pydantic import BaseModel
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketState

from ..cluster import ClusterUnavailable
from ..livekit import Grant, SignalError, TokenError, new_sid, parse_request, respond
from ..livekit.sdp import hint_bitrate, keep_best_layer, label_tracks
from ..logs import bind_session, unbind_session
from ..protocol import Candidate
from ..sessions import Session
from ..sessions.session import Viewer, new_peer_connection
from .limits import CLUSTER_UNAVAILABLE
from .metrics import RATE_LIMIT_REASON
from .rest import caller, error
from .rooms import RoomIds, livekit_url
from .state import AppState

logger = logging.getLogger(__name__)

router = APIRouter()

#: LiveKit's protocol version these answers follow (the clients send 16 or 17).
PROTOCOL = 16
#: Seconds between the clients' pings, and without one before a participant is gone
#: (LiveKit's defaults; both clients require them non-zero).
PING_INTERVAL = 5
PING_TIMEOUT = 15
#: The close code for a frame that is not a signal request (RFC 6455, unsupported data).
CLOSE_UNSUPPORTED = 1003
#: What a client hears for a room that is gone: the text LiveKit's server says.
NO_ROOM = "requested room does not exist"
SINGLE_PC_REFUSED = "this server speaks LiveKit's classic signaling only: use /rtc"
#: Codecs a publisher may use: those aiortc decodes. The browser client picks its camera's
#: codec from this list when its own choice (VP9, say) is not on it.
PUBLISH_CODECS = [
    models.Codec(mime="video/H264"),
    models.Codec(mime="video/VP8"),
    models.Codec(mime="audio/opus"),
]


def _state(conn: WebSocket) -> AppState:
    return conn.app.state.livemorph


def _token(conn: HTTPConnection) -> str | None:
    """The access token: `access_token` in the query (JavaScript), else `Authorization:
    Bearer` (LiveKit's Rust client)."""
    token = conn.query_params.get("access_token")
    if token:
        return token
    scheme, _, value = conn.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


class JoinRefused(Exception):
    """A room join refused, with the HTTP status and text the upgrade is answered with."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.response = PlainTextResponse(text, status_code=status)


def _admit(state: AppState, token: str | None) -> tuple[Grant, Session]:
    """The grant and the session a token admits to; `JoinRefused` with 401 for a token this
    node did not mint or that expired, 404 for a room whose session has ended."""
    try:
        grant = state.rooms.tokens.verify(token)
    except TokenError as exc:
        raise JoinRefused(401, str(exc)) from None
    session = state.sessions.get(grant.room)
    if session is None or session.ended.is_set():
        raise JoinRefused(404, NO_ROOM)
    return grant, session


@router.get("/rtc/validate", include_in_schema=False)
async def validate(request: Request) -> PlainTextResponse:
    """What LiveKit's clients ask after a failed join, to tell the person why."""
    try:
        _admit(request.app.state.livemorph, _token(request))
    except JoinRefused as refused:
        return refused.response
    return PlainTextResponse("success")


class WatchStream(BaseModel):
    """Credentials for watching a session's room: join `livekit_url` with `token`."""

    livekit_url: str
    token: str
    room_name: str
    session_id: str


@router.post(
    "/watch-stream/{room}",
    response_model=WatchStream,
    responses={401: {"description": "invalid api key"}, 404: {"description": "no such room"}},
)
async def watch_stream(room: str, request: Request) -> Any:
    """A viewer's way into a session's room, as Decart's current clients ask for it: the
    room's name comes from the session's subscribe token, the key (or a client token) in
    `x-api-key`. The viewer may subscribe and never publish; it costs no encode of its
    own (the session's shared encoder). In a cluster, the node serving the session
    answers, through this one."""
    state: AppState = request.app.state.livemorph
    key = request.headers.get("x-api-key")
    if isinstance(refused := await caller(state, key), JSONResponse):
        return refused
    session = state.sessions.get(room)
    if session is None or session.ended.is_set():
        if state.cluster is not None and key is not None:
            forwarded = await _watch_elsewhere(state, room, key)
            if forwarded is not None:
                return forwarded
        return error(404, f"invalid session: {NO_ROOM}")
    token = state.rooms.viewer_token(session.id, secrets.token_hex(6))
    url = livekit_url(request, state.settings)
    return WatchStream(livekit_url=url, token=token, room_name=session.id, session_id=session.id)


async def _watch_elsewhere(state: AppState, room: str, key: str) -> JSONResponse | None:
    """The serving member's answer for a room held elsewhere in the cluster; None when no
    live member holds it."""
    assert state.cluster is not None
    try:
        node = await state.cluster.directory.locate(room)
    except ClusterUnavailable as exc:
        logger.warning("cannot find room %s: %s", room, exc)
        return error(503, CLUSTER_UNAVAILABLE)
    if node is None or node.name == state.cluster.name:
        return None
    async with httpx.AsyncClient(timeout=5) as client:
        try:
            reply = await client.post(
                f"{node.url}/watch-stream/{quote(room)}", headers={"x-api-key": key}
            )
        except httpx.HTTPError as exc:
            logger.warning("cluster: node %s did not answer watch-stream: %r", node.name, exc)
            return error(503, CLUSTER_UNAVAILABLE)
    return JSONResponse(reply.json(), status_code=reply.status_code)


@router.get("/rtc/v1/validate", include_in_schema=False)
async def validate_v1() -> PlainTextResponse:
    return PlainTextResponse(SINGLE_PC_REFUSED, status_code=404)


@router.websocket("/rtc/v1")
async def single_pc(ws: WebSocket) -> None:
    """Refused with a real 404 on the upgrade: the Rust client falls back to `/rtc` on
    exactly that status (Starlette would otherwise answer 403)."""
    await ws.send_denial_response(PlainTextResponse(SINGLE_PC_REFUSED, status_code=404))


@router.websocket("/rtc")
async def join(ws: WebSocket) -> None:
    state = _state(ws)
    try:
        grant, session = _admit(state, _token(ws))
    except JoinRefused as refused:
        logger.info("refused a room join: %s", refused)
        await ws.send_denial_response(refused.response)
        return
    await ws.accept()
    if ws.query_params.get("reconnect") == "1":
        # A resume of a connection this server no longer holds: ask for a full rejoin.
        await _send(ws, leave=_leave(rtc.LeaveRequest.Action.RECONNECT, models.STATE_MISMATCH))
        await _close(ws)
        return
    # what this participant's task logs carries the session's fields (--log-format json)
    binding = bind_session(session.id, session.principal.key_id, session.spec.name)
    try:
        await Participant(ws, state, session, grant).run()
    finally:
        unbind_session(binding)


async def _send(ws: WebSocket, **message: object) -> None:
    """Send one signal response; nothing once the client has gone."""
    if ws.application_state is not WebSocketState.CONNECTED:
        return
    with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
        await ws.send_bytes(respond(**message))


async def _close(ws: WebSocket, code: int = 1000) -> None:
    if ws.application_state is WebSocketState.CONNECTED:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await ws.close(code)


def _leave(action: int, reason: int) -> rtc.LeaveRequest:
    return rtc.LeaveRequest(
        can_reconnect=action == rtc.LeaveRequest.Action.RECONNECT,
        reason=reason,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
    )


class Participant:
    """One client in a room: the session's publisher (its token may publish) or a viewer."""

    def __init__(self, ws: WebSocket, state: AppState, session: Session, grant: Grant) -> None:
        self.ws = ws
        self.state = state
        self.session = session
        self.grant = grant
        self.publishes = grant.can_publish
        self.sid = new_sid("PA_")
        self.ids = RoomIds.of(session.id)
        self.output: Viewer = session.add_output(watcher=not self.publishes)
        self._pending: dict[int, list[Candidate]] = {rtc.PUBLISHER: [], rtc.SUBSCRIBER: []}
        self._offer_id = 0
        self._gone = asyncio.Event()
        self._gate = state.limits.message_gate()
        #: A viewer's publisher connection, which carries nothing (`_answer_viewer`).
        self.inbound: RTCPeerConnection | None = None

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        rooms = self.state.rooms
        if self.publishes:
            previous = rooms.publishers.get(self.session.id)
            rooms.publishers[self.session.id] = self
            if previous is not None:
                await previous.replaced()
                await self.session.drop_publisher()
        logger.info(
            "session %s: %s joined its room",
            self.session.id,
            "publisher" if self.publishes else "a viewer",
        )
        try:
            await self._send(join=self._join_response())
            await self._offer_output()
            signals = asyncio.create_task(self._signals())
            ended = asyncio.create_task(self.session.ended.wait())
            gone = asyncio.create_task(self._gone.wait())
            await asyncio.wait({signals, ended, gone}, return_when=asyncio.FIRST_COMPLETED)
            for task in (signals, ended, gone):
                task.cancel()
            await asyncio.gather(signals, ended, gone, return_exceptions=True)
            if not signals.cancelled() and (failure := signals.exception()) is not None:
                logger.error("room signaling failed", exc_info=failure)
            if self.session.ended.is_set():
                await self.leave(rtc.LeaveRequest.Action.DISCONNECT, models.ROOM_DELETED)
        finally:
            await self.close()

    async def _signals(self) -> None:
        async for frame in self._frames():
            try:
                request = parse_request(frame)
            except SignalError as exc:
                logger.info("session %s: closing a room socket: %s", self.session.id, exc)
                await self._close(CLOSE_UNSUPPORTED)
                return
            if not await self._handle(request):
                return

    async def _frames(self) -> AsyncIterator[bytes | str]:
        """Frames until the socket closes, or `PING_TIMEOUT` passes without one."""
        while True:
            try:
                async with asyncio.timeout(PING_TIMEOUT):
                    event = await self.ws.receive()
            except TimeoutError:
                logger.info("session %s: a room participant stopped pinging", self.session.id)
                return
            if event["type"] == "websocket.disconnect":
                return
            if not self._gate.admit()[0]:
                self.state.metrics.refused(RATE_LIMIT_REASON)
                continue  # over the message rate: dropped unread, as on /v1/stream
            text = event.get("text")
            yield text if text is not None else event.get("bytes") or b""

    async def _handle(self, request: rtc.SignalRequest) -> bool:
        """Act on one request; False when the participant leaves."""
        kind = request.WhichOneof("message")
        if kind == "offer":
            await self._answer(request.offer)
        elif kind == "answer":
            await self._accept_answer(request.answer)
        elif kind == "trickle":
            await self._trickle(request.trickle)
        elif kind == "add_track":
            await self._publish(request.add_track)
        elif kind == "ping":
            await self._send(pong=request.ping)
        elif kind == "ping_req":
            now = int(time.time() * 1000)
            await self._send(
                pong_resp=rtc.Pong(last_ping_timestamp=request.ping_req.timestamp, timestamp=now)
            )
        elif kind == "leave":
            return False
        # Everything else (subscriptions, track settings, layers, mutes, metadata, sync
        # state, simulations) asks for what this room does anyway or does not do.
        return True

    # -- join ---------------------------------------------------------------------------

    def _join_response(self) -> rtc.JoinResponse:
        spec = self.session.spec
        engine = self.state.rooms.engine_info(spec, self.ids, audio=self._has_audio())
        me = models.ParticipantInfo(
            sid=self.sid,
            identity=self.grant.identity,
            name=self.grant.name or self.grant.identity,
            state=models.ParticipantInfo.State.JOINED,
            joined_at=int(time.time()),
            version=1,
            permission=models.ParticipantPermission(
                can_subscribe=True,
                can_publish=self.publishes,
                can_publish_data=self.publishes,
            ),
        )
        room = models.Room(
            sid=self.ids.room,
            name=self.session.id,
            empty_timeout=0,
            max_participants=0,
            creation_time=int(self.state.rooms.created),
            num_participants=2,
            num_publishers=1 + int(self.publishes),
        )
        return rtc.JoinResponse(
            room=room,
            participant=me,
            other_participants=[engine],
            server_version=SERVER_VERSION,
            server_info=models.ServerInfo(
                edition=models.ServerInfo.Edition.Standard,
                version=SERVER_VERSION,
                protocol=PROTOCOL,
                node_id=self.state.rooms.node,
            ),
            subscriber_primary=False,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            client_configuration=models.ClientConfiguration(
                resume_connection=models.ClientConfigSetting.DISABLED
            ),
            enabled_publish_codecs=PUBLISH_CODECS,
        )

    def _has_audio(self) -> bool:
        return self.session.audio is not None

    # -- the publisher connection (client offers) ---------------------------------------

    async def _answer(self, offer: rtc.SessionDescription) -> None:
        try:
            if self.publishes:
                sdp = await self.session.accept_publisher_offer(offer.sdp)
            else:
                sdp = await self._answer_viewer(offer.sdp)
        except Exception as exc:  # aiortc raises assorted errors on a malformed SDP
            logger.info("session %s: refused a room offer: %r", self.session.id, exc)
            await self.leave(rtc.LeaveRequest.Action.DISCONNECT, models.JOIN_FAILURE)
            self._gone.set()
            return
        answer = keep_best_layer(offer.sdp, sdp)
        if self.publishes:
            answer = hint_bitrate(answer, START_KBPS, MIN_KBPS)
        await self._send(answer=rtc.SessionDescription(type="answer", sdp=answer, id=offer.id))
        await self._apply_pending(rtc.PUBLISHER)
        await self._offer_audio()

    async def _answer_viewer(self, sdp: str) -> str:
        """A viewer's publisher connection: LiveKit's Rust client negotiates one even when
        it may not publish (its data channels), and waits for it to connect. Every media
        section is answered inactive: a viewer's token may not publish."""
        if self.inbound is None:
            self.inbound = new_peer_connection()
        pc = self.inbound
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        for transceiver in pc.getTransceivers():
            transceiver.direction = "inactive"
        await pc.setLocalDescription(await pc.createAnswer())
        return pc.localDescription.sdp

    async def _publish(self, request: rtc.AddTrackRequest) -> None:
        """Acknowledge a track the client is about to publish, with its LiveKit id."""
        if not self.publishes:
            return
        track = models.TrackInfo(
            sid=new_sid("TR_"),
            type=request.type,
            source=request.source,
            name=request.name,
            width=request.width,
            height=request.height,
            muted=request.muted,
            simulcast=len(request.layers) > 1,
            layers=request.layers,
            stream=request.stream,
        )
        await self._send(track_published=rtc.TrackPublishedResponse(cid=request.cid, track=track))

    # -- the subscriber connection (server offers) --------------------------------------

    async def _offer_output(self) -> None:
        await self._send_offer(await self.output.offer())

    async def _offer_audio(self) -> None:
        """The session's audio, when it began after this participant joined: the engine
        participant publishes a second track (told first, as LiveKit's server does), and
        the subscriber connection is offered again with it."""
        sdp = await self.output.offer_audio()
        if sdp is None:
            return
        engine = self.state.rooms.engine_info(self.session.spec, self.ids, audio=True)
        await self._send(update=rtc.ParticipantUpdate(participants=[engine]))
        await self._send_offer(sdp)

    async def _send_offer(self, sdp: str) -> None:
        labels = {
            mid: (self.ids.engine, self.ids.video if kind == "video" else self.ids.audio)
            for mid, kind in self.output.media()
        }
        self._offer_id += 1
        await self._send(
            offer=rtc.SessionDescription(
                type="offer", sdp=label_tracks(sdp, labels), id=self._offer_id
            )
        )

    async def _accept_answer(self, answer: rtc.SessionDescription) -> None:
        try:
            await self.output.accept_answer(answer.sdp)
        except Exception as exc:
            logger.info("session %s: refused a room answer: %r", self.session.id, exc)
            return
        await self._apply_pending(rtc.SUBSCRIBER)
        await self._offer_audio()

    # -- candidates ---------------------------------------------------------------------

    async def _trickle(self, trickle: rtc.TrickleRequest) -> None:
        candidate = _candidate(trickle.candidateInit)
        if candidate is None:
            return
        target = trickle.target
        if target not in self._pending:
            return
        pending = self._pending[target]
        if len(pending) >= MAX_PENDING_CANDIDATES:
            return
        pending.append(candidate)
        await self._apply_pending(target)

    async def _apply_pending(self, target: int) -> None:
        """Apply the candidates kept for `target` once its remote description is set."""
        if target == rtc.PUBLISHER:
            pc = self.session.pc if self.publishes else self.inbound
        else:
            pc = self.output.pc
        if pc is None or pc.remoteDescription is None:
            return
        pending, self._pending[target] = self._pending[target], []
        for candidate in pending:
            try:
                await pc.addIceCandidate(candidate.to_aiortc())
            except Exception as exc:
                logger.debug("session %s: a candidate was not applied: %r", self.session.id, exc)

    # -- leaving ------------------------------------------------------------------------

    async def replaced(self) -> None:
        """Another connection of the same publisher joined: this one goes."""
        await self.leave(rtc.LeaveRequest.Action.DISCONNECT, models.DUPLICATE_IDENTITY)
        self._gone.set()

    async def leave(self, action: int, reason: int) -> None:
        await self._send(leave=_leave(action, reason))

    async def close(self) -> None:
        await self.output.close()
        if self.inbound is not None:
            await self.inbound.close()
        rooms = self.state.rooms
        if self.publishes and rooms.publishers.get(self.session.id) is self:
            del rooms.publishers[self.session.id]
            await self.session.drop_publisher()
        await self._close()

    async def _close(self, code: int = 1000) -> None:
        await _close(self.ws, code)

    async def _send(self, **message: object) -> None:
        await _send(self.ws, **message)


#: What a publisher's camera is asked to start at and stay above (livekit/sdp.py, "Bitrate"):
#: a 720p camera at LiveKit's own default for that size; the floor keeps the engine fed
#: with a picture it can read while aiortc's REMB estimate ramps up.
START_KBPS = 1700
MIN_KBPS = 800
#: Candidates kept for a connection whose remote description is not set yet.
MAX_PENDING_CANDIDATES = 32
#: The LiveKit server version this endpoint answers as: the clients gate features on it.
SERVER_VERSION = "1.9.0"


def _candidate(init: str) -> Candidate | None:
    """A trickled `RTCIceCandidateInit` (JSON), or None when it is not one or is the end."""
    try:
        data = json.loads(init)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    line, mid, index = data.get("candidate"), data.get("sdpMid"), data.get("sdpMLineIndex")
    if not isinstance(line, str) or not line.strip():
        return None
    if mid is not None and not isinstance(mid, str):
        return None
    if index is not None and (not isinstance(index, int) or isinstance(index, bool)):
        return None
    return Candidate(line, mid, index)
