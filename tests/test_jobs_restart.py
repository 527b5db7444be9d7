"""A batch job outlives its server: one real `livemorph serve` process (SQLite in its data
folder) killed with SIGKILL while a job runs, its job's process gone with it, then started
again on the same folder. The job runs again from the start without waiting out its lease
(a node that shares its database with no other takes back every running job as it
starts), completes with the input's length, and is charged once.

The engine is `sleep`: a passthrough that waits a fixed time a frame. A job's process runs
at SCHED_IDLE, so an engine that burns CPU (grade, the neural engine) takes as long as the
other processes of a busy 2-core machine let it, anywhere from 2 to 30 s; a sleeping one
takes the time it says, and leaves a window to kill the server in."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import av
import httpx
import pytest

from livemorph.testing import LiveServer, start_server, stop_server
from tests.test_transform import make_clip

pytestmark = pytest.mark.slow

ADMIN = "restart-test-admin"
MODEL = "lucy-restyle-2"
#: 4 s at 25 fps, 60 ms a frame: about 6 s of work, killed 2 to 4 s in.
CLIP_SECONDS = 4
#: A lease far longer than the test: the job must be taken back because the node restarted,
#: not because its lease ran out.
LEASE = 60
FLAGS = ("--engine", "sleep:60", "--admin-key", ADMIN, "--job-lease", str(LEASE))
CREDITS = 100


def job_processes(server: LiveServer) -> list[int]:
    """The ids of the server's children that run a job (`python -m livemorph.job_process`),
    from /proc (Linux)."""
    found = []
    for task in Path(f"/proc/{server.process.pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"livemorph.job_process" in command:
                found.append(child)
    return found


def still_running(pid: int) -> bool:
    """Whether process `pid` runs: an ended one not yet reaped (a zombie) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def status(server: LiveServer, key: str, job_id: str) -> dict:
    response = httpx.get(f"{server.base_url}/v1/jobs/{job_id}", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


def usage(server: LiveServer, key: str) -> dict:
    response = httpx.get(f"{server.base_url}/v1/usage", headers={"X-API-KEY": key})
    assert response.status_code == 200, response.text
    return dict(response.json())


def job_row(data_dir: Path, job_id: str) -> sqlite3.Row:
    with sqlite3.connect(data_dir / "livemorph.db") as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    assert row is not None
    return row


def frames_and_seconds(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        assert stream.duration is not None and stream.time_base is not None
        return frames, float(stream.duration * stream.time_base)


def test_a_job_killed_with_its_server_completes_after_restart_charged_once(
    tmp_path: Path,
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=CLIP_SECONDS, size=(160, 120))
    data = tmp_path / "node"
    server = start_server(data, *FLAGS)
    try:
        minted = httpx.post(
            f"{server.base_url}/v1/admin/keys",
            json={"name": "restart", "credits": CREDITS},
            headers={"X-ADMIN-KEY": ADMIN},
        )
        assert minted.status_code == 201, minted.text
        key = minted.json()["apiKey"]
        submitted = httpx.post(
            f"{server.base_url}/v1/jobs/{MODEL}",
            headers={"X-API-KEY": key},
            files={"data": ("clip.mp4", clip.read_bytes(), "video/mp4")},
            data={"prompt": "anime"},
            timeout=30,
        )
        assert submitted.status_code == 200, submitted.text
        job_id = submitted.json()["job_id"]

        # mid-job: running, its process at work, some progress written and not all
        deadline = time.monotonic() + 30
        while True:
            body = status(server, key, job_id)
            assert body["status"] in ("pending", "processing"), body
            running = job_processes(server)
            if body.get("progress") is not None and running:
                break
            assert time.monotonic() < deadline, (body, server.log)
            time.sleep(0.05)
        assert body["status"] == "processing" and 0 <= body["progress"] < 1, body
        assert len(running) == 1, running
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)
        # the job's process died with its server (PR_SET_PDEATHSIG), not left writing
        deadline = time.monotonic() + 5
        while any(still_running(process) for process in running):
            assert time.monotonic() < deadline, "the job's process outlived its server"
            time.sleep(0.05)
    finally:
        if server.process.poll() is None:
            stop_server(server)

    killed = job_row(data, job_id)
    assert killed["status"] == "processing" and killed["attempts"] == 1
    assert killed["charged_seconds"] is None
    assert not (data / "jobs" / job_id / "output.mp4").exists(), "no half-made output"

    restarted = start_server(data, *FLAGS)
    try:
        # taken back and started again as the node starts, long before its lease ends
        deadline = time.monotonic() + 10
        while (row := job_row(data, job_id))["attempts"] < 2:
            assert row["status"] in ("pending", "processing"), dict(row)
            assert time.monotonic() < deadline, (dict(row), restarted.log)
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while (body := status(restarted, key, job_id))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, (body, restarted.log)
            time.sleep(0.1)
        assert body == {"job_id": job_id, "status": "completed"}, (body, restarted.log)

        content = httpx.get(
            f"{restarted.base_url}/v1/jobs/{job_id}/content", headers={"X-API-KEY": key}
        )
        assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
        out = tmp_path / "out.mp4"
        out.write_bytes(content.content)
        frames, seconds = frames_and_seconds(out)
        expected_frames, expected_seconds = frames_and_seconds(clip)
        assert frames == expected_frames
        assert seconds == pytest.approx(expected_seconds, abs=0.1)

        # nothing of the killed run is left: its half-written output was deleted
        kept = sorted(path.name for path in (data / "jobs" / job_id).iterdir())
        assert kept == ["input.video", "output.mp4"], kept

        row = job_row(data, job_id)
        assert row["attempts"] == 2, "run twice: once killed, once to the end"
        assert row["charged_seconds"] == CLIP_SECONDS and row["claimed_by"] is None

        report = usage(restarted, key)
        assert report["totalSeconds"] == CLIP_SECONDS, report
        assert report["days"] == [
            {"day": report["days"][0]["day"], "model": MODEL, "seconds": CLIP_SECONDS}
        ], report
        assert report["credits"] == CREDITS - CLIP_SECONDS, report
        # and it stays so: no late second charge from a leftover of the first run
        time.sleep(1)
        assert usage(restarted, key)["totalSeconds"] == CLIP_SECONDS
    finally:
        stop_server(restarted)
