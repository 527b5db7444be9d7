"""The node's batch-job worker: claims pending jobs and runs them as `livemorph transform`.

`JOB_WORKERS` loops run at once. As it starts, the worker gives back the jobs this node
held before it stopped (`JobStore.recover`); then each loop claims the oldest pending job,
runs `transform.transform_local` over its input into the job's folder (the output written
under a hidden name and renamed whole), renews the job's lease while it runs, and marks
the job completed, charging the output's seconds, or failed with the reason. A job whose
lease is lost (another node recovered it) is stopped and its result dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
from typing import TYPE_CHECKING

from ..models import VIDEO_MODELS
from ..storage import Job, JobFiles, JobStore
from ..transform import Job as TransformJob
from ..transform import Progress, TimedPrompt, TransformError, transform_local

if TYPE_CHECKING:
    from .state import AppState

logger = logging.getLogger(__name__)

#: Jobs one node runs at once.
JOB_WORKERS = 1
#: How long a claimed job is the node's without a renewal.
LEASE_SECONDS = 60.0
#: How often a running job's lease is renewed.
RENEW_EVERY = 15.0
#: How long an idle loop waits before it looks for a job again (a submission wakes it).
POLL_SECONDS = 2.0
#: The output's name in the job's folder.
OUTPUT_NAME = "output.mp4"


class JobWorker:
    def __init__(self, state: AppState, workers: int = JOB_WORKERS) -> None:
        self.state = state
        self.jobs = JobStore(state.store)
        self.files = JobFiles.in_data_dir(state.settings.data_dir)
        self.node = state.rooms.node
        self.workers = workers
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(index), name=f"job-worker-{index}")
            for index in range(self.workers)
        ]

    def wake(self) -> None:
        """A job was submitted: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _run(self, index: int) -> None:
        if index == 0:
            try:
                await self.jobs.recover(self.node)
            except Exception:
                logger.exception("jobs: recovering this node's jobs failed")
        while True:
            try:
                job = await self.jobs.claim_next(self.node, LEASE_SECONDS)
            except Exception:
                logger.exception("jobs: claiming a job failed")
                job = None
            if job is None:
                self._wake.clear()
                # in this task (asyncio.wait_for would start one per poll)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._wake.wait()
                continue
            await self._process(job)

    async def _process(self, job: Job) -> None:
        params = job.params or {}
        input_path = self.files.path(job.input_path)
        output = self.files.job_dir(job.id) / OUTPUT_NAME
        reference = params.get("reference_image")
        work = TransformJob(
            input=input_path,
            output=output,
            model=VIDEO_MODELS.get(job.model, job.model),
            prompts=[TimedPrompt(0.0, prompt)] if (prompt := params.get("prompt")) else [],
            image=str(self.files.path(reference)) if reference else None,
            enhance=bool(params.get("enhance_prompt", True)),
        )
        progress = Progress(None, stream=io.StringIO(), interactive=False)
        task = asyncio.create_task(transform_local(work, self.state.settings, progress))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=RENEW_EVERY)
                if done:
                    break
                if not await self.jobs.renew_lease(job.id, self.node, LEASE_SECONDS):
                    logger.warning("job %s: its lease was lost; stopped", job.id)
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
                    return
            result = task.result()
        except asyncio.CancelledError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            raise
        except TransformError as exc:
            reason = str(exc).replace(str(input_path), "the video")
            await self._fail(job, _protocol_reason(reason, str(output)))
            return
        except Exception as exc:
            logger.exception("job %s: the transform failed", job.id)
            await self._fail(job, f"the video could not be processed: {type(exc).__name__}")
            return
        seconds = max(1, math.ceil(result.duration or 0.0))
        size = output.stat().st_size
        relative = self.files.relative(job.id, OUTPUT_NAME)
        if not await self.jobs.complete(job.id, self.node, relative, size, seconds):
            logger.warning("job %s: finished, but no longer this node's", job.id)
            return
        logger.info(
            "job %s: %s, %d frames, %d s charged",
            job.id,
            job.model,
            result.frames,
            seconds,
            extra={"key_id": job.key_id, "model": job.model},
        )

    async def _fail(self, job: Job, reason: str) -> None:
        logger.info("job %s failed: %s", job.id, reason)
        with contextlib.suppress(Exception):
            await self.jobs.fail(job.id, self.node, reason)


def _protocol_reason(reason: str, output: str) -> str:
    """A transform's error in the words a client reads: no paths of this machine."""
    reason = reason.replace(output, "the output")
    reason = reason.replace("--prompt", "prompt").replace("--image", "reference_image")
    return f"invalid video: {reason}" if reason.startswith("cannot read") else reason
