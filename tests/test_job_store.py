"""Batch jobs in the database and their files: storage/jobs.py and storage/job_files.py.

The database tests run twice, on SQLite and on a real PostgreSQL server (tests/postgres.py),
on a clock the test moves (tests/support.py): a lease runs out, or a result expires, when
the test says so.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from livemorph.storage import DiskBudgetExceeded, JobFiles, JobStore, Store
from livemorph.storage.jobs import MAX_ATTEMPTS
from tests.support import FakeClock

START = datetime(2030, 1, 1, 12, tzinfo=UTC)
RETENTION = timedelta(hours=1)
LEASE = 30.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def store(database_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    store = Store(database_url, clock=clock.utc)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def jobs(store: Store) -> JobStore:
    return JobStore(store, retention=RETENTION)


async def new_key(store: Store, credits: int | None = None) -> str:
    return (await store.create_api_key("batch", credit_seconds=credits))[1].id


async def submit(jobs: JobStore, key_id: str, name: str = "in.mp4") -> str:
    job = await jobs.create_job(
        key_id, "mirage", f"x/{name}", 1000, params={"prompt": "anime", "seed": 7}
    )
    return job.id


# -- create, get, claim --------------------------------------------------------------------


async def test_a_job_belongs_to_the_key_that_submitted_it(store: Store, jobs: JobStore) -> None:
    owner, other = await new_key(store), await new_key(store)
    job = await jobs.create_job(owner, "mirage", "j/in.mp4", 1234, params={"prompt": "anime"})
    assert job.status == "pending" and job.attempts == 0 and job.charged_seconds is None
    assert job.created_at == START
    got = await jobs.get_job(job.id, owner)
    assert got == job and got.params == {"prompt": "anime"} and got.input_bytes == 1234
    assert await jobs.get_job(job.id, other) is None
    assert await jobs.get_job("missing", owner) is None
    assert [j.id for j in await jobs.list_jobs(owner)] == [job.id]
    assert await jobs.list_jobs(other) == []


async def test_claims_take_the_oldest_pending_job_under_a_lease(
    store: Store, jobs: JobStore, clock: FakeClock
) -> None:
    key = await new_key(store)
    first = await submit(jobs, key)
    clock.advance(1)
    second = await submit(jobs, key)
    claimed = await jobs.claim_next("node-a", LEASE)
    assert claimed is not None and claimed.id == first
    assert claimed.status == "processing" and claimed.claimed_by == "node-a"
    assert claimed.attempts == 1 and claimed.lease_until == clock.utc() + timedelta(seconds=30)
    again = await jobs.claim_next("node-b", LEASE)
    assert again is not None and again.id == second
    assert await jobs.claim_next("node-a", LEASE) is None


async def test_concurrent_claimers_never_share_a_job(database_url: str, clock: FakeClock) -> None:
    stores = [Store(database_url, clock=clock.utc) for _ in range(4)]
    for each in stores:
        await each.open()
    try:
        key = await new_key(stores[0])
        ids = {await submit(JobStore(stores[0]), key, f"{n}.mp4") for n in range(20)}

        async def claimer(store: Store, node: str) -> list[str]:
            mine = []
            while (job := await JobStore(store).claim_next(node, LEASE)) is not None:
                assert job.claimed_by == node
                mine.append(job.id)
                await asyncio.sleep(0)
            return mine

        taken = await asyncio.gather(
            *(claimer(store, f"node-{n}") for n, store in enumerate(stores))
        )
        everything = [job_id for mine in taken for job_id in mine]
        assert sorted(everything) == sorted(ids), "each job claimed exactly once"
    finally:
        for each in stores:
            await each.close()


# -- completion and charging ---------------------------------------------------------------


async def test_completing_charges_once(store: Store, jobs: JobStore, clock: FakeClock) -> None:
    key = await new_key(store, credits=100)
    job_id = await submit(jobs, key)
    assert await jobs.claim_next("node-a", LEASE) is not None
    assert not await jobs.complete(job_id, "node-b", "x/out.mp4", 10, 12), "not node-b's"
    clock.advance(5)
    assert await jobs.complete(job_id, "node-a", "x/out.mp4", 2048, 12)
    assert not await jobs.complete(job_id, "node-a", "x/out.mp4", 2048, 12), "a retried call"
    assert await store.credits_left(key) == 88
    [day] = await store.usage_by_day(key)
    assert (day.model, day.seconds) == ("mirage", 12)
    done = await jobs.get_job(job_id, key)
    assert done is not None and done.status == "completed" and done.charged_seconds == 12
    assert (done.output_path, done.output_bytes) == ("x/out.mp4", 2048)
    assert done.claimed_by is None and done.lease_until is None
    assert done.finished_at == clock.utc() and done.expires_at == clock.utc() + RETENTION
    assert not await jobs.fail(job_id, "node-a", "too late"), "a completed job stays so"


async def test_concurrent_completions_charge_once(database_url: str, clock: FakeClock) -> None:
    stores = [Store(database_url, clock=clock.utc) for _ in range(3)]
    for each in stores:
        await each.open()
    try:
        key = await new_key(stores[0], credits=100)
        job_id = await submit(JobStore(stores[0]), key)
        assert await JobStore(stores[0]).claim_next("node-a", LEASE) is not None
        results = await asyncio.gather(
            *(JobStore(s).complete(job_id, "node-a", "x/out.mp4", 1, 30) for s in stores)
        )
        assert sorted(results) == [False, False, True]
        assert await stores[0].credits_left(key) == 70
    finally:
        for each in stores:
            await each.close()


async def test_a_failed_job_keeps_its_reason_and_charges_nothing(
    store: Store, jobs: JobStore
) -> None:
    key = await new_key(store, credits=10)
    job_id = await submit(jobs, key)
    assert await jobs.claim_next("node-a", LEASE) is not None
    assert await jobs.fail(job_id, "node-a", "the input is not a video")
    failed = await jobs.get_job(job_id, key)
    assert failed is not None and failed.status == "failed"
    assert failed.error == "the input is not a video" and failed.charged_seconds is None
    assert not await jobs.complete(job_id, "node-a", "x/out.mp4", 1, 5)
    assert await store.credits_left(key) == 10


# -- leases and recovery -------------------------------------------------------------------


async def test_a_renewed_lease_is_kept(store: Store, jobs: JobStore, clock: FakeClock) -> None:
    key = await new_key(store)
    job_id = await submit(jobs, key)
    assert await jobs.claim_next("node-a", LEASE) is not None
    clock.advance(LEASE - 1)
    assert await jobs.renew_lease(job_id, "node-a", LEASE)
    assert not await jobs.renew_lease(job_id, "node-b", LEASE)
    clock.advance(LEASE - 1)
    assert await jobs.recover() == []


async def test_a_job_whose_node_died_runs_again_then_fails(
    store: Store, jobs: JobStore, clock: FakeClock
) -> None:
    key = await new_key(store, credits=50)
    job_id = await submit(jobs, key)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        claimed = await jobs.claim_next(f"node-{attempt}", LEASE)
        assert claimed is not None and claimed.id == job_id and claimed.attempts == attempt
        clock.advance(LEASE - 1)
        assert await jobs.recover() == [], "the lease has not run out yet"
        clock.advance(2)
        [recovered] = await jobs.recover()
        assert recovered.id == job_id
        if attempt < MAX_ATTEMPTS:
            assert recovered.status == "pending" and recovered.claimed_by is None
            assert not await jobs.renew_lease(job_id, f"node-{attempt}", LEASE), "lost it"
            assert not await jobs.complete(job_id, f"node-{attempt}", "x/out", 1, 5)
    assert recovered.status == "failed" and recovered.error is not None
    assert f"{MAX_ATTEMPTS} times" in recovered.error
    assert recovered.expires_at == clock.utc() + RETENTION
    assert await jobs.claim_next("node-x", LEASE) is None
    assert await store.credits_left(key) == 50


async def test_a_restarted_node_gives_back_what_it_held(
    store: Store, jobs: JobStore, clock: FakeClock
) -> None:
    key = await new_key(store)
    mine = await submit(jobs, key)
    clock.advance(1)
    theirs = await submit(jobs, key)
    assert (await jobs.claim_next("node-a", LEASE)) is not None
    assert (await jobs.claim_next("node-b", LEASE)) is not None
    [recovered] = await jobs.recover(node="node-a")
    assert recovered.id == mine and recovered.status == "pending"
    other = await jobs.get_job(theirs, key)
    assert other is not None and other.status == "processing", "another node's lease holds"


# -- retention and the disk budget ---------------------------------------------------------


async def test_finished_jobs_expire_after_the_retention(
    store: Store, jobs: JobStore, clock: FakeClock
) -> None:
    key = await new_key(store)
    done = await submit(jobs, key)
    clock.advance(1)
    waiting = await submit(jobs, key)
    assert await jobs.claim_next("node-a", LEASE) is not None
    assert await jobs.complete(done, "node-a", "x/out.mp4", 500, 3)
    assert await jobs.bytes_in_use() == 2000 + 500
    clock.advance(RETENTION.total_seconds() - 1)
    assert await jobs.expired() == []
    clock.advance(1)
    assert [job.id for job in await jobs.expired()] == [done]
    assert not await jobs.delete(waiting), "a job not finished is kept"
    assert await jobs.delete(done)
    assert await jobs.get_job(done, key) is None
    assert await jobs.expired() == []
    assert await jobs.bytes_in_use() == 1000


# -- files ---------------------------------------------------------------------------------


def test_a_file_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    relative, size = files.write_atomic("job1", "input.mp4", [b"abc", b"def"])
    assert (relative, size) == ("job1/input.mp4", 6)
    assert files.path(relative).read_bytes() == b"abcdef"

    with pytest.raises(RuntimeError), files.open_atomic("job1", "output.mp4") as out:
        out.write(b"half a video")
        raise RuntimeError("the encoder died")
    assert sorted(p.name for p in files.job_dir("job1").iterdir()) == ["input.mp4"]

    with pytest.raises(RuntimeError), files.open_atomic("job1", "input.mp4") as out:
        out.write(b"replacement")
        raise RuntimeError("the upload broke off")
    assert files.path(relative).read_bytes() == b"abcdef", "the old file is untouched"

    files.delete("job1")
    assert not files.job_dir("job1").exists()
    files.delete("job1")  # already gone


def test_job_paths_stay_in_the_jobs_directory(tmp_path: Path) -> None:
    files = JobFiles(tmp_path / "jobs")
    for bad_id in ("../x", "", "a/b"):
        with pytest.raises(ValueError):
            files.job_dir(bad_id)
    with pytest.raises(ValueError):
        files.relative("job1", "../escape")
    with pytest.raises(ValueError):
        files.path("../../etc/passwd")


def test_the_disk_budget_refuses_new_jobs_before_the_disk_fills(tmp_path: Path) -> None:
    free = {"bytes": 10_000}
    files = JobFiles(
        tmp_path / "jobs", budget=5_000, free_margin=1_000, disk_free=lambda _: free["bytes"]
    )
    files.check_budget(incoming=1_000, in_use=4_000)
    with pytest.raises(DiskBudgetExceeded, match="budget is full"):
        files.check_budget(incoming=1_001, in_use=4_000)
    free["bytes"] = 2_000
    files.check_budget(incoming=1_000, in_use=0)
    with pytest.raises(DiskBudgetExceeded, match="disk is nearly full"):
        files.check_budget(incoming=1_001, in_use=0)
    unlimited = JobFiles(tmp_path / "jobs", budget=None, free_margin=0)
    unlimited.check_budget(incoming=1, in_use=10**15)
