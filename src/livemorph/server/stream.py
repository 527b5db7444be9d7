"""The realtime WebSocket endpoints: `/v1/stream` (publish) and `/subscribe/{id}` (watch).

Each WebSocket carries the JSON signaling of docs/protocol.md. Messages are handled in
order, one at a time, so acks come back in the order their requests were sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from ..cluster import ClusterUnavailable
from ..cluster.relay import RELAY_HEADER
from ..engines import ModelNotAvailable
from ..logs import bind_session, unbind_session
from ..models import UnknownModelError, stream_options_refusal
from ..policy import Policy
from ..protocol import (
    CLIENT_MESSAGES,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    VIEWER_MESSAGES,
    Answer,
    Candidate,
    ClientError,
    ClientMessage,
    Error,
    IceCandidate,
    LiveKitJoin,
    LiveKitRoomInfo,
    Offer,
    Prompt,
    PromptAck,
    QueuePosition,
    ServerMessage,
    SessionId,
    SetImage,
    SetImageAck,
    UnknownMessage,
    parse_client,
    serialise,
)
from ..sessions import Session
from ..sessions.metering import INSUFFICIENT_CREDITS, INSUFFICIENT_CREDITS_REASON
from ..sessions.pipeline import SessionClosedError
from ..sessions.session import (
    InputRefused,
    ModerationRefused,
    Viewer,
    hand_ice_servers,
    new_session_id,
)
from . import files
from .cluster import ClusterMember
from .limits import AT_CAPACITY, CLUSTER_UNAVAILABLE, TOO_MANY_MESSAGES, MessageGate
from .metrics import (
    AT_CAPACITY_REASON,
    CREDITS_REASON,
    INVALID_KEY_REASON,
    MODERATION_REASON,
    RATE_LIMIT_REASON,
    Metrics,
)
from .queue import AdmissionQueue, Inbox
from .rooms import livekit_url, reply_address
from .state import AppState

logger = logging.getLogger(__name__)

router = APIRouter()

#: Messages longer than this are parsed off the event loop: a 10 MB image's base64 takes
#: tens of milliseconds to decode, which other sessions' frames must not wait for.
PARSE_IN_THREAD_CHARS = 256 * 1024
VIEWER_CANNOT_STEER = "not allowed: a viewer cannot steer the session"
#: How long a client at a full node has to say whether it can wait in line.
FIRST_WORD_TIMEOUT = 2.0
#: Said to a socket that claims to be a member's relay without the cluster's signature.
BAD_RELAY = "permission denied: invalid relay signature"


class Channel:
    """A WebSocket that sends protocol messages and never raises once the peer has gone.

    `gate` limits the rate of incoming messages: those over it are dropped unread.
    `metrics` counts the messages by type, and the refusals told on this socket.
    """

    def __init__(
        self, ws: WebSocket, gate: MessageGate | None = None, metrics: Metrics | None = None
    ) -> None:
        self.ws = ws
        self.gate = gate
        self.metrics = metrics

    def refused(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.refused(reason)

    async def send(self, message: ServerMessage) -> None:
        if self.ws.application_state is not WebSocketState.CONNECTED:
            return
        try:
            await self.ws.send_text(serialise(message))
        except (WebSocketDisconnect, RuntimeError, OSError):
            logger.debug("dropped %s: websocket gone", message.type)
            return
        if self.metrics is not None:
            self.metrics.message("out", message.type)

    async def receive(
        self, frame: str | bytes, accepted: Mapping[str, type[ClientMessage]] = CLIENT_MESSAGES
    ) -> ClientMessage:
        """The frame parsed (`ClientError` when it is not a message `accepted` here),
        counted by its type: one that is not the protocol's counts as unknown."""
        try:
            message = await _parse(frame, accepted)
        except UnknownMessage as exc:
            self._count_in(exc.kind)
            raise
        except ClientError:
            self._count_in("")
            raise
        self._count_in(message.type)
        return message

    def _count_in(self, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.message("in", kind)

    async def error(self, text: str) -> None:
        await self.send(Error(text))

    async def fatal(self, text: str, code: int = CLOSE_POLICY_VIOLATION) -> None:
        """Send an error the client must not retry past, then close."""
        await self.error(text)
        await self.close(code)

    async def close(self, code: int = CLOSE_NORMAL) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.close(code)

    async def messages(self) -> AsyncIterator[str | bytes]:
        """Incoming frames as they came, each admitted by the rate gate; unparsed."""
        while True:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                return
            if self.gate is not None:
                admitted, tell = self.gate.admit()
                if not admitted:
                    self.refused(RATE_LIMIT_REASON)
                    if tell:
                        await self.error(TOO_MANY_MESSAGES)
                    continue
            text = event.get("text")
            yield text if text is not None else event.get("bytes") or b""


async def _parse(
    frame: str | bytes, accepted: Mapping[str, type[ClientMessage]] = CLIENT_MESSAGES
) -> ClientMessage:
    """The frame as a client message (`ClientError` when it is not one)."""
    if len(frame) > PARSE_IN_THREAD_CHARS:
        return await asyncio.to_thread(parse_client, frame, accepted)
    return parse_client(frame, accepted)


def _state(ws: WebSocket) -> AppState:
    return ws.app.state.livemorph


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state = _state(ws)
    await ws.accept()
    channel = Channel(ws, state.limits.message_gate(), state.metrics)
    if (relayed := await _relayed(ws, channel)) is None:
        return
    member = None if relayed else state.cluster  # a relayed session is not relayed again
    params = ws.query_params
    principal = await state.store.authenticate(params.get("api_key"))
    if principal is None:
        channel.refused(INVALID_KEY_REASON)
        await channel.fatal("invalid api key")
        return
    model = params.get("model") or ""
    try:
        spec, engine = state.engines.resolve(model)
    except UnknownModelError:
        await channel.fatal(f"model not found: {model!r} is not allowed, see GET /v1/models")
        return
    except ModelNotAvailable:
        if member is not None and await _relay_elsewhere(channel, member, model):
            return
        await channel.fatal(
            f"model not available on this server: {model} is not allowed here, see GET /v1/models"
        )
        return
    if (bad_options := stream_options_refusal(spec, params)) is not None:
        await channel.fatal(bad_options)
        return
    if not principal.may_use(model):
        await channel.fatal(f"permission denied: this token may not use model {model}")
        return
    if not await state.meter.admits(principal):
        channel.refused(CREDITS_REASON)
        await channel.fatal(INSUFFICIENT_CREDITS)
        return
    session_id = new_session_id()

    async def admit() -> str | None:
        """Why this session may not start here now, or None."""
        if state.cluster is None:
            return (
                await state.limits.refuse_session(principal.key_id, state.sessions)
                or state.capacity.refuse(spec, state.sessions.all())
                or (AT_CAPACITY if engine.full() else None)
            )
        try:
            return await state.cluster.admit(principal.key_id, spec, engine, session_id, relayed)
        except ClusterUnavailable as exc:
            logger.warning("cannot place a session: %s", exc)
            return CLUSTER_UNAVAILABLE

    refused = await admit()
    if (
        refused == AT_CAPACITY
        and member is not None
        and await _relay_elsewhere(channel, member, model)
    ):
        return
    inbox: Inbox | None = None
    if refused == AT_CAPACITY and not relayed and state.queue.open:
        # A client that can wait (it asks for a LiveKit room) waits in line.
        inbox = Inbox(channel.messages())
        refused = await _wait_in_line(channel, inbox, state.queue, admit)
        if refused is None and inbox.gone.is_set():
            await inbox.close()
            return
    if refused:
        # Transient: clients retry. Nothing is awaited from here until the session is added.
        logger.info(
            "refused a session of key %s: %s",
            principal.key_id,
            refused,
            extra={"key_id": principal.key_id, "model": model},
        )
        state.metrics.refused_by_limit(refused)
        if inbox is not None:
            await inbox.close()
        await channel.fatal(refused, CLOSE_TRY_AGAIN_LATER)
        return

    # What is logged from here on, by this task and what it starts (the pipeline, the
    # engine's worker calls, the peer connection), carries the session's fields.
    log_binding = bind_session(session_id, principal.key_id, model)
    session = Session(
        spec,
        principal,
        engine.open_session(spec),
        state.executor,
        channel.send,
        Policy(state.moderator, state.enhancer),
        fast_receive=state.settings.fast_receive,
        meter=state.meter,
        timings=state.metrics.frame_timings(model),
        session_id=session_id,
    )
    state.sessions.add(session)
    state.metrics.session_started(model, state.engines.engine_name(model))
    ip, port = reply_address(ws, state.settings)
    logger.info("session %s started: model %s", session.id, model)
    try:
        await state.meter.begin(session)
        await channel.send(SessionId(session.id, ip, port))
        await hand_ice_servers(channel.send)  # before any reply: known before the offer

        # The offer is checked again: sessions count once they negotiate media, so a crowd
        # that connected at once is sorted out there (server/capacity.py).
        def media_refusal() -> str | None:
            others = [s for s in state.sessions.all() if s is not session]
            return state.capacity.refuse(spec, others)

        def room_info() -> LiveKitRoomInfo:
            token = state.rooms.publisher_token(session.id)
            url = livekit_url(ws, state.settings)
            return LiveKitRoomInfo(url, token, session.id, session.id)

        frames = inbox if inbox is not None else channel.messages()

        async def image_file(file_id: str) -> bytes:
            return await files.image_file(state, principal.key_id, file_id)

        loop = _publisher_loop(channel, session, media_refusal, room_info, frames, image_file)
        await _until_either(channel, loop, session.ended)
    finally:
        if inbox is not None:
            await inbox.close()
        await session.close(notify=False)
        state.sessions.remove(session)
        state.queue.poke()
        state.metrics.session_ended(session)  # no await since the removal: counted once
        state.tidy.poke()
        if state.cluster is not None:
            await state.cluster.release(session.id, model, principal.key_id)
        if session.end_reason == INSUFFICIENT_CREDITS_REASON:
            await channel.fatal(INSUFFICIENT_CREDITS)  # after generation_ended; closes 1008
        await channel.close()
        unbind_session(log_binding)


async def _wait_in_line(
    channel: Channel,
    inbox: Inbox,
    queue: AdmissionQueue,
    admit: Callable[[], Awaitable[str | None]],
) -> str | None:
    """Keep a client that asks for a LiveKit room in line until `admit` lets it in (None),
    telling it its place; the refusal otherwise. A client whose first word is anything
    else (the direct protocol has no way to wait), or that says nothing for
    `FIRST_WORD_TIMEOUT`, hears the at-capacity refusal as before. The first frame stays
    in `inbox` for the message loop, as do those sent while waiting."""
    try:
        async with asyncio.timeout(FIRST_WORD_TIMEOUT):
            first = await inbox.next()
    except TimeoutError:
        return AT_CAPACITY
    if first is None:
        return None  # gone
    inbox.unread(first)
    try:
        message = await _parse(first)
    except ClientError:
        return AT_CAPACITY
    if not isinstance(message, LiveKitJoin):
        return AT_CAPACITY

    async def tell(position: int, size: int) -> None:
        await channel.send(QueuePosition(position, size))

    return await queue.wait_turn(admit, tell, inbox.gone)


async def _relayed(ws: WebSocket, channel: Channel) -> bool | None:
    """Whether another member relayed this socket here (its signature checked); None when
    it claims to be relayed and is not: it has been told so and closed."""
    signature = ws.headers.get(RELAY_HEADER)
    if signature is None:
        return False
    member = _state(ws).cluster
    if member is not None and member.is_relay(ws, signature):
        return True
    logger.warning("refused a relay with a bad signature from %s", ws.client)
    await channel.fatal(BAD_RELAY)
    return None


async def _relay_elsewhere(channel: Channel, member: ClusterMember, model: str) -> bool:
    """Hand this client to another member with room for `model`; False when none has.
    A Redis outage is told to the client here (transient) and counts as handed over."""
    try:
        return await member.relay_stream(channel.ws, model)
    except ClusterUnavailable as exc:
        logger.warning("cannot place a session: %s", exc)
        await channel.fatal(CLUSTER_UNAVAILABLE, CLOSE_TRY_AGAIN_LATER)
        return True


async def _until_either(
    channel: Channel, loop: Coroutine[Any, Any, None], ended: asyncio.Event
) -> None:
    """Run a message loop until the client leaves or the session ends, whichever is first.

    A bug in a handler is logged and closes the socket with 1011 and a transient `error`,
    rather than ending the session with a silent, normal-looking close.
    """
    runner = asyncio.create_task(loop)
    tasks = {runner, asyncio.create_task(ended.wait())}
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if not runner.cancelled() and (failure := runner.exception()) is not None:
        logger.error("message loop failed", exc_info=failure)
        await channel.error("internal server error, try again")
        await channel.close(CLOSE_INTERNAL_ERROR)


async def _publisher_loop(
    channel: Channel,
    session: Session,
    media_refusal: Callable[[], str | None] = lambda: None,
    room_info: Callable[[], LiveKitRoomInfo] | None = None,
    frames: AsyncIterable[str | bytes] | None = None,
    image_file: Callable[[str], Awaitable[bytes]] | None = None,
) -> None:
    async for frame in frames if frames is not None else channel.messages():
        try:
            message = await channel.receive(frame)
            if isinstance(message, Prompt):
                await channel.send(await _prompt(channel, session, message))
            elif isinstance(message, SetImage):
                await channel.send(await _set_image(channel, session, message, image_file))
            elif isinstance(message, Offer | LiveKitJoin):
                if session.pc is None and (refused := media_refusal()):
                    channel.refused(AT_CAPACITY_REASON)
                    await channel.fatal(refused, CLOSE_TRY_AGAIN_LATER)
                    return
                if isinstance(message, Offer):
                    await channel.send(Answer(await _answer(session.accept_offer, message.sdp)))
                elif room_info is None:
                    raise ClientError("livekit_join is not served on this connection")
                else:
                    await channel.send(room_info())
            else:
                await _add_candidate(session.add_ice_candidate, message)
        except ClientError as exc:
            await channel.send(exc.reply)
        except SessionClosedError:
            return  # it ended while an input waited: not a bug, and `stream` tells why


async def _prompt(channel: Channel, session: Session, message: Prompt) -> PromptAck:
    try:
        enhanced = await session.set_prompt(message.prompt, message.enhance_prompt)
    except InputRefused as exc:
        if isinstance(exc, ModerationRefused):
            channel.refused(MODERATION_REASON)
        return PromptAck(message.prompt, success=False, error=str(exc))
    return PromptAck(message.prompt, success=True, enhanced_prompt=enhanced)


async def _set_image(
    channel: Channel,
    session: Session,
    message: SetImage,
    image_file: Callable[[str], Awaitable[bytes]] | None = None,
) -> SetImageAck:
    if message.image_ref is not None:  # an uploaded file's id (/v1/files)
        if image_file is None:
            return SetImageAck(success=False, error="image_ref is not served here")
        try:
            message = replace(message, image=await image_file(message.image_ref))
        except ValueError as exc:
            return SetImageAck(success=False, error=str(exc))
    try:
        if message.passthrough:
            await session.passthrough()
            return SetImageAck(success=True)
        enhanced = await session.set_image(message.image, message.prompt, message.enhance_prompt)
    except InputRefused as exc:
        if isinstance(exc, ModerationRefused):
            channel.refused(MODERATION_REASON)
        return SetImageAck(success=False, error=str(exc))
    return SetImageAck(success=True, enhanced_prompt=enhanced)


async def _answer(accept: Callable[[str], Awaitable[str]], sdp: str) -> str:
    try:
        return await accept(sdp)
    except ValueError as exc:
        raise ClientError(f"invalid offer: {exc}") from None
    except Exception as exc:  # aiortc raises assorted errors on a malformed SDP
        logger.info("rejected offer: %r", exc)
        raise ClientError("invalid offer: the SDP could not be applied") from None


async def _add_candidate(
    add: Callable[[Candidate], Awaitable[None]], message: IceCandidate
) -> None:
    if message.candidate is None:
        return  # end of candidates
    try:
        await add(message.candidate)
    except ValueError as exc:
        raise ClientError(f"invalid ice-candidate: {exc}") from None
    except Exception:
        raise ClientError("invalid ice-candidate") from None


@router.websocket("/subscribe/{session_id}")
async def subscribe(ws: WebSocket, session_id: str) -> None:
    state = _state(ws)
    await ws.accept()
    channel = Channel(ws, state.limits.message_gate(), state.metrics)
    if (relayed := await _relayed(ws, channel)) is None:
        return
    if await state.store.authenticate(ws.query_params.get("api_key")) is None:
        channel.refused(INVALID_KEY_REASON)
        await channel.fatal("invalid api key")
        return
    session = state.sessions.get(session_id)
    if session is None and relayed is False and state.cluster is not None:
        try:
            if await state.cluster.relay_subscribe(ws, session_id):
                return
        except ClusterUnavailable as exc:
            logger.warning("cannot find session %s: %s", session_id, exc)
            await channel.fatal(CLUSTER_UNAVAILABLE, CLOSE_TRY_AGAIN_LATER)
            return
    if session is None or session.ended.is_set():
        await channel.fatal(f"invalid session: {session_id}")
        return
    viewer = await session.add_viewer(channel.send)
    try:
        await _until_either(channel, _viewer_loop(channel, viewer), viewer.ended)
    finally:
        await viewer.close()
        await channel.close()


async def _viewer_loop(channel: Channel, viewer: Viewer) -> None:
    async for frame in channel.messages():
        try:
            try:
                message = await channel.receive(frame, VIEWER_MESSAGES)
            except UnknownMessage as exc:
                if exc.kind in (Prompt.type, SetImage.type):
                    raise ClientError(VIEWER_CANNOT_STEER) from None
                raise
            if isinstance(message, Offer):
                await channel.send(Answer(await _answer(viewer.accept_offer, message.sdp)))
            elif isinstance(message, IceCandidate):
                await _add_candidate(viewer.add_ice_candidate, message)
        except ClientError as exc:
            await channel.send(exc.reply)
