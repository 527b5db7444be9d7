"""The node's batch-job worker: claims pending jobs and runs each in a process of its own.

`--job-workers` loops run at once (0: this node runs none). As it starts, the worker gives
back the jobs this node held before it stopped (`JobStore.recover`: on a node that shares
its database with no other, every job left running). Then each loop, while the node has
room for one more realtime session (below), claims the oldest pending job, runs it in a
child process (job_process.py: `transform.transform_local` at the lowest CPU priority),
renews the job's lease while it runs, and marks it completed, charging the output's
seconds, or failed with the reason. A job whose lease is lost (another node recovered it)
is killed and its result dropped; a node that stops gives its running jobs back.

Realtime sessions come first, twice over: a job's process runs only on CPU the sessions
leave (`SCHED_IDLE`), and a loop claims a job only while capacity admission
(capacity.py) would still take a new `mirage` session here and `--max-sessions` is not
reached, so a busy node leaves the queue to idle ones. A session is admitted whatever jobs
run: they yield to it.

A housekeeping loop, every quarter lease: recovers jobs whose node stopped renewing
(a dead node's, cluster-wide), deletes finished jobs past `--job-retention` with their
files, and refreshes `/metrics`' count of jobs by state.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import options
from ..job_process import BAD_INPUT, JobSpec, settings_env
from ..models import CATALOG, VIDEO_MODELS
from ..storage import Job, JobFiles, JobStore
from ..storage.files import FileStore

if TYPE_CHECKING:
    from .state import AppState

logger = logging.getLogger(__name__)

#: The shortest lease a node takes, whatever `--job-lease` says.
MIN_LEASE = 5.0
#: Seconds between two writes of a running job's progress (with its lease) to the database.
PROGRESS_EVERY = 2.0
#: How long an idle loop waits before it looks for a job again (a submission wakes it).
POLL_SECONDS = 2.0
#: The output's name in the job's folder.
OUTPUT_NAME = "output.mp4"
#: The model whose admission decides whether a node has room for a job beside its sessions.
ROOM_MODEL = "mirage"
#: How often a running job's process is checked for its end, seconds.
EXIT_POLL = 0.1
#: The longest wait for a reader thread once its process has ended, seconds.
READER_JOIN = 5.0
#: Lines of a job process's stderr kept for the log when it ends badly.
STDERR_LINES = 20


class JobWorker:
    def __init__(self, state: AppState) -> None:
        settings = state.settings
        self.state = state
        hours = settings.job_retention
        self.jobs = JobStore(state.store, timedelta(hours=hours) if hours else None)
        budget = settings.jobs_disk_budget
        self.files = JobFiles(
            settings.jobs_dir or settings.data_dir / "jobs", budget << 20 if budget else None
        )
        self.node = state.rooms.node
        self.workers = int(settings.job_workers)
        self.lease = max(MIN_LEASE, settings.job_lease)
        #: What runs one job: reads a JobSpec on stdin, answers JSON lines (job_process.py).
        self.command = [sys.executable, "-m", "livemorph.job_process"]
        #: Each running job's progress: frames done and the total, as its process said.
        self.progress: dict[str, tuple[int, int | None]] = {}
        #: Called by the housekeeping loop after the jobs' own (the Files API's expiry).
        self.sweepers: list[Callable[[], Awaitable[object]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        #: The running job processes' ids, and the CPU its ended children had used before.
        self._pids: set[int] = set()
        self._children_before = _children_cpu()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._housekeep(), name="job-housekeeping")]
        self._tasks += [
            asyncio.create_task(self._run(), name=f"job-worker-{index}")
            for index in range(self.workers)
        ]

    def wake(self) -> None:
        """A job was submitted: look now rather than at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def check_disk(self, incoming: int) -> None:
        """Refuse (DiskBudgetExceeded) `incoming` more bytes in the jobs folder when its
        budget or the disk cannot hold them beside the jobs' files and the uploads."""
        in_use = await self.jobs.bytes_in_use() + await FileStore(self.state.store).bytes_in_use()
        self.files.check_budget(incoming, in_use)

    def cpu_seconds(self) -> float:
        """CPU seconds the job processes have used so far (capacity.py counts them as idle:
        they run at SCHED_IDLE): the ended ones' from the kernel's account of this process's
        children (a server starts no other children), the running ones' from /proc."""
        ended = _children_cpu() - self._children_before
        return ended + sum(_process_cpu(pid) or 0.0 for pid in self._pids)

    # -- the loops ----------------------------------------------------------------------

    async def _housekeep(self) -> None:
        try:
            if self.state.cluster is None:
                await self.jobs.recover(every_node=True)
            else:
                await self.jobs.recover(self.node)
        except Exception:
            logger.exception("jobs: recovering this node's jobs failed")
        self.wake()
        while True:
            try:
                await self.sweep()
            except Exception:
                logger.exception("jobs: housekeeping failed")
            await asyncio.sleep(self.lease / 4)

    async def sweep(self) -> None:
        """Recover dead nodes' jobs, delete expired ones, count the jobs by state."""
        if await self.jobs.recover():
            self.wake()
        while expired := await self.jobs.expired():
            for job in expired:
                self.files.delete(job.id)
                await self.jobs.delete(job.id)
        for sweeper in self.sweepers:
            await sweeper()
        for status, count in (await self.jobs.counts()).items():
            self.state.metrics.jobs.labels(status).set(count)

    async def _run(self) -> None:
        while True:
            job = None
            if self._room():
                try:
                    job = await self.jobs.claim_next(self.node, self.lease)
                except Exception:
                    logger.exception("jobs: claiming a job failed")
            if job is None:
                self._wake.clear()
                # in this task (asyncio.wait_for would start one per poll)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(POLL_SECONDS):
                        await self._wake.wait()
                continue
            await self._process(job)

    def _room(self) -> bool:
        """Whether this node may start a job: a new realtime session would still fit."""
        sessions = self.state.sessions
        if sessions.full:
            return False
        return self.state.capacity.refusal(CATALOG[ROOM_MODEL], sessions.all()) is None

    # -- one job ------------------------------------------------------------------------

    def _spec(self, job: Job) -> JobSpec:
        params = job.params or {}
        reference = params.get("reference_image")
        model = VIDEO_MODELS.get(job.model, job.model)
        return JobSpec(
            input=str(self.files.path(job.input_path)),
            output=str(self.files.job_dir(job.id) / OUTPUT_NAME),
            model=model,
            prompt=params.get("prompt"),
            image=str(self.files.path(reference)) if reference else None,
            enhance=bool(params.get("enhance_prompt", True)),
            parent=os.getpid(),
            engine=self.state.engines.engine_spec(model),
        )

    def _env(self) -> dict[str, str]:
        """This process's environment with the node's settings in place of its own."""
        env = {key: value for key, value in os.environ.items()}
        for option in options():
            env.pop(option.env, None)
        env.update(settings_env(self.state.settings))
        return env

    async def _process(self, job: Job) -> None:
        spec = self._spec(job)
        metrics = self.state.metrics
        metrics.job_wait_seconds.labels(job.model).observe(
            max(0.0, (self.jobs.store.clock() - job.created_at).total_seconds())
        )
        started = time.monotonic()
        if await asyncio.to_thread(_file_size, spec.input) is None:
            # another node's folder: the nodes do not share --jobs-dir
            await self._fail(
                job,
                "the video is not on the node that took the job: this server's nodes must "
                "share their jobs folder (--jobs-dir)",
                started,
            )
            return
        # an earlier run stopped midway (its node killed, its lease lost) left its
        # half-written output in the job's folder, where nothing else would delete it
        await asyncio.to_thread(_clear_parts, Path(spec.output))
        # subprocess.Popen, not asyncio's: uvloop's spawn runs Python's after-fork cleanup
        # in the child, which frees the other threads' state, PyAV's per-thread converters
        # among them, and deadlocks the child and, waiting for it, the server. Popen's
        # fork-exec runs no Python in the child.
        process = await asyncio.to_thread(
            subprocess.Popen,
            self.command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._env(),
        )
        self._pids.add(process.pid)
        metrics.jobs_running.set(len(self._pids))
        self.progress[job.id] = (0, None)
        final: dict[str, Any] = {}
        errors: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        loop = asyncio.get_running_loop()
        readers = [
            threading.Thread(
                target=self._read_lines,
                args=(process, job.id, final, loop),
                name=f"job-{job.id}-out",
                daemon=True,
            ),
            threading.Thread(
                target=_tail, args=(process, errors), name=f"job-{job.id}-err", daemon=True
            ),
        ]
        for reader in readers:
            reader.start()
        try:
            await asyncio.to_thread(_hand_over, process, spec.to_json().encode() + b"\n")
            # the lease is renewed with the progress, which a client may be polling
            renew_every = min(self.lease / 4, PROGRESS_EVERY)
            renewed = time.monotonic()
            while process.poll() is None:
                await asyncio.sleep(EXIT_POLL)
                if time.monotonic() - renewed < renew_every:
                    continue
                renewed = time.monotonic()
                done, total = self.progress.get(job.id, (0, None))
                progress = done / total if total else None
                if not await self.jobs.renew_lease(job.id, self.node, self.lease, progress):
                    logger.warning("job %s: its lease was lost; stopped", job.id)
                    await _kill(process)
                    return
            for reader in readers:  # the pipes are at their end: the threads are too
                await asyncio.to_thread(reader.join, READER_JOIN)
        except asyncio.CancelledError:
            await _kill(process)
            if self._stopping:
                with contextlib.suppress(Exception):
                    await self.jobs.release(job.id, self.node)
            raise
        finally:
            self._pids.discard(process.pid)
            self.progress.pop(job.id, None)
            metrics.jobs_running.set(len(self._pids))
        await self._finish(job, spec, process.returncode, final, errors, started)

    def _read_lines(
        self,
        process: subprocess.Popen[bytes],
        job_id: str,
        final: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """The process's JSON lines (on a thread of its own): progress noted as it comes,
        the last word kept."""
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if not isinstance(message, dict):
                continue
            if "done" in message:
                total = message.get("total")
                seen = (int(message["done"]), int(total) if total else None)
                loop.call_soon_threadsafe(self.progress.__setitem__, job_id, seen)
            else:
                final.update(message)

    async def _finish(
        self,
        job: Job,
        spec: JobSpec,
        status: int | None,
        final: dict[str, Any],
        errors: collections.deque[str],
        started: float,
    ) -> None:
        size = await asyncio.to_thread(_file_size, spec.output)
        if status == 0 and "frames" in final and size is not None:
            seconds = max(1, math.ceil(final.get("duration") or 0.0))
            relative = self.files.relative(job.id, OUTPUT_NAME)
            if not await self.jobs.complete(job.id, self.node, relative, size, seconds):
                logger.warning("job %s: finished, but no longer this node's", job.id)
                return
            self.state.metrics.job_finished(
                job.model, "completed", time.monotonic() - started, seconds
            )
            logger.info(
                "job %s: %s, %d frames, %d s charged",
                job.id,
                job.model,
                final["frames"],
                seconds,
                extra={"key_id": job.key_id, "model": job.model},
            )
            return
        if status == BAD_INPUT and "error" in final:
            reason = str(final["error"]).replace(spec.input, "the video")
            await self._fail(job, _protocol_reason(reason, spec.output), started)
            return
        how = (
            f"signal {signal.Signals(-status).name}"
            if status is not None and status < 0
            else f"status {status}"
        )
        logger.error(
            "job %s: its process ended with %s:\n%s", job.id, how, "\n".join(errors) or "(nothing)"
        )
        reason = "the video could not be processed: the job's process stopped"
        if status == -signal.SIGKILL:
            reason += " (killed: out of memory?)"
        await self._fail(job, reason, started)

    async def _fail(self, job: Job, reason: str, started: float) -> None:
        logger.info("job %s failed: %s", job.id, reason)
        with contextlib.suppress(Exception):
            if await self.jobs.fail(job.id, self.node, reason):
                self.state.metrics.job_finished(job.model, "failed", time.monotonic() - started, 0)
        # nothing half-made is kept: the output is written whole or not at all, but a
        # failed job's folder keeps only what the client sent
        with contextlib.suppress(OSError):
            (self.files.job_dir(job.id) / OUTPUT_NAME).unlink()


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _process_cpu(pid: int) -> float | None:
    """The CPU seconds (user and system, all threads) process `pid` has used, from
    /proc/PID/stat; None where it cannot be read (gone, or not Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the name: state is field 3, utime 14, stime 15
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children_cpu() -> float:
    """CPU seconds (user and system) this process's ended, reaped children have used."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _clear_parts(output: Path) -> None:
    """Delete the files an earlier run left half-written beside `output`: transform.py
    writes the output to a hidden `.NAME.*.part*` file and renames it once whole."""
    for part in output.parent.glob(f".{output.name}.*.part*"):
        with contextlib.suppress(OSError):
            part.unlink()


def _file_size(path: str) -> int | None:
    """The size of the file at `path`; None when there is none (on a network file system
    a look may block, hence a thread)."""
    try:
        return Path(path).stat().st_size if Path(path).is_file() else None
    except OSError:
        return None


def _hand_over(process: subprocess.Popen[bytes], spec: bytes) -> None:
    """Write the job to the process's stdin and close it; a process that died first has
    nothing to read it (its exit status says what happened)."""
    assert process.stdin is not None
    with contextlib.suppress(BrokenPipeError, OSError):
        process.stdin.write(spec)
        process.stdin.close()


def _tail(process: subprocess.Popen[bytes], lines: collections.deque[str]) -> None:
    assert process.stderr is not None
    for line in process.stderr:
        lines.append(line.decode(errors="replace").rstrip())


async def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    with contextlib.suppress(Exception):
        await asyncio.to_thread(process.wait)


def _protocol_reason(reason: str, output: str) -> str:
    """A transform's error in the words a client reads: no paths of this machine."""
    reason = reason.replace(output, "the output")
    reason = reason.replace("--prompt", "prompt").replace("--image", "reference_image")
    return f"invalid video: {reason}" if reason.startswith("cannot read") else reason
