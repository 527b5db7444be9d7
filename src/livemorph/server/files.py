"""Uploaded files, as `@decartai/sdk`'s `client.files` calls them.

`POST /v1/files` takes a multipart form: the file in `file` and optionally `ttl_seconds`
(an integer from 60 to 30 days, or `persistent`: kept until deleted; DEFAULT_TTL when
absent). It is answered with the file's reference, `{"id", "filename", "mime_type",
"size_bytes", "created_at", "expires_at"}` (`id` starts `file_`, `expires_at` is null for a
persistent file); `GET /v1/files/{id}` answers the same, `DELETE /v1/files/{id}` deletes
the file (204). A file is seen only with the key that uploaded it; an expired one is 410
until `sweep_expired` deletes it, then 404. Its bytes count toward the jobs' disk budget.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from ..protocol import IMAGE_TOO_LARGE, MAX_IMAGE_BYTES
from ..storage import DiskBudgetExceeded, JobFiles
from ..storage.files import FileStore, StoredFile, new_file_id
from .jobs import MAX_VIDEO_BYTES
from .rest import Refused, caller, error, multipart, save_upload
from .state import AppState

router = APIRouter()

#: How long a file is kept when the upload does not say.
DEFAULT_TTL = timedelta(hours=24)
#: The shortest and longest `ttl_seconds` an upload may ask for (as the SDK checks them).
MIN_TTL_SECONDS = 60
MAX_TTL_SECONDS = 720 * 60 * 60
#: The file's name in its folder.
CONTENT_NAME = "content"


def _stores(request: Request) -> tuple[AppState, FileStore, JobFiles]:
    state: AppState = request.app.state.livemorph
    assert state.job_worker is not None, "the app state is not open"
    return state, FileStore(state.store), state.job_worker.files


def limit_for(content_type: str) -> int:
    """The largest file of `content_type`: a picture as `set_image` takes one, else a video
    as a job takes one."""
    return MAX_IMAGE_BYTES if content_type.startswith("image/") else MAX_VIDEO_BYTES


def _ttl(text: str | None) -> timedelta | None:
    if text is None or not text.strip():
        return DEFAULT_TTL
    text = text.strip()
    if text == "persistent":
        return None
    if not text.isdigit() or not MIN_TTL_SECONDS <= int(text) <= MAX_TTL_SECONDS:
        raise Refused(
            400,
            f"invalid request body: ttl_seconds must be an integer in [{MIN_TTL_SECONDS}, "
            f"{MAX_TTL_SECONDS}] or persistent, not {text!r}",
        )
    return timedelta(seconds=int(text))


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def reference(file: StoredFile) -> dict[str, Any]:
    """The file as the SDK's `FileReference`."""
    return {
        "id": file.id,
        "filename": file.name,
        "mime_type": file.content_type,
        "size_bytes": file.bytes,
        "created_at": _iso(file.created_at),
        "expires_at": _iso(file.expires_at),
    }


def _not_found(file_id: str) -> Response:
    return error(404, f"file not found: {file_id!r}")


@router.post("/v1/files", response_model=None)
async def upload(request: Request) -> Response:
    """Keep a file (multipart `file`, optionally `ttl_seconds`); answered with its
    reference."""
    state, store, files = _stores(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, Response):
        return principal
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_VIDEO_BYTES + (1 << 20):
        return error(413, f"file too large: file may be at most {MAX_VIDEO_BYTES >> 20} MB")
    file_id = new_file_id()
    try:
        form = await multipart(request, max_files=1, max_fields=4)
        try:
            data = form.get("file")
            if data is None:
                raise Refused(400, "invalid request body: file is required")
            if not isinstance(data, UploadFile):
                raise Refused(400, "invalid request body: file must be a file, not text")
            ttl_field = form.get("ttl_seconds")
            if isinstance(ttl_field, UploadFile):
                raise Refused(400, "invalid request body: ttl_seconds must be text, not a file")
            ttl = _ttl(ttl_field)
            content_type = (data.content_type or "").split(";")[0].strip().lower()
            content_type = content_type or "application/octet-stream"
            limit = limit_for(content_type)
            if data.size is not None and data.size > limit:
                raise Refused(413, f"file too large: file may be at most {limit >> 20} MB")
            assert state.job_worker is not None
            try:
                await state.job_worker.check_disk(data.size or 0)
            except DiskBudgetExceeded as exc:
                raise Refused(507, str(exc)) from None
            size = await save_upload(files, file_id, CONTENT_NAME, data, limit, "file")
            if size == 0:
                raise Refused(400, "invalid request body: file is empty")
            name = (data.filename or "")[:255] or None
        finally:
            await form.close()
    except Refused as exc:
        files.delete(file_id)
        return error(exc.status, exc.message)
    except BaseException:
        files.delete(file_id)
        raise
    path = files.relative(file_id, CONTENT_NAME)
    stored = await store.create(file_id, principal.key_id, name, content_type, size, path, ttl)
    return JSONResponse(reference(stored))


@router.get("/v1/files/{file_id}", response_model=None)
async def get(request: Request, file_id: str) -> Response:
    """The file's reference; 404 for another key's file or none, 410 once it expired."""
    state, store, _ = _stores(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, Response):
        return principal
    stored = await store.get(file_id, principal.key_id)
    if stored is None:
        return _not_found(file_id)
    if stored.expired(store.now()):
        return error(410, f"file expired: {file_id!r} is no longer kept")
    return JSONResponse(reference(stored))


@router.delete("/v1/files/{file_id}", response_model=None)
async def remove(request: Request, file_id: str) -> Response:
    """Delete the key's file (204); 404 when it has none of that id."""
    state, store, files = _stores(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, Response):
        return principal
    stored = await store.delete(file_id, principal.key_id)
    if stored is None:
        return _not_found(file_id)
    files.delete(stored.id)
    return Response(status_code=204)


async def image_file(state: AppState, key_id: str, file_id: str) -> bytes:
    """The bytes of the key's file `file_id`, for `set_image`'s `image_ref`; ValueError
    (its text for the client) when the key has no such file, it expired, or it is larger
    than an image may be."""
    assert state.job_worker is not None, "the app state is not open"
    stored = await FileStore(state.store).get(file_id, key_id)
    if stored is None:
        raise ValueError(f"file not found: {file_id!r}")
    if stored.expired(state.store.clock()):
        raise ValueError(f"file expired: {file_id!r} is no longer kept")
    if stored.bytes > MAX_IMAGE_BYTES:
        raise ValueError(IMAGE_TOO_LARGE)
    path = state.job_worker.files.path(stored.path)
    try:
        return await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise ValueError(f"file expired: {file_id!r} is no longer kept") from None


async def sweep_expired(store: FileStore, files: JobFiles) -> int:
    """Delete the files past their expiry, bytes then row; how many were deleted. The
    node's housekeeping calls it now and then."""
    count = 0
    while expired := await store.expired():
        for stored in expired:
            files.delete(stored.id)
            if await store.delete(stored.id) is not None:
                count += 1
    return count
