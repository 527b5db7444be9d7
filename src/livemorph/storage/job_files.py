"""Batch jobs' files: one folder per job under the jobs directory, written atomically.

The jobs directory is `jobs/` in the data folder unless the operator names another (a
bigger disk, one shared by a fleet's nodes). A file is written under a temporary name in
its final folder, flushed to disk, then renamed over its final name, so a reader or a
restart finds the whole file or none of it; a write that fails leaves nothing behind.

New jobs are refused before the disk fills: when the jobs' files would pass the operator's
budget, or when the disk would be left with less than a free-space margin.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

#: Free space every write leaves on the disk, whatever the budget: the database, the logs
#: and the rest of the machine need room too.
DEFAULT_FREE_MARGIN = 1 << 30

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class DiskBudgetExceeded(Exception):
    """A new job's files would not fit: the text says why, for the client."""


def _size(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover


class JobFiles:
    """The jobs directory `root`; `budget` caps the bytes all jobs' files take (None: no
    cap but the disk's), `free_margin` is the free space every write leaves on the disk."""

    def __init__(
        self,
        root: Path,
        budget: int | None = None,
        free_margin: int = DEFAULT_FREE_MARGIN,
        disk_free: Callable[[Path], int] | None = None,
    ) -> None:
        self.root = root
        self.budget = budget
        self.free_margin = free_margin
        self._disk_free = disk_free or (lambda path: shutil.disk_usage(path).free)

    @classmethod
    def in_data_dir(
        cls, data_dir: Path, budget: int | None = None, free_margin: int = DEFAULT_FREE_MARGIN
    ) -> JobFiles:
        return cls(data_dir / "jobs", budget, free_margin)

    def job_dir(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def path(self, relative: str) -> Path:
        """The file a job row names (its paths are relative to the jobs directory)."""
        resolved = (self.root / relative).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise ValueError(f"not a path in the jobs directory: {relative!r}")
        return resolved

    def relative(self, job_id: str, name: str) -> str:
        """What a job row stores for the job's file `name`."""
        if not _FILE_NAME.match(name):
            raise ValueError(f"not a job file name: {name!r}")
        return f"{self.job_dir(job_id).name}/{name}"

    def check_budget(self, incoming: int, in_use: int) -> None:
        """Refuse (DiskBudgetExceeded) `incoming` more bytes when the jobs' files already
        take `in_use` (JobStore.bytes_in_use) and the budget or the disk cannot hold them."""
        if self.budget is not None and in_use + incoming > self.budget:
            raise DiskBudgetExceeded(
                f"the jobs' disk budget is full: {_size(in_use)} of {_size(self.budget)} "
                f"in use, and this job needs {_size(incoming)}; "
                "try again when earlier results have expired"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        free = self._disk_free(self.root)
        if free - incoming < self.free_margin:
            raise DiskBudgetExceeded(
                f"the server's disk is nearly full: {_size(free)} free, this job needs "
                f"{_size(incoming)} and {_size(self.free_margin)} must stay free; "
                "try again later"
            )

    @contextlib.contextmanager
    def open_atomic(self, job_id: str, name: str) -> Iterator[BinaryIO]:
        """A file to write the job's file `name` into: it appears whole when the block
        ends, and never (nor its temporary) when the block raises."""
        folder = self.job_dir(job_id)
        final = self.path(self.relative(job_id, name))
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=folder)
        try:
            with os.fdopen(handle, "wb") as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
        _fsync_dir(folder)

    def write_atomic(self, job_id: str, name: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Write the job's file `name` from `chunks`, atomically; its relative path and size."""
        size = 0
        with self.open_atomic(job_id, name) as file:
            for chunk in chunks:
                file.write(chunk)
                size += len(chunk)
        return self.relative(job_id, name), size

    def delete(self, job_id: str) -> None:
        """Delete the job's folder and everything in it; a missing one is already gone."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be opened)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(descriptor)
    finally:
        os.close(descriptor)
