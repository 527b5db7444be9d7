"""Batch video jobs: `POST /v1/jobs/{model}`, its status and content, on a served app with
the fast `grade` engine, as decart==0.2.4's `client.queue` calls them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx
import pytest

from livemorph.config import Settings
from tests.inprocess import serve_in_process
from tests.media import mean_abs_diff
from tests.test_transform import Clip, make_clip

SIZE = (320, 240)


async def submit(
    client: httpx.AsyncClient, base: str, key: str, model: str = "lucy-restyle-2", **fields
) -> httpx.Response:
    files = {k: (f"{k}.bin", v) for k, v in fields.items() if isinstance(v, bytes)}
    data = {k: v for k, v in fields.items() if not isinstance(v, bytes)}
    return await client.post(
        f"{base}/v1/jobs/{model}", headers={"X-API-KEY": key}, files=files, data=data
    )


async def finished(client: httpx.AsyncClient, base: str, key: str, job_id: str) -> dict:
    for _ in range(600):
        response = await client.get(f"{base}/v1/jobs/{job_id}", headers={"X-API-KEY": key})
        assert response.status_code == 200, response.text
        body = response.json()
        if body["status"] in ("completed", "failed"):
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {body}")


@pytest.mark.slow
async def test_a_clip_is_restyled_and_only_its_key_sees_it(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.5, size=SIZE)
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=60) as client:
        base, key = server.base_url, server.api_key
        store = server.state.store
        other, _ = await store.create_api_key("other")
        response = await submit(client, base, key, data=clip.read_bytes(), prompt="anime")
        assert response.status_code == 200, response.text
        job = response.json()
        assert job["status"] == "pending" and set(job) == {"job_id", "status"}
        early = await client.get(
            f"{base}/v1/jobs/{job['job_id']}/content", headers={"X-API-KEY": key}
        )
        assert early.status_code in (200, 409)
        assert (await finished(client, base, key, job["job_id"])) == {
            "job_id": job["job_id"],
            "status": "completed",
        }
        content = await client.get(
            f"{base}/v1/jobs/{job['job_id']}/content", headers={"X-API-KEY": key}
        )
        assert content.status_code == 200, content.text
        assert content.headers["content-type"] == "video/mp4"
        out = tmp_path / "out.mp4"
        out.write_bytes(content.content)
        source, result = Clip(clip), Clip(out)
        assert result.size == SIZE and len(result.rgb) == len(source.rgb)
        assert result.times[-1] == pytest.approx(source.times[-1], abs=0.05)
        assert result.audio == "aac" and result.sound == pytest.approx(1.5, abs=0.05)
        changed = [mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)]
        assert min(changed) > 8, "the clip was not restyled"
        # the job's seconds were charged once
        principal = await store.authenticate(key)
        assert principal is not None and server.state.job_worker is not None
        job_row = await server.state.job_worker.jobs.get_job(job["job_id"], principal.key_id)
        assert job_row is not None and job_row.charged_seconds == 2
        for path in (f"/v1/jobs/{job['job_id']}", f"/v1/jobs/{job['job_id']}/content"):
            response = await client.get(f"{base}{path}", headers={"X-API-KEY": other})
            assert response.status_code == 404, response.text
            response = await client.get(f"{base}{path}", headers={"X-API-KEY": "no-such-key"})
            assert response.status_code == 401


@pytest.mark.slow
async def test_bad_submissions_are_refused_in_words(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.4, size=(64, 48), audio=None)
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with serve_in_process(settings) as server, httpx.AsyncClient(timeout=60) as client:
        base, key = server.base_url, server.api_key
        video = clip.read_bytes()
        response = await submit(client, base, "no-such-key", data=video, prompt="anime")
        assert (response.status_code, response.json()) == (401, {"error": "invalid api key"})
        response = await submit(client, base, key, "lucy-9", data=video, prompt="anime")
        assert response.status_code == 404
        assert "model not found: 'lucy-9'" in response.json()["error"]
        response = await submit(client, base, key, "lucy-image-2", data=video, prompt="anime")
        assert response.status_code == 404, "an image model runs no video jobs"
        response = await submit(client, base, key, prompt="anime")
        assert response.status_code == 400
        assert "data (the video) is required" in response.json()["error"]
        response = await submit(client, base, key, data=video)
        assert response.status_code == 400
        assert "prompt or reference_image is required" in response.json()["error"]
        response = await submit(client, base, key, data=os.urandom(20_000), prompt="anime")
        assert response.status_code == 415, response.text
        assert response.json()["error"].startswith("invalid video:")
        response = await submit(client, base, key, data=video, prompt="anime", seed="x")
        assert response.status_code == 400 and "seed" in response.json()["error"]
        jobs_dir = tmp_path / "data" / "jobs"
        assert not jobs_dir.exists() or not any(jobs_dir.iterdir()), "a refused job left files"
        # the alias of the clients' older name runs as lucy-restyle-2
        response = await submit(
            client, base, key, "lucy-restyle-v2v", data=video, prompt="anime", seed="7"
        )
        assert response.status_code == 200, response.text
        job_id = response.json()["job_id"]
        assert (await finished(client, base, key, job_id))["status"] == "completed"
        missing = await client.get(f"{base}/v1/jobs/0000000000000000", headers={"X-API-KEY": key})
        assert missing.status_code == 404
