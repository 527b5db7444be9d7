"""One signaling attempt: a WebSocket and the RTCPeerConnection it negotiates.

A `Signaling` never retries and never comes back to life once ended: a reconnect makes a new
one. That keeps the acks, ICE candidates and peer-connection events of a dead attempt from
leaking into the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCIceCandidate,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from ..errors import ErrorCode, LivemorphError, error_from_server_text
from ..protocol import (
    IMAGE_ACK_TIMEOUT,
    MAX_MESSAGE_BYTES,
    PROMPT_ACK_TIMEOUT,
    Answer,
    Candidate,
    ClientMessage,
    Error,
    GenerationEnded,
    GenerationStarted,
    GenerationTick,
    IceCandidate,
    IceServers,
    MessageError,
    Offer,
    Prompt,
    PromptAck,
    ServerMessage,
    SessionId,
    SetImage,
    SetImageAck,
    SubscribeTarget,
    UnknownMessage,
    parse_server,
    serialise,
)

logger = logging.getLogger(__name__)

ConnectionState = Literal["connecting", "connected", "generating", "disconnected", "reconnecting"]

#: How long the published SDKs wait for a `prompt_ack`, and for a `set_image_ack`.
PROMPT_TIMEOUT = PROMPT_ACK_TIMEOUT
IMAGE_TIMEOUT = IMAGE_ACK_TIMEOUT


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The attempt's connection state moved on."""

    state: ConnectionState


#: What an attempt reports: its state, the session it opened, the server's ticks and end,
#: an `error` the server sent, and each remote track.
SignalEvent = (
    StateChanged
    | SubscribeTarget
    | GenerationTick
    | GenerationEnded
    | LivemorphError
    | MediaStreamTrack
)
EventHandler = Callable[[SignalEvent], None]
#: Sees the offer before it is sent; may return (or resolve to) a replacement.
OfferHook = Callable[
    [RTCSessionDescription], Awaitable[RTCSessionDescription | None] | RTCSessionDescription | None
]


class WebSocketLike(Protocol):
    """The part of a `websockets` client connection that signaling uses."""

    async def send(self, message: str) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...


def redact_url(url: str) -> str:
    """The URL without its query string, which carries the API key."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def use_realtime_encoder(pc: RTCPeerConnection) -> None:
    """Encode the camera with livemorph's faster VP8 settings (see media/encoder.py)."""
    from ..media import encoder

    encoder.use_realtime_encoder(pc)


def install_jitter_buffer(pc: RTCPeerConnection) -> None:
    """Swap in livemorph's marker-bit jitter buffer so frames are released without delay."""
    from ..media import jitter

    jitter.install_on_peer_connection(pc)


