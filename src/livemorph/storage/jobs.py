"""Batch jobs in the database: created by a key, claimed by any node, charged once.

A job is a row of `jobs` (schema.py); its files live in the jobs directory
(storage/job_files.py), their paths here relative to it. Its life:

    pending --claim_next--> processing --complete--> completed
                               |  \\-----fail------> failed
                               \\--lease runs out (recover)--> pending, or failed after
                                                              MAX_ATTEMPTS starts

Claiming uses the database's own locking and nothing of ours: on PostgreSQL the oldest
pending row is taken with `SELECT ... FOR UPDATE SKIP LOCKED` and updated in the same
transaction, so claimers on any number of nodes pass over each other's rows; on SQLite one
`UPDATE ... WHERE id = (oldest pending) AND status = 'pending' RETURNING` does it, SQLite
running one writer at a time. Either way no two claimers get the same job.

A node holds a job by its lease and renews it while it works; when `renew_lease` answers
False the job is no longer its own (the lease ran out and it was recovered) and the node
must stop working on it, so a job is never run by two nodes at once. Completion marks the
job and takes its seconds off the key's credits in one transaction, only if the job was
still the node's and not yet charged: a second `complete` changes nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update

from .schema import jobs
from .store import Store, _aware, _maybe_aware, charge

JobStatus = Literal["pending", "processing", "completed", "failed"]

PENDING: JobStatus = "pending"
PROCESSING: JobStatus = "processing"
COMPLETED: JobStatus = "completed"
FAILED: JobStatus = "failed"

#: How many times a job is started before a lease that runs out fails it rather than
#: putting it back. A job whose node dies once (a deploy, a lost machine) runs again; one
#: whose node dies every time is likely what kills it (an input that crashes the encoder,
#: one that exhausts memory), and retrying it forever would take the fleet down node by node.
MAX_ATTEMPTS = 3

#: How long a finished job's row and files are kept, unless the store is told otherwise.
DEFAULT_RETENTION = timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Job:
    id: str
    key_id: str
    model: str
    status: JobStatus
    params: dict[str, Any] | None
    input_path: str
    input_bytes: int
    output_path: str | None
    output_bytes: int | None
    error: str | None
    #: How many times a node has started it.
    attempts: int
    claimed_by: str | None
    lease_until: datetime | None
    #: Seconds taken off the key's credits when it completed; None until then.
    charged_seconds: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    #: The share (0..1) of its frames done while it runs, as its node last wrote it.
    progress: float | None = None


def _job(row: Any) -> Job:
    return Job(
        id=row.id,
        key_id=row.key_id,
        model=row.model,
        status=row.status,
        params=row.params,
        input_path=row.input_path,
        input_bytes=int(row.input_bytes),
        output_path=row.output_path,
        output_bytes=None if row.output_bytes is None else int(row.output_bytes),
        error=row.error,
        attempts=int(row.attempts),
        claimed_by=row.claimed_by,
        lease_until=_maybe_aware(row.lease_until),
        charged_seconds=None if row.charged_seconds is None else int(row.charged_seconds),
        created_at=_aware(row.created_at),
        started_at=_maybe_aware(row.started_at),
        finished_at=_maybe_aware(row.finished_at),
        expires_at=_maybe_aware(row.expires_at),
        progress=None if row.progress is None else float(row.progress),
    )


def new_job_id() -> str:
    return secrets.token_hex(8)


class JobStore:
    """Jobs on a `Store`'s database and clock; finished jobs are kept for `retention`
    (None: until they are deleted by hand)."""

    def __init__(self, store: Store, retention: timedelta | None = DEFAULT_RETENTION) -> None:
        self.store = store
        self.retention = retention
        self._engine = store._engine

    def _now(self) -> datetime:
        return self.store.clock()

    async def create_job(
        self,
        key_id: str,
        model: str,
        input_path: str,
        input_bytes: int,
        params: dict[str, Any] | None = None,
        job_id: str | None = None,
    ) -> Job:
        """A pending job. `job_id` lets the caller name the job's files before the row
        exists (write the input, then create the job); one is made up otherwise."""
        now = self._now()
        values: dict[str, Any] = {
            "id": job_id or new_job_id(),
            "key_id": key_id,
            "model": model,
            "status": PENDING,
            "params": params,
            "input_path": input_path,
            "input_bytes": input_bytes,
            "attempts": 0,
            "created_at": now,
        }
        async with self._engine.begin() as conn:
            await conn.execute(jobs.insert().values(**values))
            row = (await conn.execute(select(jobs).where(jobs.c.id == values["id"]))).one()
        return _job(row)

    async def get_job(self, job_id: str, key_id: str) -> Job | None:
        """The job, if `key_id` submitted it: another key's job is None, as a missing one."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(jobs).where(and_(jobs.c.id == job_id, jobs.c.key_id == key_id))
                )
            ).first()
        return None if row is None else _job(row)

    async def list_jobs(self, key_id: str, limit: int = 100) -> list[Job]:
        """The key's most recent jobs, newest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(jobs)
                .where(jobs.c.key_id == key_id)
                .order_by(jobs.c.created_at.desc(), jobs.c.id)
                .limit(limit)
            )
            return [_job(row) for row in rows]

    async def in_flight(self, key_id: str) -> int:
        """How many of the key's jobs wait or run (for the per-key cap)."""
        async with self._engine.connect() as conn:
            count = (
                await conn.execute(
                    select(func.count())
                    .select_from(jobs)
                    .where(and_(jobs.c.key_id == key_id, jobs.c.status.in_((PENDING, PROCESSING))))
                )
            ).scalar_one()
        return int(count)

    async def counts(self) -> dict[JobStatus, int]:
        """Jobs in the database by status, every status named (for /metrics)."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(select(jobs.c.status, func.count()).group_by(jobs.c.status))
            found = {row[0]: int(row[1]) for row in rows}
        return {status: found.get(status, 0) for status in (PENDING, PROCESSING, COMPLETED, FAILED)}

    async def claim_next(self, node: str, lease_seconds: float) -> Job | None:
        """The oldest pending job, now `node`'s for `lease_seconds`; None when none waits."""
        now = self._now()
        claimed = {
            "status": PROCESSING,
            "claimed_by": node,
            "lease_until": now + timedelta(seconds=lease_seconds),
            "started_at": now,
            "attempts": jobs.c.attempts + 1,
        }
        oldest = (
            select(jobs.c.id)
            .where(jobs.c.status == PENDING)
            .order_by(jobs.c.created_at, jobs.c.id)
            .limit(1)
        )
        async with self._engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                job_id = (
                    await conn.execute(oldest.with_for_update(skip_locked=True))
                ).scalar_one_or_none()
                if job_id is None:
                    return None
                where = jobs.c.id == job_id
            else:
                # One statement: SQLite runs one writer at a time, so the pick and the
                # update cannot interleave with another claimer's.
                where = and_(jobs.c.id == oldest.scalar_subquery(), jobs.c.status == PENDING)
            row = (
                await conn.execute(update(jobs).where(where).values(**claimed).returning(jobs))
            ).first()
        return None if row is None else _job(row)

    async def renew_lease(
        self, job_id: str, node: str, lease_seconds: float, progress: float | None = None
    ) -> bool:
        """Extend `node`'s lease on its job, noting its `progress` (0..1) if given; False
        when the job is no longer its own (the lease ran out and it was recovered, or it
        finished): then stop working on it."""
        values: dict[str, Any] = {"lease_until": self._now() + timedelta(seconds=lease_seconds)}
        if progress is not None:
            values["progress"] = min(1.0, max(0.0, progress))
        async with self._engine.begin() as conn:
            result = await conn.execute(update(jobs).where(_held_by(job_id, node)).values(values))
            return result.rowcount == 1

    async def complete(
        self, job_id: str, node: str, output_path: str, output_bytes: int, seconds: int
    ) -> bool:
        """Mark `node`'s job completed and charge the key `seconds`, in one transaction.

        False, and nothing changed or charged, when the job is not `node`'s to complete:
        already completed (a retried call), failed, or recovered after its lease ran out.
        """
        if seconds < 0:
            raise ValueError("a job cannot be charged negative seconds")
        now = self._now()
        async with self._engine.begin() as conn:
            row = (
                await conn.execute(
                    update(jobs)
                    .where(and_(_held_by(job_id, node), jobs.c.charged_seconds.is_(None)))
                    .values(
                        status=COMPLETED,
                        output_path=output_path,
                        output_bytes=output_bytes,
                        charged_seconds=seconds,
                        **self._finished(now),
                    )
                    .returning(jobs.c.key_id, jobs.c.model)
                )
            ).first()
            if row is None:
                return False
            if seconds > 0:
                await charge(conn, row.key_id, row.model, seconds, now)
        return True

    async def fail(self, job_id: str, node: str, reason: str) -> bool:
        """Mark `node`'s job failed with `reason`; False when it is not `node`'s to fail."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(jobs)
                .where(_held_by(job_id, node))
                .values(status=FAILED, error=reason, **self._finished(self._now()))
            )
            return result.rowcount == 1

    async def recover(self, node: str | None = None, *, every_node: bool = False) -> list[Job]:
        """Jobs whose node died: those whose lease has run out and, with `node`, every job
        that node holds (a node calls this as it starts: nothing it held before is running);
        with `every_node`, every running job (a node that shares its database with no other
        calls this as it starts: nothing is running anywhere).

        Each goes back to pending, or fails with the reason once it was started
        MAX_ATTEMPTS times. The jobs changed, as they are now."""
        now = self._now()
        if every_node:
            orphaned = jobs.c.status == PROCESSING
        else:
            orphaned = and_(
                jobs.c.status == PROCESSING,
                or_(jobs.c.lease_until < now, jobs.c.claimed_by == node)
                if node is not None
                else jobs.c.lease_until < now,
            )
        reason = (
            f"the node running it stopped {MAX_ATTEMPTS} times before it finished "
            "(it may be what stops them)"
        )
        async with self._engine.begin() as conn:
            failed = await conn.execute(
                update(jobs)
                .where(and_(orphaned, jobs.c.attempts >= MAX_ATTEMPTS))
                .values(status=FAILED, error=reason, **self._finished(now))
                .returning(jobs)
            )
            changed = [_job(row) for row in failed]
            requeued = await conn.execute(
                update(jobs)
                .where(and_(orphaned, jobs.c.attempts < MAX_ATTEMPTS))
                .values(
                    status=PENDING,
                    claimed_by=None,
                    lease_until=None,
                    started_at=None,
                    progress=None,
                )
                .returning(jobs)
            )
            changed += [_job(row) for row in requeued]
        return changed

    async def release(self, job_id: str, node: str) -> bool:
        """Give `node`'s running job back to the queue (the node is stopping); the start is
        not counted against MAX_ATTEMPTS. False when it is not `node`'s."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(jobs)
                .where(_held_by(job_id, node))
                .values(
                    status=PENDING,
                    claimed_by=None,
                    lease_until=None,
                    started_at=None,
                    progress=None,
                    attempts=func.max(jobs.c.attempts - 1, 0)
                    if conn.dialect.name == "sqlite"
                    else func.greatest(jobs.c.attempts - 1, 0),
                )
            )
            return result.rowcount == 1

    async def expired(self, limit: int = 100) -> list[Job]:
        """Finished jobs kept past their retention, oldest first: delete their files, then
        `delete` them."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(jobs)
                .where(jobs.c.expires_at <= self._now())
                .order_by(jobs.c.expires_at, jobs.c.id)
                .limit(limit)
            )
            return [_job(row) for row in rows]

    async def delete(self, job_id: str) -> bool:
        """Forget a finished job (its files deleted first); a running one is kept."""
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(jobs).where(
                    and_(jobs.c.id == job_id, jobs.c.status.in_((COMPLETED, FAILED)))
                )
            )
            return result.rowcount == 1

    async def bytes_in_use(self) -> int:
        """Bytes of input and output files the jobs in the database hold, for the disk budget."""
        async with self._engine.connect() as conn:
            total = (
                await conn.execute(
                    select(
                        func.coalesce(
                            func.sum(jobs.c.input_bytes + func.coalesce(jobs.c.output_bytes, 0)),
                            0,
                        )
                    )
                )
            ).scalar_one()
        return int(total)

    def _finished(self, now: datetime) -> dict[str, Any]:
        return {
            "claimed_by": None,
            "lease_until": None,
            "progress": None,
            "finished_at": now,
            "expires_at": None if self.retention is None else now + self.retention,
        }


def _held_by(job_id: str, node: str) -> ColumnElement[bool]:
    return and_(jobs.c.id == job_id, jobs.c.status == PROCESSING, jobs.c.claimed_by == node)
