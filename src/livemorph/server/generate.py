"""`POST /v1/generate/{model}`: image edits, as Decart's current clients ask for them.

`decart==0.2.4` (`client.process`) and `@decartai/sdk@0.1.20` send a multipart form: the
picture in `data`, the edit in `prompt` (both required), and optionally `reference_image`,
`enhance_prompt` (`True`/`true`...), `seed` and `resolution`; the key in `X-API-KEY`. The
answer is the edited picture's bytes.

The image models (`models.IMAGE_MODELS`) are not realtime: each is served by a realtime
model's engine, driven the way `livemorph transform` drives one over a file's frames: a
`Session` without a peer connection applies the prompt (and reference image) along the
session's own path (moderation, enhancement, the engine's `configure`), then the picture
goes through the engine's `transform` on the server's worker threads, as a few frames of a
still camera so that a temporal engine settles on its look. The answer is the input's
size, PNG (JPEG when the input was a JPEG, at high quality, so a photo stays a photo-sized
file). Seed and resolution are accepted and ignored: the engines here are deterministic,
and the output keeps the input's size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fractions
import io
import logging
import time
from typing import Any

import numpy as np
from av import VideoFrame
from fastapi import APIRouter, Request, Response
from PIL import Image
from starlette.datastructures import UploadFile

from ..engines import ModelNotAvailable
from ..media.frames import image_to_rgb
from ..models import IMAGE_MODELS, UnknownModelError
from ..policy import Policy
from ..protocol import IMAGE_TOO_LARGE, MAX_IMAGE_BYTES, check_prompt
from ..sessions.session import InputRefused, ModerationRefused, Session, new_session_id
from .rest import Refused, batch_caller, error, multipart
from .state import AppState

logger = logging.getLogger(__name__)

router = APIRouter()

#: What one edited image costs, in seconds of generation: a still is one frame of a
#: session plus a few to settle, well under a second of the engine's time, but credits are
#: counted in whole seconds (`Store.record_usage`), so an image is the smallest charge.
IMAGE_EDIT_SECONDS = 1
#: The longest an edit may take, engine loading included; past it the client gets a 504.
EDIT_TIMEOUT = 30.0
#: The most pixels a picture to edit may have: a 4K UHD frame. The engine works at the
#: picture's size, so this bounds its memory; larger pictures are refused (413).
MAX_EDIT_PIXELS = 3840 * 2160
#: The shortest side a picture may have.
MIN_EDIT_SIDE = 16
#: Frames of the still picture the engine sees; the answer is the last. The neural engine's
#: temporal blending starts afresh on a new prompt and holds still on a still picture, so
#: its look is settled by the first; a few more let a streaming engine (diffusion) settle.
SETTLE_FRAMES = 3
#: The largest request body: two images at their limit, the form's fields and framing.
MAX_BODY_BYTES = 2 * MAX_IMAGE_BYTES + 1024 * 1024
#: The output's JPEG quality, for a JPEG input.
JPEG_QUALITY = 92

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _state(request: Request) -> AppState:
    return request.app.state.livemorph


async def _body(request: Request) -> bytes:
    """The request body, read no further than `MAX_BODY_BYTES`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise Refused(413, IMAGE_TOO_LARGE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refused(413, IMAGE_TOO_LARGE)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request: Request) -> dict[str, str | bytes]:
    """The multipart form's fields (the last of a repeated one), from a bounded body: a
    file as its bytes, a text field as its text."""
    body = await _body(request)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    form = await multipart(replay, max_files=4, max_fields=16)
    try:
        fields: dict[str, str | bytes] = {}
        for key, value in form.multi_items():
            # a file's bytes (bounded by the body's limit), a text field's text
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
        return fields
    finally:
        await form.close()


async def _image(form: dict[str, str | bytes], field: str) -> tuple[bytes, np.ndarray, str] | None:
    """The named field's image: its bytes, RGB pixels and format; None when not sent."""
    value = form.get(field)
    if value is None:
        return None
    if not isinstance(value, bytes):
        raise Refused(415, f"invalid image: {field} must be an image file (PNG, JPEG or WebP)")
    data = value
    if len(data) > MAX_IMAGE_BYTES:
        raise Refused(413, IMAGE_TOO_LARGE)
    if not data:
        raise Refused(400, f"invalid image: {field} is empty")
    try:
        rgb = await asyncio.to_thread(image_to_rgb, data, MAX_EDIT_PIXELS)
    except ValueError as exc:
        if "too many pixels" in str(exc) or isinstance(exc.__cause__, Image.DecompressionBombError):
            raise Refused(
                413, f"image too large: {field} may have at most {MAX_EDIT_PIXELS} pixels"
            ) from None
        raise Refused(415, f"invalid image: {field}: {exc}") from None
    height, width = rgb.shape[:2]
    if min(width, height) < MIN_EDIT_SIDE and field == "data":
        raise Refused(422, f"image too small: each side of data at least {MIN_EDIT_SIDE} pixels")
    kind = "JPEG" if data[:3] == b"\xff\xd8\xff" else "PNG"
    return data, rgb, kind


def _text(form: dict[str, str | bytes], field: str) -> str | None:
    value = form.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused(400, f"invalid request body: {field} must be text, not a file")
    return value


def _enhance(form: dict[str, str | bytes]) -> bool:
    value = _text(form, "enhance_prompt")
    if value is None or value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise Refused(400, f"invalid request body: enhance_prompt must be true or false, not {value!r}")


