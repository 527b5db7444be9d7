"""Batch jobs on a cluster: three real `livemorph serve` nodes on one PostgreSQL, one
redis-server and one shared `--jobs-dir`, as tests/test_cluster.py starts them.

Jobs submitted to one node are run by whichever node claims them first; a node killed
(SIGKILL) mid-job keeps its claim until its lease runs out, then another node takes the
job, runs it to the end and charges it, once.

Which node ran a finished job is no longer in its row (`claimed_by` is cleared), so it is
read from what each node says of itself: its log line for each job it completed, and its
`livemorph_jobs_finished_total`. While a job runs, its row names its node, read straight
from PostgreSQL. The engine is `sleep` (see tests/test_jobs_restart.py): a job takes the
time it says whatever else the machine runs."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livemorph.server.job_worker import MIN_LEASE
from livemorph.testing import LiveServer
from tests.postgres import PostgresServer
from tests.redis_server import RedisServer, redis_server
from tests.test_cluster import Cluster, cluster_of
from tests.test_jobs_restart import job_processes, still_running
from tests.test_transform import make_clip

pytestmark = pytest.mark.slow

MODEL = "lucy-restyle-2"
#: The shortest lease a node takes (a shorter `--job-lease` is raised to it).
LEASE = MIN_LEASE
CREDITS = 600
#: (a): six 1 s clips; (b): one of 4 s, at 40 ms a frame about 4 s of work.
SHORT_JOBS = 6
LONG_SECONDS = 4
ENGINE = ("--engine", "sleep:40")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def submit(node: LiveServer, key: str, clip: Path) -> str:
    response = httpx.post(
        f"{node.base_url}/v1/jobs/{MODEL}",
        headers={"X-API-KEY": key},
        files={"data": ("clip.mp4", clip.read_bytes(), "video/mp4")},
        data={"prompt": "anime"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["job_id"])


def status(node: LiveServer, key: str, job_id: str) -> dict:
    response = httpx.get(f"{node.base_url}/v1/jobs/{job_id}", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_finished(node: LiveServer, key: str, job_id: str, within: float) -> dict:
    deadline = time.monotonic() + within
    while (body := status(node, key, job_id))["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def usage(node: LiveServer, key: str) -> dict:
    response = httpx.get(f"{node.base_url}/v1/usage", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


def finished_here(node: LiveServer) -> float:
    """The node's `livemorph_jobs_finished_total` for MODEL, completed."""
    series = f'livemorph_jobs_finished_total{{model="{MODEL}",status="completed"}} '
    text = httpx.get(f"{node.base_url}/metrics").text
    return sum(float(line.split(" ")[-1]) for line in text.splitlines() if line.startswith(series))


def completed_by(node: LiveServer) -> list[str]:
    """The jobs the node's log says it completed (job_worker.py's line for each)."""
    return re.findall(rf"job ([0-9a-f]+): {MODEL}, \d+ frames, \d+ s charged", node.log)


class Rows:
    """The cluster's `jobs` table, read with psql."""

    def __init__(self, postgres: PostgresServer, cluster: Cluster) -> None:
        self.postgres = postgres
        self.database = cluster.database_url.rsplit("/", 1)[1]

    def get(self, job_id: str) -> dict[str, str]:
        columns = (
            "status",
            "claimed_by",
            "attempts",
            "charged_seconds",
            "EXTRACT(EPOCH FROM lease_until)",
        )
        line = self.postgres.psql(
            f"SELECT {', '.join(columns)} FROM jobs WHERE id = '{job_id}'", self.database
        ).strip()
        values = line.split("|")
        assert len(values) == len(columns), line
        fields = ("status", "claimed_by", "attempts", "charged", "lease_until")
        return dict(zip(fields, values, strict=True))


