"""Batch video jobs, as `decart==0.2.4`'s `client.queue` asks for them.

`POST /v1/jobs/{model}` takes a multipart form: the video in `data` and the edit in
`prompt` (or `reference_image`, or both), and optionally `enhance_prompt`; `seed`,
`resolution`, `start` and `end` are accepted and ignored (the output keeps the input's
size and length). It is answered `{"job_id", "status"}` at once; the node's worker
(`job_worker.py`) runs the job later. `GET /v1/jobs/{job_id}` says its status (and
`error` once failed, `progress` from 0 to 1 while it runs),
`GET /v1/jobs/{job_id}/content` gives the finished MP4. A job is
seen only with the key that submitted it. The video models are `models.VIDEO_MODELS`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from ..media.frames import image_to_rgb
from ..models import VIDEO_MODELS
from ..protocol import MAX_IMAGE_BYTES, check_prompt
from ..storage import DiskBudgetExceeded
from ..storage.jobs import COMPLETED, FAILED, PROCESSING, new_job_id
from ..transform import Source, TransformError
from .job_worker import JobWorker
from .metrics import KEY_JOB_LIMIT_REASON
from .rest import Refused, batch_caller, caller, error, multipart, save_upload
from .state import AppState

router = APIRouter()

#: The largest video a job may take.
MAX_VIDEO_BYTES = 200 * 1024 * 1024
#: The longest video a job may take, in seconds.
MAX_VIDEO_SECONDS = 5 * 60
#: The largest picture a job's video may have: 4K UHD. The engine renders at the input's
#: size, so a larger frame would cost memory and time out of all proportion to any use.
MAX_VIDEO_PIXELS = 3840 * 2160
#: The input's name in the job's folder.
INPUT_NAME = "input.video"
REFERENCE_NAME = "reference.image"

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _worker(request: Request) -> tuple[AppState, JobWorker]:
    state: AppState = request.app.state.livemorph
    assert state.job_worker is not None, "the app state is not open"
    return state, state.job_worker


def _text(form: Any, field: str) -> str | None:
    value = form.get(field)
    if value is None:
        return None
    if isinstance(value, UploadFile):
        raise Refused(400, f"invalid request body: {field} must be text, not a file")
    return str(value)


def _check_reference(path: Path) -> None:
    """Refuse a reference image that is not a PNG, JPEG or WebP picture of a sane size."""
    try:
        image_to_rgb(path.read_bytes(), MAX_VIDEO_PIXELS)
    except ValueError as exc:
        raise Refused(415, f"invalid image: reference_image: {exc}") from None


def _probe(path: Path) -> None:
    """Refuse a file PyAV cannot read as a video, or one over the size or length limits."""
    try:
        source = Source.open(path)
    except TransformError:
        raise Refused(415, "invalid video: data is not a video file this server can read") from None
    try:
        if source.width * source.height > MAX_VIDEO_PIXELS:
            raise Refused(
                413,
                f"video frame too large: at most {MAX_VIDEO_PIXELS} pixels (3840x2160), "
                f"this one is {source.width}x{source.height}",
            )
        if source.duration is not None and source.duration > MAX_VIDEO_SECONDS:
            raise Refused(
                413,
                f"video too long: at most {MAX_VIDEO_SECONDS // 60} minutes, "
                f"this one is {source.duration:.0f} s",
            )
    finally:
        source.close()


@router.post("/v1/jobs/{model}", response_model=None)
async def submit(request: Request, model: str) -> Response:
    """Submit a video job: multipart `data` (the video) and `prompt`, optionally
    `reference_image` and `enhance_prompt`; answered with the job's id and status."""
    state, worker = _worker(request)
    admitted = await batch_caller(request, model, VIDEO_MODELS, "video")
    if isinstance(admitted, Response):
        return admitted
    principal = admitted[0]
    cap = state.settings.max_jobs_per_key
    if cap and await worker.jobs.in_flight(principal.key_id) >= cap:
        state.metrics.refused(KEY_JOB_LIMIT_REASON)
        return error(
            429,
            f"Too many jobs for this key: {cap} are waiting or running; "
            "try again when one has finished",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_VIDEO_BYTES + MAX_IMAGE_BYTES + (1 << 20):
        return error(413, f"file too large: data may be at most {MAX_VIDEO_BYTES >> 20} MB")
    job_id = new_job_id()
    try:
        form = await multipart(request, max_files=4, max_fields=16)
        try:
            data = form.get("data")
            if data is None:
                raise Refused(400, "invalid request body: data (the video) is required")
            if not isinstance(data, UploadFile):
                raise Refused(415, "invalid video: data must be a video file")
            reference = form.get("reference_image")
            if reference is not None and not isinstance(reference, UploadFile):
                raise Refused(415, "invalid image: reference_image must be an image file")
            raw_prompt = _text(form, "prompt")
            prompt: str | None = None
            if raw_prompt is None and reference is None:
                raise Refused(400, "invalid request body: prompt or reference_image is required")
            if raw_prompt is not None and (raw_prompt.strip() or reference is None):
                # an empty prompt beside a reference image is none (as lucy-2.1's clients send)
                try:
                    prompt = check_prompt(raw_prompt)
                except ValueError as exc:
                    raise Refused(400, str(exc)) from None
            enhance_text = (_text(form, "enhance_prompt") or "true").strip().lower()
            if enhance_text not in _TRUE | _FALSE:
                raise Refused(
                    400,
                    f"invalid request body: enhance_prompt must be true or false, "
                    f"not {enhance_text!r}",
                )
            seed = _text(form, "seed")
            if seed is not None and not seed.strip().lstrip("-").isdigit():
                raise Refused(400, f"invalid request body: seed must be an integer, not {seed!r}")
            incoming = (data.size or 0) + (reference.size or 0 if reference else 0)
            try:
                await worker.check_disk(incoming)
            except DiskBudgetExceeded as exc:
                raise Refused(507, str(exc)) from None
            size = await save_upload(
                worker.files, job_id, INPUT_NAME, data, MAX_VIDEO_BYTES, INPUT_NAME
            )
            if size == 0:
                raise Refused(400, "invalid video: data is empty")
            params: dict[str, Any] = {"prompt": prompt, "enhance_prompt": enhance_text in _TRUE}
            if reference is not None:
                await save_upload(
                    worker.files, job_id, REFERENCE_NAME, reference, MAX_IMAGE_BYTES, REFERENCE_NAME
                )
                params["reference_image"] = worker.files.relative(job_id, REFERENCE_NAME)
                reference_path = worker.files.path(params["reference_image"])
                await asyncio.to_thread(_check_reference, reference_path)
            input_path = worker.files.relative(job_id, INPUT_NAME)
            await asyncio.to_thread(_probe, worker.files.path(input_path))
        finally:
            await form.close()
    except Refused as exc:
        worker.files.delete(job_id)
        return error(exc.status, exc.message)
    except BaseException:
        worker.files.delete(job_id)
        raise
    job = await worker.jobs.create_job(
        principal.key_id, model, input_path, size, params, job_id=job_id
    )
    worker.wake()
    return JSONResponse({"job_id": job.id, "status": job.status})


def _not_found(job_id: str) -> Response:
    return error(404, f"job not found: {job_id!r}")


@router.get("/v1/jobs/{job_id}", response_model=None)
async def status(request: Request, job_id: str) -> Response:
    """The job's status: pending, processing, completed or failed (with `error`)."""
    state, worker = _worker(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, Response):
        return principal
    job = await worker.jobs.get_job(job_id, principal.key_id)
    if job is None:
        return _not_found(job_id)
    body: dict[str, Any] = {"job_id": job.id, "status": job.status}
    if job.status == FAILED:
        body["error"] = job.error or "the job failed"
    elif job.status == PROCESSING and job.progress is not None:
        body["progress"] = round(job.progress, 3)
    return JSONResponse(body)


@router.get("/v1/jobs/{job_id}/content", response_model=None)
async def content(request: Request, job_id: str) -> Response:
    """The finished job's video (MP4); 409 while it is not completed."""
    state, worker = _worker(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, Response):
        return principal
    job = await worker.jobs.get_job(job_id, principal.key_id)
    if job is None:
        return _not_found(job_id)
    if job.status == FAILED:
        return error(409, f"job failed: {job.error or 'no output'}")
    if job.status != COMPLETED or job.output_path is None:
        return error(409, f"job not completed: it is {job.status}; poll its status")
    path = worker.files.path(job.output_path)
    if not path.is_file():
        return error(410, "job output expired: its video is no longer kept")
    return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")
