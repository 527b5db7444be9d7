"""The realtime WebSocket endpoints: `/v1/stream` (publish) and `/subscribe/{id}` (watch).

Each WebSocket carries the JSON signaling of protocol.md. Messages are handled in
order, one at a time, so acks come back in the order their requests were sent.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections.abc import Coroutine
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from ..engines import ModelNotAvailable
from ..engines.base import Controls
from ..media.frames import image_to_rgb
from ..models import UnknownModelError
from ..protocol import CLOSE_POLICY_VIOLATION, MAX_IMAGE_BYTES
from ..sessions import Session
from ..sessions.session import Viewer
from .state import AppState

logger = logging.getLogger(__name__)

router = APIRouter()

MAX_PROMPT_CHARS = 2000
CLOSE_TRY_AGAIN_LATER = 1013


class ClientError(Exception):
    """A request the client got wrong: answered with an `error`, the session goes on."""


class Channel:
    """A WebSocket with JSON send that never raises once the peer has gone."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

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

    async def messages(self):  # type: ignore[no-untyped-def]
        """Incoming JSON objects; malformed ones are answered here and skipped."""
        while True:
            event = await self.ws.receive()
            if event["type"] == "websocket.disconnect":
                return
            text = event.get("text")
            if text is None:
                await self.error("invalid message: expected a JSON text frame")
                continue
            try:
                message = json.loads(text)
            except json.JSONDecodeError:
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
    channel = Channel(ws)
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
    if state.sessions.full:
        await channel.fatal("Server at capacity, try again shortly", CLOSE_TRY_AGAIN_LATER)
        return

    session = Session(
        spec,
        principal,
        engine.open_session(spec),
        state.executor,
        channel.send,
        fast_receive=state.settings.fast_receive,
    )
    state.sessions.add(session)
    ip, port = _reply_address(ws, state)
    logger.info("session %s started: model %s", session.id, model)
    try:
        await channel.send(
            {"type": "session_id", "session_id": session.id, "server_ip": ip, "server_port": port}
        )
        await _until_either(_publisher_loop(channel, session), session.ended)
    finally:
        await session.close(notify=False)
        state.sessions.remove(session)
        await channel.close()


async def _until_either(loop: Coroutine[Any, Any, None], ended: asyncio.Event) -> None:
    """Run a message loop until the client leaves or the session ends, whichever is first."""
    tasks = {asyncio.create_task(loop), asyncio.create_task(ended.wait())}
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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


async def _handle_prompt(channel: Channel, session: Session, message: dict[str, Any]) -> None:
    prompt = message.get("prompt")
    ack: dict[str, Any] = {"type": "prompt_ack", "prompt": prompt}
    try:
        text = _valid_prompt(prompt)
        enhance = _optional_bool(message, "enhance_prompt", True)
    except ClientError as exc:
        await channel.send({**ack, "success": False, "error": str(exc)})
        return
    await session.apply(Controls(prompt=text, enhance=enhance, image=session.controls.image))
    await channel.send({**ack, "success": True, **_enhanced(session)})


async def _handle_set_image(channel: Channel, session: Session, message: dict[str, Any]) -> None:
    try:
        controls = await _image_controls(session.controls, message)
    except ClientError as exc:
        await channel.send({"type": "set_image_ack", "success": False, "error": str(exc)})
        return
    await session.apply(controls)
    await channel.send({"type": "set_image_ack", "success": True, **_enhanced(session)})


def _enhanced(session: Session) -> dict[str, str]:
    """The engine's fuller reading of an enhanced prompt, logged and sent with the ack.

    `enhanced_prompt` is an extra ack field: the published clients ignore it, ours expose it.
    """
    description = session.pipeline.engine.description
    if not description or not session.controls.enhance or session.controls.prompt is None:
        return {}
    logger.info(
        "session %s: prompt %r enhanced to %r", session.id, session.controls.prompt, description
    )
    return {"enhanced_prompt": description}


async def _image_controls(current: Controls, message: dict[str, Any]) -> Controls:
    """The controls a `set_image` asks for; both fields null means passthrough."""
    data = message.get("image_data")
    if data is not None and not isinstance(data, str):
        raise ClientError("image_data must be a base64 string or null")
    enhance = _optional_bool(message, "enhance_prompt", current.enhance)
    if "prompt" in message and message["prompt"] is None and data is None:
        return Controls()
    prompt = current.prompt
    if message.get("prompt") is not None:
        prompt = _valid_prompt(message["prompt"])
    image = None if data is None else await asyncio.to_thread(_decode_image, data)
    return Controls(prompt=prompt, enhance=enhance, image=image)


def _decode_image(data: str) -> Any:
    if len(data) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ClientError("image too large: the limit is 10 MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError("image_data is not valid base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise ClientError("image too large: the limit is 10 MB")
    try:
        return image_to_rgb(raw)
    except ValueError as exc:
        raise ClientError(f"invalid image: {exc}") from None


def _valid_prompt(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ClientError("prompt must be a non-empty string")
    if len(value) > MAX_PROMPT_CHARS:
        raise ClientError(f"prompt too long: the limit is {MAX_PROMPT_CHARS} characters")
    return value


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


async def _answer(accept: Any, sdp: str) -> str:
    try:
        return await accept(sdp)
    except ValueError as exc:
        raise ClientError(f"invalid offer: {exc}") from None
    except Exception as exc:  # aiortc raises assorted errors on a malformed SDP
        logger.info("rejected offer: %r", exc)
        raise ClientError("invalid offer: the SDP could not be applied") from None


async def _add_candidate(add: Any, message: dict[str, Any]) -> None:
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
    channel = Channel(ws)
    if await state.store.authenticate(ws.query_params.get("api_key")) is None:
        await channel.fatal("invalid api key")
        return
    session = state.sessions.get(session_id)
    if session is None or session.ended.is_set():
        await channel.fatal(f"invalid session: {session_id}")
        return
    viewer = await session.add_viewer(channel.send)
    try:
        await _until_either(_viewer_loop(channel, viewer), viewer.ended)
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