class Signaling:
    """One WebSocket plus one RTCPeerConnection; reports a `SignalEvent` to `on_event`."""

    def __init__(
        self,
        url: str,
        *,
        on_event: EventHandler | None = None,
        ice_servers: Sequence[RTCIceServer] = (),
        handed_ice_servers: Sequence[RTCIceServer] = (),
        customize_offer: OfferHook | None = None,
        open_timeout: float = 10.0,
        fast_receive: bool = True,
        ssl: SSLContext | None = None,
    ) -> None:
        self.url = url
        self._ssl = ssl
        self._fast_receive = fast_receive
        self.state: ConnectionState = "connecting"
        self.pc: RTCPeerConnection | None = None
        self.session: SubscribeTarget | None = None
        #: The engine's fuller reading of the last enhanced prompt (from the acks).
        self.enhanced_prompt: str | None = None
        #: The last `error` the server sent, classified.
        self.error: LivemorphError | None = None
        self._last_was_error = False
        self._on_event = on_event
        self._ice_servers = list(ice_servers)
        #: The servers the server handed over (`ice_servers`), used after `ice_servers`
        #: when they arrive before the peer connection is made; a reconnect starts with
        #: the last attempt's.
        self.handed_ice_servers = list(handed_ice_servers)
        self._customize_offer = customize_offer
        self._open_timeout = open_timeout
        self._ws: WebSocketLike | None = None
        self._receive_task: asyncio.Task[None] | None = None
        self._pending_prompts: dict[str, deque[asyncio.Future[None]]] = {}
        self._pending_images: deque[asyncio.Future[None]] = deque()
        self._connected: asyncio.Future[None] | None = None
        self._queued_candidates: list[RTCIceCandidate] = []
        self._ended = False
        self._end_error: LivemorphError | None = None

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def end_error(self) -> LivemorphError | None:
        """Why the attempt ended; None while live or when closed by us."""
        return self._end_error

    # -- opening and closing --------------------------------------------------------------

    async def open(self, ws: WebSocketLike | None = None) -> None:
        """Open the WebSocket (or adopt `ws`, an already open one) and start reading it."""
        if ws is None:
            ws = await self._connect()
        self._ws = ws
        self._receive_task = asyncio.create_task(self._receive_loop(), name="livemorph-signaling")

    async def _connect(self) -> WebSocketLike:
        logger.debug("opening %s", redact_url(self.url))
        try:
            return await ws_connect(
                self.url,
                max_size=MAX_MESSAGE_BYTES,
                open_timeout=self._open_timeout,
                close_timeout=2.0,
                proxy=None,
                # given for wss:// only: websockets refuses a context for ws://, and None
                # for wss://; True there is the system's trust
                **_tls(self.url, self._ssl),
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise LivemorphError(
                    "invalid api key (HTTP 401)", ErrorCode.INVALID_API_KEY
                ) from None
            body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
            text = f"WebSocket refused: HTTP {status}" + (f" - {body}" if body else "")
            raise error_from_server_text(text) from None
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            raise LivemorphError(
                f"cannot open WebSocket to {redact_url(self.url)}: {exc}", ErrorCode.WEB_RTC_ERROR
            ) from None

    async def close(self) -> None:
        """End the attempt on purpose: close the peer connection and the WebSocket."""
        self._end(None)
        task = self._receive_task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pc is not None:
            await self.pc.close()
        if self._ws is not None:
            try:
                await self._ws.close()
            except Exception:  # already gone: nothing to tell the server
                logger.debug("closing the WebSocket failed", exc_info=True)

    def _end(self, error: LivemorphError | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        self._fail_pending(error or LivemorphError("connection closed", ErrorCode.WEB_RTC_ERROR))
        self._set_state("disconnected")

    # -- sending ----------------------------------------------------------------------------

    async def send(self, message: ClientMessage) -> None:
        """Send one message without waiting for any answer."""
        logger.debug("sending %s", message.type)
        await self._send_text(serialise(message))

    async def send_raw(self, message: dict[str, object]) -> None:
        """Low-level: send any JSON object as is, without waiting for any answer.

        The high-level clients never expose this; it exists for diagnostics and for tests of
        the server's refusals (a viewer trying to steer, a malformed field).
        """
        await self._send_text(json.dumps(message))

    async def _send_text(self, text: str) -> None:
        if self._ws is None or self._ended:
            if self._end_error is not None:
                raise _fresh(self._end_error)
            raise LivemorphError("not connected", ErrorCode.WEB_RTC_ERROR)
        try:
            await self._ws.send(text)
        except ConnectionClosed as exc:
            # The server may have said why just before closing: let the receive loop read it.
            task = self._receive_task
            if task is not None and task is not asyncio.current_task():
                await asyncio.wait({task}, timeout=1.0)
            if self._end_error is not None:
                raise _fresh(self._end_error) from None
            raise LivemorphError(f"connection closed: {exc}", ErrorCode.WEB_RTC_ERROR) from None

    async def send_prompt(
        self, text: str, enhance: bool = True, ack_timeout: float = PROMPT_TIMEOUT
    ) -> None:
        """Send `prompt` and wait for the `prompt_ack` that carries the same text."""
        future = asyncio.get_running_loop().create_future()
        self._pending_prompts.setdefault(text, deque()).append(future)
        try:
            await self.send(Prompt(text, enhance))
            await _wait(future, ack_timeout, "prompt acknowledgment")
        finally:
            _settle(future)
            waiters = self._pending_prompts.get(text)
            if waiters is not None:
                if future in waiters:
                    waiters.remove(future)
                if not waiters:
                    del self._pending_prompts[text]

    async def send_image(
        self,
        image: bytes | None,
        prompt: str | None = None,
        enhance: bool | None = None,
        ack_timeout: float = IMAGE_TIMEOUT,
        *,
        passthrough: bool = False,
    ) -> None:
        """Send `set_image` with an image file's bytes (None clears it) and wait for the next
        `set_image_ack` (acks come back in order).

        `passthrough` sends `image_data: null, prompt: null`, the published clients' way of
        saying "no transformation yet". `enhance` goes with a prompt only.
        """
        message = SetImage(
            image, prompt, enhance if prompt is not None else None, passthrough=passthrough
        )
        future = asyncio.get_running_loop().create_future()
        self._pending_images.append(future)
        try:
            await self.send(message)
            await _wait(future, ack_timeout, "image acknowledgment")
        finally:
            _settle(future)
            if future in self._pending_images:
                self._pending_images.remove(future)

    # -- negotiation -------------------------------------------------------------------------

    async def negotiate(
        self,
        tracks: Sequence[MediaStreamTrack] = (),
        *,
        receive: Sequence[str] = (),
        connect_timeout: float = 30.0,
    ) -> None:
        """Create the peer connection, trade offer and answer, wait until it is connected.

        `receive` adds recvonly transceivers first ("video" for live_avatar, "video" and
        "audio" for viewers); `tracks` are sent.
        """
        if self._ended:
            if self._end_error is not None:
                raise _fresh(self._end_error)
            raise LivemorphError("connection closed", ErrorCode.WEB_RTC_ERROR)
        servers = [*self._ice_servers, *self.handed_ice_servers]
        pc = RTCPeerConnection(RTCConfiguration(iceServers=servers))
        self.pc = pc
        pc.on("track", self._on_track)
        pc.on("connectionstatechange", self._on_pc_state)
        for kind in receive:
            pc.addTransceiver(kind, direction="recvonly")
        for track in tracks:
            pc.addTrack(track)
        if self._fast_receive:
            install_jitter_buffer(pc)

        offer = await pc.createOffer()
        if self._customize_offer is not None:
            result = self._customize_offer(offer)
            if inspect.isawaitable(result):
                result = await result
            if isinstance(result, RTCSessionDescription):
                offer = result
        await pc.setLocalDescription(offer)

        self._connected = asyncio.get_running_loop().create_future()
        try:
            if pc.connectionState == "connected":
                self._connected.set_result(None)
            await self.send(Offer(pc.localDescription.sdp))
            await _wait(self._connected, connect_timeout, "peer connection")
        finally:
            _settle(self._connected)
            self._connected = None

    def _on_track(self, track: MediaStreamTrack) -> None:
        logger.debug("remote %s track", track.kind)
        self._emit(track)

    def _on_pc_state(self) -> None:
        pc = self.pc
        if pc is None:
            return
        state = pc.connectionState
        logger.debug("peer connection %s", state)
        if state == "connected":
            if self._connected is not None and not self._connected.done():
                self._connected.set_result(None)
            self._set_state("connected")
        elif state in ("failed", "closed"):
            self._end(LivemorphError(f"peer connection {state}", ErrorCode.WEB_RTC_ERROR))

    # -- receiving ---------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self._ws is not None
        error: LivemorphError | None = None
        try:
            async for raw in self._ws:
                try:
                    message = parse_server(raw)
                except UnknownMessage as exc:
                    logger.debug("ignoring %r message", exc.kind)
                    continue
                except MessageError as exc:
                    logger.warning("ignoring a malformed message: %s", exc)
                    continue
                try:
                    await self.handle_message(message)
                except Exception:
                    logger.exception("error handling %s message", message.type)
        except ConnectionClosed:
            pass
        except Exception as exc:
            error = LivemorphError(f"WebSocket failed: {exc}", ErrorCode.WEB_RTC_ERROR)
        self._end(error or self._close_error())

    def _close_error(self) -> LivemorphError:
        """Why the server closed: a fatal `error` is one sent just before a non-normal close."""
        code = getattr(self._ws, "close_code", None)
        reason = getattr(self._ws, "close_reason", None) or ""
        if self._last_was_error and self.error is not None and code not in (1000, 1001):
            return self.error
        if reason:
            return error_from_server_text(reason)
        return LivemorphError(f"connection closed by server (code {code})", ErrorCode.WEB_RTC_ERROR)

    async def handle_message(self, message: ServerMessage) -> None:
        """Act on one message from the server (the receive loop calls this for each)."""
        self._last_was_error = isinstance(message, Error)
        match message:
            case Answer(sdp=sdp):
                await self._apply_answer(sdp)
            case IceCandidate(candidate=candidate):
                await self._add_candidate(candidate)
            case SessionId(session_id=session_id, server_ip=ip, server_port=port):
                self.session = SubscribeTarget(session_id, ip, port)
                self._emit(self.session)
            case PromptAck():
                self._resolve(self._pending_prompts.get(message.prompt or ""), message, "prompt")
            case SetImageAck():
                self._resolve(self._pending_images, message, "image")
            case GenerationStarted():
                self._set_state("generating")
            case IceServers(ice_servers=servers):
                self.handed_ice_servers = [server.to_aiortc() for server in servers]
            case GenerationTick() | GenerationEnded():
                self._emit(message)
            case Error(error=text):
                error = error_from_server_text(text)
                logger.warning("server error: %s", error.message)
                self.error = error
                if self.state == "connecting":
                    # Any error before the peer connection is up fails the attempt at once.
                    # Later ones may be harmless (a refused message): waiters then get their
                    # ack, or the close that follows a fatal error.
                    self._fail_pending(error)
                self._emit(error)

    def _resolve(
        self,
        waiters: deque[asyncio.Future[None]] | None,
        ack: PromptAck | SetImageAck,
        what: str,
    ) -> None:
        if ack.success and ack.enhanced_prompt:
            self.enhanced_prompt = ack.enhanced_prompt
        while waiters:
            future = waiters.popleft()
            if future.done():
                continue
            if ack.success:
                future.set_result(None)
            else:
                reason = ack.error or f"{what} refused"
                future.set_exception(LivemorphError(reason, ErrorCode.INVALID_INPUT))
            return
        logger.debug("unmatched %s ack", what)

    def _fail_pending(self, error: LivemorphError) -> None:
        futures: list[asyncio.Future[None]] = [*self._pending_images]
        for waiters in self._pending_prompts.values():
            futures.extend(waiters)
        if self._connected is not None:
            futures.append(self._connected)
        for future in futures:
            if not future.done():
                future.set_exception(_fresh(error))

    async def _apply_answer(self, sdp: str) -> None:
        pc = self.pc
        if pc is None:
            logger.warning("answer before offer: ignored")
            return
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="answer"))
            use_realtime_encoder(pc)
            for candidate in self._queued_candidates:
                await pc.addIceCandidate(candidate)
        except Exception as exc:
            error = LivemorphError(f"cannot apply answer: {exc}", ErrorCode.WEB_RTC_ERROR)
            if self._connected is not None and not self._connected.done():
                self._connected.set_exception(error)
            return
        finally:
            self._queued_candidates.clear()

    async def _add_candidate(self, line: Candidate | None) -> None:
        if line is None:
            return
        try:
            candidate = line.to_aiortc()
        except (AssertionError, ValueError, IndexError):
            logger.warning("ignoring a malformed ICE candidate")
            return
        if self.pc is not None and self.pc.remoteDescription is not None:
            await self.pc.addIceCandidate(candidate)
        else:
            self._queued_candidates.append(candidate)

    # -- events ------------------------------------------------------------------------------

    def _set_state(self, state: ConnectionState) -> None:
        if self.state == state or self.state == "disconnected":
            return
        if self.state == "generating" and state != "disconnected":
            return
        self.state = state
        self._emit(StateChanged(state))

    def _emit(self, event: SignalEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            logger.exception("error in signaling %s handler", type(event).__name__)


def _tls(url: str, context: SSLContext | None) -> dict[str, Any]:
    """websockets' `ssl` argument for `url`: `context` (or True, the system's trust) for
    wss://, nothing for ws://."""
    if not url.startswith("wss:"):
        return {}
    return {"ssl": context if context is not None else True}


def _settle(future: asyncio.Future[None] | None) -> None:
    """Mark a failed future's exception as seen when its waiter gave up another way."""
    if future is not None and future.done() and not future.cancelled():
        future.exception()


def _fresh(error: LivemorphError) -> LivemorphError:
    """A new exception with the same message and code, so each raise has its own traceback."""
    return LivemorphError(error.message, error.code)


async def _wait(future: asyncio.Future[None], seconds: float, what: str) -> None:
    try:
        await asyncio.wait_for(future, seconds)
    except TimeoutError:
        raise LivemorphError(f"{what} timed out after {seconds:g}s", ErrorCode.TIMEOUT) from None
