"""The node's job worker and the process each job runs in: limits, crashes, stops,
retention, progress and the CPU priority, on an in-process app (a real worker, real child
processes) or on the job process alone."""

from __future__ import annotations

import asyncio
import fractions
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from livemorph.config import Settings
from livemorph.job_process import BAD_INPUT, JobSpec, settings_env
from livemorph.server.job_worker import JobWorker
from livemorph.storage import JobStore, Store
from tests.inprocess import serve_in_process
from tests.support import eventually
from tests.test_jobs_api import finished, submit
from tests.test_transform import Clip, make_clip

SIZE = (160, 120)


def _worker(server) -> JobWorker:  # type: ignore[no-untyped-def]
    worker = server.state.job_worker
    assert worker is not None
    return worker


async def _key_id(server) -> str:  # type: ignore[no-untyped-def]
    principal = await server.state.store.authenticate(server.api_key)
    assert principal is not None
    return principal.key_id


async def test_a_key_has_at_most_its_cap_of_jobs_waiting(tmp_path: Path) -> None:
    """With no worker on the node the jobs wait; past --max-jobs-per-key a submission is
    refused with 429 and counted; another key is not held back by the first's."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(
        data_dir=tmp_path / "data", engine="grade", job_workers=0, max_jobs_per_key=2
    )
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        for _ in range(2):
            response = await submit(client, base, key, data=clip, prompt="anime")
            assert response.status_code == 200, response.text
        refused = await submit(client, base, key, data=clip, prompt="anime")
        assert refused.status_code == 429
        assert refused.json()["error"].startswith("Too many jobs for this key: 2 are waiting")
        other, _ = await server.state.store.create_api_key("other")
        assert (await submit(client, base, other, data=clip, prompt="anime")).status_code == 200
        metrics = (await client.get(f"{base}/metrics")).text
        assert 'livemorph_refusals_total{reason="key_job_limit"} 1.0' in metrics
        # nothing ran: the node takes submissions but runs none
        worker = _worker(server)
        assert [job.status for job in await worker.jobs.list_jobs(await _key_id(server))] == [
            "pending",
            "pending",
        ]


async def test_a_crashed_job_process_fails_its_job_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=60) as client:
        base, key = server.base_url, server.api_key
        worker = _worker(server)
        real = worker.command
        # a process killed as the kernel's OOM killer would kill it
        worker.command = [
            sys.executable,
            "-c",
            "import os, signal, sys; sys.stdin.readline(); os.kill(os.getpid(), signal.SIGKILL)",
        ]
        crashed = (await submit(client, base, key, data=clip, prompt="anime")).json()
        body = await finished(client, base, key, crashed["job_id"])
        assert body["status"] == "failed"
        assert body["error"] == (
            "the video could not be processed: the job's process stopped (killed: out of memory?)"
        )
        content = await client.get(
            f"{base}/v1/jobs/{crashed['job_id']}/content", headers={"X-API-KEY": key}
        )
        assert content.status_code == 409 and "job failed" in content.json()["error"]
        worker.command = real
        good = (await submit(client, base, key, data=clip, prompt="anime")).json()
        assert (await finished(client, base, key, good["job_id"]))["status"] == "completed"
        metrics = (await client.get(f"{base}/metrics")).text
        assert 'livemorph_jobs_finished_total{model="lucy-restyle-2",status="failed"} 1.0' in (
            metrics
        )
        assert (
            'livemorph_jobs_finished_total{model="lucy-restyle-2",status="completed"} 1.0'
            in metrics
        )
        # nothing was charged for the failure
        job = await worker.jobs.get_job(crashed["job_id"], await _key_id(server))
        assert job is not None and job.charged_seconds is None


async def test_a_stopping_node_gives_its_running_job_back(tmp_path: Path) -> None:
    """A graceful stop kills the job's process and puts the job back in the queue, its
    start not counted against the attempts a job gets."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    marker = tmp_path / "started"
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        worker = _worker(server)
        worker.command = [
            sys.executable,
            "-c",
            "import sys, time, pathlib; sys.stdin.readline(); "
            f"pathlib.Path({str(marker)!r}).write_text(str(__import__('os').getpid())); "
            "time.sleep(60)",
        ]
        job = (await submit(client, server.base_url, server.api_key, data=clip, prompt="x")).json()
        await eventually(marker.exists, within=20)
        child = int(marker.read_text())
        key_id = await _key_id(server)
        running = await worker.jobs.get_job(job["job_id"], key_id)
        assert running is not None and running.status == "processing"
        status = await client.get(
            f"{server.base_url}/v1/jobs/{job['job_id']}", headers={"X-API-KEY": server.api_key}
        )
        assert status.json()["status"] == "processing"
    # the app is closed, its store too: read the row through a fresh one
    reopened = Store.in_data_dir(tmp_path / "data")
    await reopened.open()
    try:
        row = await JobStore(reopened).get_job(job["job_id"], key_id)
    finally:
        await reopened.close()
    assert row is not None and row.status == "pending" and row.attempts == 0
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