def _encode(rgb: np.ndarray, kind: str) -> tuple[bytes, str]:
    out = io.BytesIO()
    picture = Image.fromarray(rgb)
    if kind == "JPEG":
        picture.save(out, format="JPEG", quality=JPEG_QUALITY)
        return out.getvalue(), "image/jpeg"
    picture.save(out, format="PNG")
    return out.getvalue(), "image/png"


async def _discard(_message: object) -> None:
    """A session's messages to a client: an image edit has no socket to tell."""


async def _edit(
    session: Session,
    state: AppState,
    rgb: np.ndarray,
    prompt: str,
    enhance: bool,
    reference: bytes | None,
    late: asyncio.Event,
) -> np.ndarray | None:
    """The edited picture at the session's size; None if `late` was set meanwhile. Closes
    the session once its last engine call has returned, even when the caller gave up."""
    try:
        if reference is not None:
            await session.set_image(reference, prompt, enhance)
        else:
            await session.set_prompt(prompt, enhance)
        loop = asyncio.get_running_loop()
        transform = session.pipeline.engine.transform
        out = None
        for index in range(SETTLE_FRAMES):
            if late.is_set():
                return None
            frame = VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = index, fractions.Fraction(1, session.spec.fps)
            # engine calls never overlap: each awaits the one before, after `configure`
            out = await loop.run_in_executor(state.executor, transform, frame)
        assert out is not None
        return await asyncio.to_thread(out.to_ndarray, format="rgb24")
    finally:
        await session.close(notify=False)


_running: set[asyncio.Task[Any]] = set()


async def _charge(state: AppState, session: Session, model: str) -> None:
    """Record the image's charge through the usage the sessions write (no schema of its own)."""
    try:
        await state.store.start_session_usage(session.id, session.principal, model)
        await state.store.record_usage(
            session.id, session.principal.key_id, model, IMAGE_EDIT_SECONDS
        )
        await state.store.end_session_usage(session.id, "image_edit")
    except Exception:
        logger.exception("image edit %s: its charge could not be recorded", session.id)


@router.post("/v1/generate/{model}", response_model=None)
async def generate(request: Request, model: str) -> Response:
    """Edit an image: multipart `data` (PNG, JPEG or WebP) and `prompt`, optional
    `reference_image` and `enhance_prompt`; answered with the edited image."""
    state = _state(request)
    admitted = await batch_caller(request, model, IMAGE_MODELS, "image")
    if isinstance(admitted, Response):
        return admitted
    principal, target = admitted
    try:
        spec, engine = state.engines.resolve(target)
    except (UnknownModelError, ModelNotAvailable):
        return error(404, f"model not available on this server: {model} is not allowed here")
    try:
        form = await _form(request)
        data = await _image(form, "data")
        if data is None:
            raise Refused(400, "invalid request body: data (the image to edit) is required")
        raw_prompt = _text(form, "prompt")
        if raw_prompt is None:
            raise Refused(400, "invalid request body: prompt is required")
        try:
            prompt = check_prompt(raw_prompt)
        except ValueError as exc:
            raise Refused(400, str(exc)) from None
        enhance = _enhance(form)
        reference = await _image(form, "reference_image")
        seed = _text(form, "seed")
        if seed is not None and not seed.strip().lstrip("-").isdigit():
            raise Refused(400, f"invalid request body: seed must be an integer, not {seed!r}")
    except Refused as exc:
        return error(exc.status, exc.message)
    image, rgb, kind = data
    refused = await Policy(state.moderator, state.enhancer).refusal(prompt=prompt, image=image)
    if refused is not None:
        return error(400, refused)

    height, width = rgb.shape[:2]
    # the engine renders at the picture's size (even sides, as its frames need)
    spec = dataclasses.replace(spec, width=width + width % 2, height=height + height % 2)
    session = Session(
        spec,
        principal,
        engine.open_session(spec),
        state.executor,
        _discard,
        Policy(state.moderator, state.enhancer),
        session_id=new_session_id(),
    )
    late = asyncio.Event()
    started = time.monotonic()
    task = asyncio.ensure_future(
        _edit(session, state, rgb, prompt, enhance, reference[0] if reference else None, late)
    )
    _running.add(task)
    task.add_done_callback(_running.discard)
    try:
        edited = await asyncio.wait_for(asyncio.shield(task), EDIT_TIMEOUT)
    except TimeoutError:
        late.set()  # the task ends after the engine call under way, and closes the session
        logger.warning("image edit %s: over %g s, given up", session.id, EDIT_TIMEOUT)
        return error(504, f"timed out: the edit took over {EDIT_TIMEOUT:g} s, try a smaller image")
    except InputRefused as exc:
        return error(400 if isinstance(exc, ModerationRefused) else 422, str(exc))
    assert edited is not None
    if edited.shape[:2] != (height, width):
        edited = np.asarray(
            Image.fromarray(edited).resize((width, height), Image.Resampling.LANCZOS)
        )
    body, media_type = await asyncio.to_thread(_encode, edited, kind)
    await _charge(state, session, model)
    logger.info(
        "image edit %s: %s %dx%d in %.2f s",
        session.id,
        model,
        width,
        height,
        time.monotonic() - started,
        extra={"key_id": principal.key_id, "model": model},
    )
    return Response(body, media_type=media_type)
