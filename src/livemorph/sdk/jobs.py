"""Batch work: `client.jobs` (a video file in, the transformed MP4 out, later) and
`client.edit_image` (one picture in, the edited picture out).

    job = await client.jobs.submit("lucy-restyle-2", "clip.mp4", prompt="anime")
    job = await client.jobs.wait(job.job_id, on_progress=lambda s: print(s.progress))
    await client.jobs.save(job.job_id, "out.mp4")

or in one call, `await client.jobs.submit_and_wait(...)`, which answers the MP4's bytes.
A job that fails raises `LivemorphError` with the server's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import httpx

from ..errors import ErrorCode, LivemorphError
from .images import ImageInput, Readable, image_bytes

if TYPE_CHECKING:
    from .client import Client

PENDING = "pending"
PROCESSING = "processing"
COMPLETED = "completed"
FAILED = "failed"

#: Seconds between two status polls in `wait`.
POLL_INTERVAL = 1.0
#: Tries of one status poll while the server cannot be reached (a restart, a blip).
STATUS_TRIES = 4

VideoInput = bytes | bytearray | memoryview | str | os.PathLike[str] | Readable
"""The video's bytes, a file path, or a binary file object."""

ProgressCallback = Callable[["JobStatus"], object | Awaitable[object]]


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job as `GET /v1/jobs/{job_id}` says it is."""

    job_id: str
    #: pending, processing, completed or failed.
    status: str
    #: From 0 to 1 while it runs, when the server says it; else None.
    progress: float | None = None
    #: Why it failed (status failed only).
    error: str | None = None

    @property
    def done(self) -> bool:
        """Completed or failed: it will not change again."""
        return self.status in (COMPLETED, FAILED)


def _refusal(what: str, response: httpx.Response) -> LivemorphError:
    """The server's refusal (`{"error": ...}`) as a coded error."""
    try:
        text = str(response.json()["error"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip()[:500] or f"HTTP {response.status_code}"
    status = response.status_code
    if status == 401:
        code = ErrorCode.INVALID_API_KEY
    elif status in (403, 404) and "model" in text:
        code = ErrorCode.MODEL_NOT_FOUND
    elif status in (400, 413, 415, 422):
        code = ErrorCode.INVALID_INPUT
    elif status == 504:
        code = ErrorCode.TIMEOUT
    else:
        code = ErrorCode.SERVER_ERROR
    return LivemorphError(f"{what}: {status} - {text}", code)


def _said(exc: Exception) -> str:
    """An HTTP failure in words (httpx's timeouts have none of their own)."""
    return str(exc) or type(exc).__name__


def _failure(job: JobStatus) -> LivemorphError:
    reason = job.error or "the job failed"
    code = ErrorCode.INVALID_INPUT if reason.startswith("invalid") else ErrorCode.SERVER_ERROR
    return LivemorphError(f"job {job.job_id} failed: {reason}", code)


def _status_of(data: Any) -> JobStatus:
    try:
        progress = data.get("progress")
        return JobStatus(
            job_id=str(data["job_id"]),
            status=str(data["status"]),
            progress=None if progress is None else float(progress),
            error=None if data.get("error") is None else str(data["error"]),
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise LivemorphError(
            "malformed job status from the server", ErrorCode.SERVER_ERROR
        ) from None


def _video(video: VideoInput) -> bytes | BinaryIO:
    """What httpx uploads: bytes as they are, a path opened (the caller closes it)."""
    if isinstance(video, bytes | bytearray | memoryview):
        if not video:
            raise LivemorphError("video is empty", ErrorCode.INVALID_INPUT)
        return bytes(video)
    if isinstance(video, str | os.PathLike):
        try:
            return Path(video).open("rb")
        except OSError as exc:
            raise LivemorphError(
                f"cannot read video {video}: {exc}", ErrorCode.INVALID_INPUT
            ) from None
    if isinstance(video, Readable):
        return video  # type: ignore[return-value]
    raise LivemorphError(f"unsupported video type: {type(video).__name__}", ErrorCode.INVALID_INPUT)


def _form(prompt: str | None, enhance_prompt: bool) -> dict[str, str]:
    data = {"enhance_prompt": "true" if enhance_prompt else "false"}
    if prompt is not None:
        data["prompt"] = prompt
    return data


class JobsClient:
    """`client.jobs`: batch video jobs (`POST /v1/jobs/{model}` and its status and content)."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def _headers(self) -> dict[str, str]:
        return {"X-API-KEY": self._client.api_key}

    async def _send(self, what: str, path: str, tries: int = 1) -> httpx.Response:
        """GET `path`, up to `tries` times while the server cannot be reached."""
        for attempt in range(tries):
            try:
                return await self._client._http.get(
                    f"{self._client.base_url}{path}", headers=self._headers()
                )
            except httpx.TransportError as exc:
                if attempt + 1 >= tries:
                    raise LivemorphError(f"{what}: {_said(exc)}", ErrorCode.SERVER_ERROR) from None
                await asyncio.sleep(POLL_INTERVAL * (attempt + 1))
        raise AssertionError("unreachable")

    async def _get(self, what: str, path: str, tries: int = 1) -> httpx.Response:
        """GET `path` (see `_send`); a refusal raises."""
        response = await self._send(what, path, tries)
        if response.status_code != 200:
            raise _refusal(what, response)
        return response

    async def available(self) -> bool:
        """Whether the server takes jobs: its job routes answer (an unknown job's 404 in
        their words) rather than the 404 or 405 of a server without them. A bad key
        raises INVALID_API_KEY, an unreachable server SERVER_ERROR."""
        what = "cannot look for jobs"
        response = await self._send(what, "/v1/jobs/0000000000000000", tries=STATUS_TRIES)
        if response.status_code == 401:
            raise _refusal(what, response)
        try:
            body = response.json()
        except ValueError:
            return False
        return isinstance(body, dict) and "job not found" in str(body.get("error", ""))

    async def submit(
        self,
        model: str,
        video: VideoInput,
        *,
        prompt: str | None = None,
        reference_image: ImageInput | None = None,
        enhance_prompt: bool = True,
    ) -> JobStatus:
        """Submit a video (bytes, a path or a binary file object) with a prompt, a
        reference image, or both; the job as queued. Refusals raise at once."""
        if prompt is None and reference_image is None:
            raise LivemorphError(
                "give a prompt, a reference_image, or both", ErrorCode.INVALID_INPUT
            )
        files: dict[str, Any] = {}
        if reference_image is not None:
            files["reference_image"] = (
                "reference",
                await image_bytes(reference_image, self._client._http),
            )
        upload = _video(video)
        files["data"] = ("video", upload, "application/octet-stream")
        try:
            response = await self._client._http.post(
                f"{self._client.base_url}/v1/jobs/{model}",
                headers=self._headers(),
                data=_form(prompt, enhance_prompt),
                files=files,
                timeout=httpx.Timeout(30.0, write=None, read=300.0),
            )
        except httpx.HTTPError as exc:
            message = f"cannot submit the job: {_said(exc)}"
            raise LivemorphError(message, ErrorCode.SERVER_ERROR) from None
        finally:
            if upload is not video and not isinstance(upload, bytes):
                upload.close()
        if response.status_code != 200:
            raise _refusal("cannot submit the job", response)
        return _status_of(response.json())

    async def status(self, job_id: str) -> JobStatus:
        """The job's status now (`progress` while it runs, where the server says it)."""
        response = await self._get(
            "cannot get the job's status", f"/v1/jobs/{job_id}", tries=STATUS_TRIES
        )
        return _status_of(response.json())

    async def result(self, job_id: str) -> bytes:
        """The completed job's MP4."""
        response = await self._get("cannot get the job's video", f"/v1/jobs/{job_id}/content")
        return response.content

    async def save(self, job_id: str, path: str | os.PathLike[str]) -> Path:
        """Write the completed job's MP4 to `path`: streamed into a hidden file beside it,
        renamed at the end, so a failure leaves nothing under its name."""
        final = Path(path)
        what = "cannot get the job's video"
        url = f"{self._client.base_url}/v1/jobs/{job_id}/content"
        fd, part = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    async with self._client._http.stream(
                        "GET", url, headers=self._headers()
                    ) as response:
                        if response.status_code != 200:
                            await response.aread()
                            raise _refusal(what, response)
                        async for chunk in response.aiter_bytes(1 << 20):
                            await asyncio.to_thread(out.write, chunk)
                except httpx.HTTPError as exc:
                    raise LivemorphError(f"{what}: {_said(exc)}", ErrorCode.SERVER_ERROR) from None
            os.replace(part, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise
        return final

    async def wait(
        self,
        job_id: str,
        *,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> JobStatus:
        """Poll until the job is completed (its status) or failed (`LivemorphError`, with
        the server's reason). `on_progress` hears each new status (sync or async). To give
        up after a while, wrap it in `asyncio.timeout(...)`: the job goes on."""
        last: JobStatus | None = None
        while True:
            job = await self.status(job_id)
            if on_progress is not None and job != last:
                outcome = on_progress(job)
                if inspect.isawaitable(outcome):
                    await outcome
            last = job
            if job.status == FAILED:
                raise _failure(job)
            if job.status == COMPLETED:
                return job
            await asyncio.sleep(poll_interval)

    async def submit_and_wait(
        self,
        model: str,
        video: VideoInput,
        *,
        prompt: str | None = None,
        reference_image: ImageInput | None = None,
        enhance_prompt: bool = True,
        on_progress: ProgressCallback | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> bytes:
        """`submit`, `wait` and `result` in one: the transformed video's MP4 bytes."""
        job = await self.submit(
            model,
            video,
            prompt=prompt,
            reference_image=reference_image,
            enhance_prompt=enhance_prompt,
        )
        await self.wait(job.job_id, on_progress=on_progress, poll_interval=poll_interval)
        return await self.result(job.job_id)


async def edit_image(
    client: Client,
    model: str,
    image: ImageInput,
    *,
    prompt: str,
    reference_image: ImageInput | None = None,
    enhance_prompt: bool = True,
) -> bytes:
    """`POST /v1/generate/{model}`: the edited picture's bytes (PNG, or JPEG for a JPEG)."""
    files: dict[str, Any] = {"data": ("image", await image_bytes(image, client._http))}
    if reference_image is not None:
        files["reference_image"] = ("reference", await image_bytes(reference_image, client._http))
    try:
        response = await client._http.post(
            f"{client.base_url}/v1/generate/{model}",
            headers={"X-API-KEY": client.api_key},
            data=_form(prompt, enhance_prompt),
            files=files,
            timeout=httpx.Timeout(60.0),
        )
    except httpx.HTTPError as exc:
        message = f"cannot edit the image: {_said(exc)}"
        raise LivemorphError(message, ErrorCode.SERVER_ERROR) from None
    if response.status_code != 200:
        raise _refusal("cannot edit the image", response)
    return response.content