async def test_finished_jobs_are_deleted_with_their_files_after_the_retention(
    tmp_path: Path,
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade", job_retention=2)
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=60) as client:
        base, key = server.base_url, server.api_key
        worker = _worker(server)
        # a realtime model's own name takes jobs too
        job = (await submit(client, base, key, "mirage_v2", data=clip, prompt="anime")).json()
        assert (await finished(client, base, key, job["job_id"]))["status"] == "completed"
        folder = worker.files.job_dir(job["job_id"])
        assert (folder / "output.mp4").is_file()
        server.clock.advance(3600)
        await worker.sweep()
        assert (
            await client.get(f"{base}/v1/jobs/{job['job_id']}/content", headers={"X-API-KEY": key})
        ).status_code == 200
        server.clock.advance(2 * 3600)
        await worker.sweep()
        assert not folder.exists()
        gone = await client.get(f"{base}/v1/jobs/{job['job_id']}", headers={"X-API-KEY": key})
        assert gone.status_code == 404
        metrics = (await client.get(f"{base}/metrics")).text
        assert 'livemorph_jobs{state="completed"} 0.0' in metrics


# -- the job's process alone ------------------------------------------------------------


def _run_process(spec: JobSpec, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "livemorph.job_process"],
        input=spec.to_json() + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
        check=False,
    )


def test_the_job_process_reports_progress_then_its_result(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0, size=SIZE)
    out = tmp_path / "out.mp4"
    spec = JobSpec(str(clip), str(out), "mirage", "anime", None, False, os.getpid(), "grade")
    done = _run_process(spec, settings_env(Settings()))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert lines[0] == {"done": 1, "total": len(Clip(clip).rgb)}
    assert lines[-1]["frames"] == len(Clip(out).rgb) == len(Clip(clip).rgb)
    assert lines[-1]["duration"] == pytest.approx(1.0, abs=0.05)


