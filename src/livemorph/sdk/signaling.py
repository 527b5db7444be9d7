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
from ..protocol import MAX_MESSAGE_BYTES, SubscribeTarget, parse_candidate

logger = logging.getLogger(__name__)

ConnectionState = Literal["connecting", "connected", "generating", "disconnected", "reconnecting"]

#: How long the published SDKs wait for a `prompt_ack`.
PROMPT_TIMEOUT = 15.0
#: How long the published SDKs wait for a `set_image_ack`.
IMAGE_TIMEOUT = 30.0

EventHandler = Callable[[str, Any], None]
OfferHook = Callable[[RTCSessionDescription], Awaitable[Any] | Any]


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
    """One WebSocket plus one RTCPeerConnection; emits events through `on_event(kind, payload)`.

    Event kinds: "state" (ConnectionState), "error" (LivemorphError), "session_id"
    (SubscribeTarget), "generation_tick" (int seconds), "generation_ended" ((seconds, reason)),
    "track" (MediaStreamTrack).
    """

    def __init__(
        self,
        url: str,
        *,
        on_event: EventHandler | None = None,
        ice_servers: Sequence[RTCIceServer] = (),
        customize_offer: OfferHook | None = None,
        open_timeout: float = 10.0,
        fast_receive: bool = True,
    ) -> None:
        self.url = url
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

    async def send_raw(self, message: dict[str, Any]) -> None:
        """Low-level: send one JSON message as is, without waiting for any answer.

        The high-level clients never expose this; it exists for diagnostics and for tests of
        the server's refusals (a viewer trying to steer, say).
        """
        if self._ws is None or self._ended:
            if self._end_error is not None:
                raise _fresh(self._end_error)
            raise LivemorphError("not connected", ErrorCode.WEB_RTC_ERROR)
        logger.debug("sending %s", message.get("type"))
        try:
            await self._ws.send(json.dumps(message))
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
            await self.send_raw({"type": "prompt", "prompt": text, "enhance_prompt": enhance})
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
        image_data: str | None,
        prompt: str | None = None,
        enhance: bool | None = None,
        ack_timeout: float = IMAGE_TIMEOUT,
        *,
        passthrough: bool = False,
    ) -> None:
        """Send `set_image` and wait for the next `set_image_ack` (acks come back in order).

        `passthrough` sends `image_data: null, prompt: null`, the published clients' way of
        saying "no transformation yet".
        """
        message: dict[str, Any] = {"type": "set_image", "image_data": image_data}
        if passthrough:
            message["prompt"] = None
        elif prompt is not None:
            message["prompt"] = prompt
            if enhance is not None:
                message["enhance_prompt"] = enhance
        future = asyncio.get_running_loop().create_future()
        self._pending_images.append(future)
        try:
            await self.send_raw(message)
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
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
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
            await self.send_raw({"type": "offer", "sdp": pc.localDescription.sdp})
            await _wait(self._connected, connect_timeout, "peer connection")
        finally:
            _settle(self._connected)
            self._connected = None

    def _on_track(self, track: MediaStreamTrack) -> None:
        logger.debug("remote %s track", track.kind)
        self._emit("track", track)

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
                if not isinstance(raw, str):
                    continue
                try:
                    data = json.loads(raw)
                except ValueError:
                    logger.warning("ignoring a message that is not JSON")
                    continue
                if not isinstance(data, dict):
                    continue
                try:
                    await self.handle_message(data)
                except Exception:
                    logger.exception("error handling %s message", data.get("type"))
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

    async def handle_message(self, data: dict[str, Any]) -> None:
        """Act on one message from the server (the receive loop calls this for each)."""
        kind = data.get("type")
        self._last_was_error = kind == "error"
        enhanced = data.get("enhanced_prompt")
        if kind in ("prompt_ack", "set_image_ack") and data.get("success") and enhanced:
            self.enhanced_prompt = str(enhanced)
        if kind == "answer":
            await self._apply_answer(str(data.get("sdp") or ""))
        elif kind == "ice-candidate":
            await self._add_candidate(data.get("candidate"))
        elif kind == "session_id":
            self.session = SubscribeTarget(
                str(data.get("session_id") or ""),
                str(data.get("server_ip") or ""),
                int(data.get("server_port") or 0),
            )
            self._emit("session_id", self.session)
        elif kind == "prompt_ack":
            waiters = self._pending_prompts.get(str(data.get("prompt")))
            self._resolve(waiters, data, "prompt")
        elif kind == "set_image_ack":
            self._resolve(self._pending_images, data, "image")
        elif kind == "generation_started":
            self._set_state("generating")
        elif kind == "generation_tick":
            self._emit("generation_tick", int(data.get("seconds") or 0))
        elif kind == "generation_ended":
            self._emit(
                "generation_ended", (int(data.get("seconds") or 0), str(data.get("reason") or ""))
            )
        elif kind == "error":
            error = error_from_server_text(str(data.get("error") or "unknown server error"))
            logger.warning("server error: %s", error.message)
            self.error = error
            if self.state == "connecting":
                # Any error before the peer connection is up fails the attempt at once. Later
                # ones may be harmless (a refused message): waiters then get their ack, or
                # the close that follows a fatal error.
                self._fail_pending(error)
            self._emit("error", error)
        else:
            logger.debug("ignoring %r message", kind)

    def _resolve(
        self, waiters: deque[asyncio.Future[None]] | None, data: dict[str, Any], what: str
    ) -> None:
        while waiters:
            future = waiters.popleft()
            if future.done():
                continue
            if data.get("success"):
                future.set_result(None)
            else:
                reason = str(data.get("error") or f"{what} refused")
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

    async def _add_candidate(self, payload: Any) -> None:
        if not isinstance(payload, dict):
            return
        try:
            candidate = parse_candidate(payload)
        except (AssertionError, ValueError, IndexError):
            logger.warning("ignoring a malformed ICE candidate")
            return
        if candidate is None:
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
        self._emit("state", state)

    def _emit(self, kind: str, payload: Any) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, payload)
        except Exception:
            logger.exception("error in signaling %s handler", kind)


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
