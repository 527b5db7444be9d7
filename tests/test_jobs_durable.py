"""Batch jobs with real `livemorph serve` processes: a cluster (PostgreSQL, redis-server, one
shared jobs folder) whose nodes share the queue and take over a killed node's job, and a
job started after an image edit. A single node killed mid-job: tests/test_jobs_restart.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livemorph.testing import LiveServer, start_server, stop_server
from tests.postgres import PostgresServer
from tests.redis_server import RedisServer, redis_server
from tests.test_cluster import ADMIN, cluster_of
from tests.test_transform import make_clip

pytestmark = pytest.mark.slow


def submit(node: LiveServer, key: str, clip: Path) -> str:
    response = httpx.post(
        f"{node.base_url}/v1/jobs/lucy-restyle-2",
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


def wait_for(node: LiveServer, key: str, job_id: str, *states: str, within: float = 90) -> dict:
    deadline = time.monotonic() + within
    while (body := status(node, key, job_id))["status"] not in states:
        assert time.monotonic() < deadline, body
        time.sleep(0.1)
    return body


def usage_seconds(node: LiveServer, key: str) -> int:
    response = httpx.get(f"{node.base_url}/v1/usage", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return int(response.json()["totalSeconds"])


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


def node_metric(node: LiveServer, series: str) -> float:
    text = httpx.get(f"{node.base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)
    )


def test_a_clusters_nodes_share_the_queue_and_finish_a_dead_nodes_job(
    tmp_path: Path, postgres: PostgresServer, redis: RedisServer
) -> None:
    jobs_dir = tmp_path / "shared-jobs"
    flags = ("--jobs-dir", str(jobs_dir), "--job-lease", "6", "--capacity", "off")
    with cluster_of(tmp_path / "nodes", postgres, redis, 3, *flags) as cluster:
        first = cluster.nodes[0]
        key = cluster.mint_key(credits=600)
        short = make_clip(tmp_path / "short.mp4", seconds=1.0, size=(160, 120))
        # (a) six jobs submitted to one node run on several
        submitted = [submit(first, key, short) for _ in range(6)]
        for job_id in submitted:
            assert wait_for(first, key, job_id, "completed", "failed")["status"] == "completed"
        finished = [
            node_metric(node, 'livemorph_jobs_finished_total{model="lucy-restyle-2",status=')
            for node in cluster.nodes
        ]
        assert sum(finished) == 6 and sum(1 for count in finished if count) >= 2, finished
        assert usage_seconds(first, key) == 6

        # (b) a node killed mid-job: another finishes it, after its lease runs out
        long = make_clip(tmp_path / "long.mp4", seconds=8.0, size=(160, 120))
        job_id = submit(first, key, long)
        wait_for(first, key, job_id, "processing")
        deadline = time.monotonic() + 10
        while not (
            running := [n for n in cluster.nodes if node_metric(n, "livemorph_jobs_running")]
        ):
            assert time.monotonic() < deadline, "no node says it runs the job"
            time.sleep(0.1)
        (victim,) = running
        os.kill(victim.process.pid, signal.SIGKILL)
        victim.process.wait(timeout=10)
        survivors = [node for node in cluster.nodes if node is not victim]
        body = wait_for(survivors[0], key, job_id, "completed", "failed", within=120)
        assert body["status"] == "completed", body
        assert usage_seconds(survivors[0], key) == 6 + 8, "the long job charged once"
        finished_after = sum(
            node_metric(node, 'livemorph_jobs_finished_total{model="lucy-restyle-2",status=')
            for node in survivors
        )
        assert finished_after >= 1
        report = httpx.get(
            f"{survivors[0].base_url}/v1/cluster", headers={"X-ADMIN-KEY": ADMIN}
        ).json()
        assert len(report["nodes"]) == 2


def test_a_job_after_an_image_edit_runs_and_the_server_keeps_answering(tmp_path: Path) -> None:
    """An edit converts frames with PyAV on the server's worker threads; the job's process
    started after it must not inherit their state (uvloop's spawn ran Python's after-fork
    cleanup in the child, which deadlocked it, and the server waiting for it)."""
    import io

    from PIL import Image

    from tests.media import photo

    picture = io.BytesIO()
    Image.fromarray(photo(320, 240)).save(picture, format="PNG")
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0, size=(160, 120))
    node = start_server(tmp_path / "node", "--engine", "grade")
    try:
        edited = httpx.post(
            f"{node.base_url}/v1/generate/lucy-image-2",
            headers={"X-API-KEY": node.api_key},
            files={"data": ("photo.png", picture.getvalue(), "image/png")},
            data={"prompt": "anime"},
            timeout=60,
        )
        assert edited.status_code == 200, edited.text
        job_id = submit(node, node.api_key, clip)
        assert wait_for(node, node.api_key, job_id, "completed", "failed", within=60) == {
            "job_id": job_id,
            "status": "completed",
        }
        assert httpx.get(f"{node.base_url}/healthz", timeout=5).status_code == 200
    finally:
        stop_server(node)