def test_the_job_process_says_why_an_input_cannot_be_read(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-video.mp4"
    bad.write_bytes(b"these bytes are no video" * 100)
    out = tmp_path / "out.mp4"
    spec = JobSpec(str(bad), str(out), "mirage", "anime", None, False, os.getpid(), "grade")
    done = _run_process(spec, settings_env(Settings()))
    assert done.returncode == BAD_INPUT
    (line,) = [json.loads(line) for line in done.stdout.splitlines()]
    assert line["error"].startswith("cannot read"), line
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


def test_the_job_process_ends_at_once_without_its_parent(tmp_path: Path) -> None:
    spec = JobSpec("in.mp4", str(tmp_path / "out.mp4"), "mirage", "x", None, False, 1)
    done = _run_process(spec, {})
    assert done.returncode == 1 and done.stdout == ""


def test_the_job_process_runs_only_on_cpu_nobody_else_wants() -> None:
    """SCHED_IDLE on Linux (threads it starts inherit it), else the highest niceness."""
    code = (
        "import os; from livemorph.job_process import yield_cpu; "
        "print(yield_cpu()); print(os.sched_getscheduler(0) == os.SCHED_IDLE, os.nice(0))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    granted, policy = done.stdout.splitlines()
    if granted == "SCHED_IDLE":
        assert policy.startswith("True")
    else:
        assert policy.endswith(" 19"), done.stdout


def test_the_job_process_gets_the_nodes_policy_settings_and_no_others() -> None:
    env = settings_env(
        Settings(engine="grade", model_engines="mirage=passthrough", admin_key="secret")
    )
    assert env == {"LIVEMORPH_MODERATION_TIMEOUT": "2.0", "LIVEMORPH_ENHANCER_TIMEOUT": "3.0"}


async def test_the_job_names_the_engine_the_node_serves_its_model_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine comes in the job, not the environment: a node whose engines include one
    only its own process knows (a bench's) still runs jobs of the other models."""
    monkeypatch.setenv("LIVEMORPH_ENGINE", "passthrough")
    monkeypatch.setenv("LIVEMORPH_ADMIN_KEY", "not for jobs")
    settings = Settings(
        data_dir=tmp_path / "data",
        engine="grade",
        model_engines="mirage_v2=passthrough",
        job_workers=0,
    )
    async with serve_in_process(settings) as server:
        worker = _worker(server)
        env = worker._env()
        job = await worker.jobs.create_job(await _key_id(server), "lucy-restyle-2", "x/in", 1)
        spec = worker._spec(job)
        other = worker._spec(
            await worker.jobs.create_job(await _key_id(server), "mirage_v2", "y/in", 1)
        )
    assert "LIVEMORPH_ENGINE" not in env and "LIVEMORPH_ADMIN_KEY" not in env
    assert (spec.model, spec.engine) == ("lucy-restyle-2", "grade")
    assert (other.model, other.engine) == ("mirage_v2", "passthrough")


def _frames(path: Path, size: tuple[int, int], times: list[float], container: str) -> bytes:
    """A video of flat frames at the given times (seconds), in `container`."""
    width, height = size
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = fractions.Fraction(1, 1000)
        for index, at in enumerate(times):
            frame = av.VideoFrame.from_ndarray(
                np.full((height, width, 3), 40 * index % 255, np.uint8), format="rgb24"
            )
            frame.pts, frame.time_base = round(at * 1000), fractions.Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path.read_bytes()


async def test_videos_past_the_limits_or_broken_are_refused_or_failed_in_words(
    tmp_path: Path,
) -> None:
    """A frame over 4K and a clip over 5 minutes are refused at once (413), a reference
    image that is not one too (415); a truncated file is refused or fails with a reason,
    and the node serves the next job."""
    huge = _frames(tmp_path / "huge.mkv", (3856, 2176), [0.0], "matroska")
    long = _frames(tmp_path / "long.mkv", (64, 48), [0.0, 1.0, 301.0], "matroska")
    clip = make_clip(tmp_path / "clip.mkv", seconds=2.0, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=60) as client:
        base, key = server.base_url, server.api_key
        response = await submit(client, base, key, data=huge, prompt="anime")
        assert response.status_code == 413, response.text
        assert response.json()["error"] == (
            "video frame too large: at most 8294400 pixels (3840x2160), this one is 3856x2176"
        )
        response = await submit(client, base, key, data=long, prompt="anime")
        assert response.status_code == 413, response.text
        assert response.json()["error"].startswith("video too long: at most 5 minutes")
        response = await submit(
            client, base, key, data=clip, prompt="anime", reference_image=b"GIF89a not really"
        )
        assert response.status_code == 415, response.text
        assert response.json()["error"].startswith("invalid image: reference_image:")
        assert not any((tmp_path / "data" / "jobs").iterdir()), "a refused job left files"
        truncated = await submit(client, base, key, data=clip[: len(clip) // 2], prompt="anime")
        if truncated.status_code == 200:
            body = await finished(client, base, key, truncated.json()["job_id"])
            # what a cut file still holds comes back, or the job says why it cannot
            assert body["status"] == "completed" or body["error"], body
        else:
            assert truncated.status_code == 415, truncated.text
        good = (await submit(client, base, key, data=clip, prompt="anime")).json()
        assert (await finished(client, base, key, good["job_id"]))["status"] == "completed"


async def test_the_worker_counts_its_job_processes_cpu(tmp_path: Path) -> None:
    """capacity.py counts it as idle for the node's sessions (the jobs yield it)."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        worker = _worker(server)
        assert server.state.capacity.yielding == worker.cpu_seconds
        worker.command = [
            sys.executable,
            "-c",
            "import sys, time; sys.stdin.readline(); end = time.process_time() + 1.0\n"
            "while time.process_time() < end: pass",
        ]
        job = (await submit(client, server.base_url, server.api_key, data=clip, prompt="x")).json()
        body = await finished(client, server.base_url, server.api_key, job["job_id"])
        assert body["status"] == "failed", "it wrote no result"
        assert 0.95 <= worker.cpu_seconds() <= 5.0


async def test_a_running_jobs_progress_is_in_its_status(tmp_path: Path) -> None:
    """The worker writes what its process says to the database with the lease, so any
    node answers it; it goes when the job ends."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.5, size=SIZE).read_bytes()
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        base, key = server.base_url, server.api_key
        worker = _worker(server)
        worker.command = [
            sys.executable,
            "-c",
            "import sys, time; sys.stdin.readline(); "
            'print(\'{"done": 3, "total": 12}\', flush=True); time.sleep(4)',
        ]
        job = (await submit(client, base, key, data=clip, prompt="x")).json()
        seen: list[dict] = []

        async def progress_shown() -> bool:
            response = await client.get(
                f"{base}/v1/jobs/{job['job_id']}", headers={"X-API-KEY": key}
            )
            seen.append(response.json())
            return "progress" in seen[-1]

        for _ in range(100):
            if await progress_shown():
                break
            await asyncio.sleep(0.1)
        assert seen[-1] == {"job_id": job["job_id"], "status": "processing", "progress": 0.25}
        body = await finished(client, base, key, job["job_id"])
        assert "progress" not in body


async def test_the_housekeeping_deletes_expired_uploads_too(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", engine="grade", job_workers=0)
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{server.base_url}/v1/files",
            headers={"X-API-KEY": server.api_key},
            files={"file": ("a.bin", b"x" * 1000, "application/octet-stream")},
            data={"ttl_seconds": "60"},
        )
        assert response.status_code == 200, response.text
        file_id = response.json()["id"]
        worker = _worker(server)
        folder = worker.files.root / file_id
        assert folder.exists()
        server.clock.advance(120)
        await worker.sweep()
        assert not folder.exists()
        gone = await client.get(
            f"{server.base_url}/v1/files/{file_id}", headers={"X-API-KEY": server.api_key}
        )
        assert gone.status_code == 404
