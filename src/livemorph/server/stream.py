"""The realtime WebSocket endpoints: `/v1/stream` (publish) and `/subscribe/{id}` (watch).

Each WebSocket carries the JSON signaling of docs/protocol.md. Messages are handled in
order, one at a time, so acks come back in the order their requests were sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from ..engines import ModelNotAvailable
from ..engines.base import Controls, EngineRefused, EngineUnavailable
from ..media.frames import image_to_rgb
from ..models import UnknownModelError
from ..policy import Expansion, refusal
from ..protocol import CLOSE_POLICY_VIOLATION, MAX_IMAGE_BYTES
from ..sessions import Session
from ..sessions.metering import INSUFFICIENT_CREDITS, INSUFFICIENT_CREDITS_REASON
from ..sessions.pipeline import SessionClosedError
from ..sessions.session import Viewer
from .limits import TOO_MANY_MESSAGES, MessageGate
from .state import AppState

logger = logging.getLogger(__name__)

router = APIRouter()

MAX_PROMPT_CHARS = 2000
IMAGE_TOO_LARGE = f"image too large: the limit is {MAX_IMAGE_BYTES // 2**20} MB"
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_INTERNAL_ERROR = 1011


class ClientError(Exception):
    """A request the client got wrong: answered with an `error`, the session goes on."""


class Channel:
    """A WebSocket with JSON send that never raises once the peer has gone.

    `gate` limits the rate of incoming messages: those over it are dropped unread.
    """

    def __init__(self, ws: WebSocket, gate: MessageGate | None = None) -> None:
        self.ws = ws
        self.gate = gate

    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.application_state is not WebSocketState.CONNECTED:
            return
        try:
            await self.ws.send_text(json.dumps(message))
        except (WebSocketDisconnect, RuntimeError, OSError):
            logger.debug("dropped %s: websocket gone", message.get("type"))

    async def error(self, text: str) -> None:
        await self.send({"type": "error", "error": text})

    async def fatal(self, text: str, code: int = CLOSE_POLICY_VIOLATION) -> None:
        """Send an error the client must not retry past, then close."""
        await self.error(text)
        await self.close(code)

    async def close(self, code: int = 1000) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await self.ws.close(code)

    async def messages(self) -> AsyncIterator[dict[str, Any]]:
        """Incoming JSON objects; malformed ones are answered here and skipped."""
        while True:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                return
            if self.gate is not None:
                admitted, tell = self.gate.admit()
                if not admitted:
                    if tell:
                        await self.error(TOO_MANY_MESSAGES)
                    continue
            text = event.get("text")
            if text is None:
                await self.error("invalid message: expected a JSON text frame")
                continue
            try:
                message = json.loads(text)
            except (ValueError, RecursionError):  # also too deep, or a number too long
                await self.error("invalid message: not valid JSON")
                continue
            if not isinstance(message, dict) or not isinstance(message.get("type"), str):
                await self.error("invalid message: expected an object with a string 'type'")
                continue
            yield message


def _state(ws: WebSocket) -> AppState:
    return ws.app.state.livemorph


def _reply_address(ws: WebSocket, state: AppState) -> tuple[str, int]:
    """The ip and port that reach this node, for `session_id` and subscribe tokens."""
    host = state.settings.public_host or ws.url.hostname or state.settings.host
    port = state.settings.public_port or ws.url.port or state.settings.port
    return host, int(port)


@router.websocket("/v1/stream")
async def stream(ws: WebSocket) -> None:
    state = _state(ws)
    await ws.accept()
    channel = Channel(ws, state.limits.message_gate())
    params = ws.query_params
    principal = await state.store.authenticate(params.get("api_key"))
    if principal is None:
        await channel.fatal("invalid api key")
        return
    model = params.get("model") or ""
    try:
        spec, engine = state.engines.resolve(model)
    except UnknownModelError:
        await channel.fatal(f"model not found: {model!r} is not allowed, see GET /v1/models")
        return
    except ModelNotAvailable:
        await channel.fatal(
            f"model not available on this server: {model} is not allowed here, see GET /v1/models"
        )
        return
    if not principal.may_use(model):
        await channel.fatal(f"permission denied: this token may not use model {model}")
        return
    if not await state.meter.admits(principal):
        await channel.fatal(INSUFFICIENT_CREDITS)
        return
    if refused := await state.limits.refuse_session(principal.key_id, state.sessions):
        # Transient: clients retry. Nothing is awaited from here until the session is added.
        logger.info("refused a session of key %s: %s", principal.key_id, refused)
        await channel.fatal(refused, CLOSE_TRY_AGAIN_LATER)
        return

    session = Session(
        spec,
        principal,
        engine.open_session(spec),
        state.executor,
        channel.send,
        fast_receive=state.settings.fast_receive,
        meter=state.meter,
    )
    state.sessions.add(session)
    ip, port = _reply_address(ws, state)
    logger.info("session %s started: model %s", session.id, model)
    try:
        await state.meter.begin(session)
        await channel.send(
            {"type": "session_id", "session_id": session.id, "server_ip": ip, "server_port": port}
        )
        await _until_either(channel, _publisher_loop(channel, session), session.ended)
    finally:
        await session.close(notify=False)
        state.sessions.remove(session)
        if session.end_reason == INSUFFICIENT_CREDITS_REASON:
            await channel.fatal(INSUFFICIENT_CREDITS)  # after generation_ended; closes 1008
        await channel.close()


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


async def _publisher_loop(channel: Channel, session: Session) -> None:
    async for message in channel.messages():
        kind = message["type"]
        try:
            if kind == "prompt":
                await _handle_prompt(channel, session, message)
            elif kind == "set_image":
                await _handle_set_image(channel, session, message)
            elif kind == "offer":
                sdp = _require_str(message, "sdp")
                answer = await _answer(session.accept_offer, sdp)
                await channel.send({"type": "answer", "sdp": answer})
            elif kind == "ice-candidate":
                await _add_candidate(session.add_ice_candidate, message)
            else:
                raise ClientError(f"unknown message type {kind!r}")
        except ClientError as exc:
            await channel.error(str(exc))
        except SessionClosedError:
            return  # it ended while an input waited: not a bug, and `stream` tells why


async def _handle_prompt(channel: Channel, session: Session, message: dict[str, Any]) -> None:
    state = _state(channel.ws)
    prompt = message.get("prompt")
    ack: dict[str, Any] = {"type": "prompt_ack", "prompt": prompt}
    try:
        text = _valid_prompt(prompt)
        enhance = _optional_bool(message, "enhance_prompt", True)
        await _moderate(state, prompt=text)
    except ClientError as exc:
        await channel.send({**ack, "success": False, "error": str(exc)})
        return
    expansion = await state.enhancer.expand(text, enhance)
    controls = Controls(prompt=expansion.prompt, enhance=enhance, image=session.controls.image)
    if failed := await _apply(session, controls):
        await channel.send({**ack, "success": False, "error": failed})
        return
    await channel.send({**ack, "success": True, **_enhanced(session, expansion)})


async def _handle_set_image(channel: Channel, session: Session, message: dict[str, Any]) -> None:
    ack: dict[str, Any] = {"type": "set_image_ack"}
    try:
        controls, expansion = await _image_controls(_state(channel.ws), session.controls, message)
    except ClientError as exc:
        await channel.send({**ack, "success": False, "error": str(exc)})
        return
    if failed := await _apply(session, controls):
        await channel.send({**ack, "success": False, "error": failed})
        return
    await channel.send({**ack, "success": True, **_enhanced(session, expansion)})


async def _apply(session: Session, controls: Controls) -> str | None:
    """Apply controls; why not, when the engine failed on them (the pipeline logs it).

    One input the engine cannot take is refused in its ack; the session goes on."""
    try:
        await session.apply(controls)
    except SessionClosedError:
        raise
    except EngineUnavailable as exc:
        return f"the engine could not apply this input: {exc.public}"
    except EngineRefused as exc:
        return str(exc)
    except Exception:
        return "the engine could not apply this input"
    return None


async def _moderate(state: AppState, prompt: str | None = None, image: bytes | None = None) -> None:
    """Raise the refusal, if the moderator refuses; before anything of the input is applied."""
    if (refused := await refusal(state.moderator, prompt, image)) is not None:
        logger.info("refused by moderation: %s", refused)
        raise ClientError(refused)


def _enhanced(session: Session, expansion: Expansion | None = None) -> dict[str, str]:
    """The fuller reading of an enhanced prompt, logged and sent with the ack.

    An enhancer's expansion when it made one (it logs it), else the engine's own.
    `enhanced_prompt` is an extra ack field: the published clients ignore it, ours expose it.
    """
    if expansion is not None and expansion.enhanced is not None:
        return {"enhanced_prompt": expansion.enhanced}
    description = session.pipeline.engine.description
    if not description or not session.controls.enhance or session.controls.prompt is None:
        return {}
    logger.info(
        "session %s: prompt %r enhanced to %r", session.id, session.controls.prompt, description
    )
    return {"enhanced_prompt": description}


async def _image_controls(
    state: AppState, current: Controls, message: dict[str, Any]
) -> tuple[Controls, Expansion | None]:
    """The controls a `set_image` asks for; both fields null means passthrough.

    The new prompt and image are moderated together: a refusal of either applies neither.
    """
    data = message.get("image_data")
    if data is not None and not isinstance(data, str):
        raise ClientError("image_data must be a base64 string or null")
    enhance = _optional_bool(message, "enhance_prompt", current.enhance)
    if "prompt" in message and message["prompt"] is None and data is None:
        return Controls(), None
    new_prompt = None
    if message.get("prompt") is not None:
        new_prompt = _valid_prompt(message["prompt"])
    raw = None if data is None else await asyncio.to_thread(_image_bytes, data)
    await _moderate(state, prompt=new_prompt, image=raw)
    image = None if raw is None else await asyncio.to_thread(_decode_image, raw)
    if new_prompt is None:
        return Controls(prompt=current.prompt, enhance=enhance, image=image), None
    expansion = await state.enhancer.expand(new_prompt, enhance)
    return Controls(prompt=expansion.prompt, enhance=enhance, image=image), expansion


def _image_bytes(data: str) -> bytes:
    """The image file in `image_data`; its size checked before and after decoding base64."""
    if len(data) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ClientError(IMAGE_TOO_LARGE)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("image_data is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ClientError(IMAGE_TOO_LARGE)
    return raw


def _decode_image(raw: bytes) -> np.ndarray:
    try:
        return image_to_rgb(raw)
    except ValueError as exc:
        raise ClientError(f"invalid image: {exc}") from None


def _valid_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClientError("prompt must be a non-empty string")
    if not _is_unicode(value):
        raise ClientError("prompt must be valid Unicode text: it has a lone surrogate")
    if len(value) > MAX_PROMPT_CHARS:
        raise ClientError(f"prompt too long: the limit is {MAX_PROMPT_CHARS} characters")
    return value


def _is_unicode(text: str) -> bool:
    """False for a string with lone surrogates (JSON's "\\ud800"): no text, and the
    tokenizers reading prompts refuse it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _optional_bool(message: dict[str, Any], key: str, default: bool) -> bool:
    value = message.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ClientError(f"{key} must be true or false")
    return value


def _require_str(message: dict[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value:
        raise ClientError(f"{message['type']} needs a string '{key}'")
    return value


async def _answer(accept: Callable[[str], Awaitable[str]], sdp: str) -> str:
    try:
        return await accept(sdp)
    except ValueError as exc:
        raise ClientError(f"invalid offer: {exc}") from None
    except Exception as exc:  # aiortc raises assorted errors on a malformed SDP
        logger.info("rejected offer: %r", exc)
        raise ClientError("invalid offer: the SDP could not be applied") from None


async def _add_candidate(
    add: Callable[[dict[str, Any]], Awaitable[None]], message: dict[str, Any]
) -> None:
    payload = message.get("candidate")
    if payload is not None and not isinstance(payload, dict):
        raise ClientError("ice-candidate needs a candidate object or null")
    if not payload or not payload.get("candidate"):
        return  # end of candidates
    try:
        await add(payload)
    except ValueError as exc:
        raise ClientError(f"invalid ice-candidate: {exc}") from None
    except Exception:
        raise ClientError("invalid ice-candidate") from None


@router.websocket("/subscribe/{session_id}")
async def subscribe(ws: WebSocket, session_id: str) -> None:
    state = _state(ws)
    await ws.accept()
    channel = Channel(ws, state.limits.message_gate())
    if await state.store.authenticate(ws.query_params.get("api_key")) is None:
        await channel.fatal("invalid api key")
        return
    session = state.sessions.get(session_id)
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
    async for message in channel.messages():
        kind = message["type"]
        try:
            if kind == "offer":
                answer = await _answer(viewer.accept_offer, _require_str(message, "sdp"))
                await channel.send({"type": "answer", "sdp": answer})
            elif kind == "ice-candidate":
                await _add_candidate(viewer.add_ice_candidate, message)
            elif kind in ("prompt", "set_image"):
                raise ClientError("not allowed: a viewer cannot steer the session")
            else:
                raise ClientError(f"unknown message type {kind!r}")
        except ClientError as exc:
            await channel.error(str(exc))