def test_nodes_share_the_queue_and_take_over_a_killed_nodes_job(
    tmp_path: Path, postgres: PostgresServer, redis: RedisServer
) -> None:
    flags = (*ENGINE, "--jobs-dir", str(tmp_path / "shared-jobs"), "--job-lease", str(LEASE))
    short = make_clip(tmp_path / "short.mp4", seconds=1.0, size=(160, 120))
    long = make_clip(tmp_path / "long.mp4", seconds=LONG_SECONDS, size=(160, 120))
    with cluster_of(tmp_path / "nodes", postgres, redis, 3, *flags) as cluster:
        rows = Rows(postgres, cluster)
        names = dict(zip("abc", cluster.nodes, strict=True))
        entry = cluster.nodes[0]
        key = cluster.mint_key(credits=CREDITS)

        # (a) six jobs, all submitted to one node, are run by several
        jobs = [submit(entry, key, short) for _ in range(SHORT_JOBS)]
        for job_id in jobs:
            assert wait_finished(entry, key, job_id, within=60)["status"] == "completed"
        by_node = {name: completed_by(node) for name, node in names.items()}
        ran = sorted(job for done in by_node.values() for job in done)
        assert ran == sorted(jobs), ("each completed once, by one node", by_node)
        assert sum(1 for done in by_node.values() if done) >= 2, by_node
        counted = {name: finished_here(node) for name, node in names.items()}
        assert counted == {name: len(done) for name, done in by_node.items()}, counted
        for job_id in jobs:
            row = rows.get(job_id)
            assert (row["status"], row["attempts"], row["charged"]) == ("completed", "1", "1")
        assert usage(entry, key)["totalSeconds"] == SHORT_JOBS

        # (b) a node killed mid-job: its claim holds until the lease runs out, then
        # another node runs the job to the end
        job_id = submit(entry, key, long)
        deadline = time.monotonic() + 30
        while not (row := rows.get(job_id))["claimed_by"] or not job_processes(
            names[row["claimed_by"]]
        ):
            assert row["status"] in ("pending", "processing"), row
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        victim = names[row["claimed_by"]]
        running = job_processes(victim)
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        killed_at = time.time()
        # the lease as last renewed: the job is the victim's until then
        row = rows.get(job_id)
        assert row["status"] == "processing" and row["claimed_by"] == row_name(names, victim)
        lease_until = float(row["lease_until"])
        assert lease_until <= killed_at + LEASE + 0.5, row
        deadline = time.monotonic() + 5
        while any(still_running(pid) for pid in running):
            assert time.monotonic() < deadline, "the job's process outlived its node"
            time.sleep(0.05)

        survivors = [node for node in cluster.nodes if node is not victim]
        deadline = time.monotonic() + LEASE + 30
        while (row := rows.get(job_id))["claimed_by"] == row_name(names, victim):
            assert row["status"] == "processing", row
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        taken_over = time.time()
        assert taken_over >= lease_until, "taken from its node before the lease ran out"
        assert row["claimed_by"] in ("", *(row_name(names, node) for node in survivors)), row

        body = wait_finished(survivors[0], key, job_id, within=60)
        assert body == {"job_id": job_id, "status": "completed"}, body
        row = rows.get(job_id)
        assert (row["attempts"], row["charged"], row["claimed_by"]) == (
            "2",
            str(LONG_SECONDS),
            "",
        ), row
        kept = sorted(path.name for path in (tmp_path / "shared-jobs" / job_id).iterdir())
        assert kept == ["input.video", "output.mp4"], "the killed run's leftovers deleted"
        finishers = [node for node in survivors if job_id in completed_by(node)]
        assert len(finishers) == 1, "completed by one survivor"
        assert job_id not in completed_by(victim)
        report = usage(survivors[1], key)
        assert report["totalSeconds"] == SHORT_JOBS + LONG_SECONDS, report
        assert report["credits"] == CREDITS - SHORT_JOBS - LONG_SECONDS, report


def row_name(names: dict[str, LiveServer], node: LiveServer) -> str:
    return next(name for name, each in names.items() if each is node)
