"""The Python SDK's batch calls (`client.jobs`, `client.edit_image`) against a served app
with the fast `grade` engine: a clip comes back its length and size, a picture edited and
its size, and refusals and failures are `LivemorphError`s with the server's words."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from livemorph.config import Settings
from livemorph.errors import ErrorCode, LivemorphError
from livemorph.sdk import JobStatus, create_client
from tests.inprocess import serve_in_process
from tests.media import mean_abs_diff, photo
from tests.test_transform import Clip, make_clip

SIZE = (160, 96)


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.slow
async def test_a_clip_comes_back_restyled_its_length_and_size(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0, size=SIZE)
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with (
        serve_in_process(settings) as server,
        create_client(server.api_key, server.base_url) as client,
    ):
        assert await client.jobs.available()
        seen: list[JobStatus] = []
        # a path, with a progress callback
        video = await client.jobs.submit_and_wait(
            "lucy-restyle-2", clip, prompt="anime", on_progress=seen.append, poll_interval=0.1
        )
        assert seen and seen[-1].status == "completed" and seen[-1].done
        out = tmp_path / "out.mp4"
        out.write_bytes(video)
        source, result = Clip(clip), Clip(out)
        assert result.size == SIZE and len(result.rgb) == len(source.rgb) == 25
        assert result.times[-1] == pytest.approx(source.times[-1], abs=0.05)
        assert result.sound == pytest.approx(1.0, abs=0.05)
        assert min(mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)) > 8
        # bytes and a file object, step by step, the result saved to a path
        job = await client.jobs.submit(
            "mirage", clip.read_bytes(), prompt="sketch", enhance_prompt=False
        )
        assert job.status == "pending" and job.progress is None
        with clip.open("rb") as handle:
            other = await client.jobs.submit(
                "lucy-restyle-2", handle, reference_image=png(photo(64, 64))
            )
        for queued in (job, other):
            done = await client.jobs.wait(queued.job_id, poll_interval=0.1)
            assert done == JobStatus(queued.job_id, "completed")
            saved = await client.jobs.save(queued.job_id, tmp_path / f"{queued.job_id}.mp4")
            assert Clip(saved).size == SIZE and len(Clip(saved).rgb) == 25
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "a part file left"


@pytest.mark.slow
async def test_refusals_and_failures_are_livemorph_errors(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.4, size=(64, 48), audio=None)
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    async with (
        serve_in_process(settings) as server,
        create_client(server.api_key, server.base_url) as client,
        create_client("no-such-key", server.base_url) as stranger,
    ):
        with pytest.raises(LivemorphError) as caught:
            await stranger.jobs.submit("lucy-restyle-2", clip, prompt="anime")
        assert caught.value.code == ErrorCode.INVALID_API_KEY and caught.value.permanent
        with pytest.raises(LivemorphError) as caught:
            await stranger.jobs.status("0000000000000000")
        assert caught.value.code == ErrorCode.INVALID_API_KEY
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.submit("lucy-9", clip, prompt="anime")
        assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
        assert "model not found: 'lucy-9'" in caught.value.message
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.submit("lucy-restyle-2", os.urandom(20_000), prompt="anime")
        assert caught.value.code == ErrorCode.INVALID_INPUT
        assert "invalid video" in caught.value.message
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.submit("lucy-restyle-2", clip)
        assert caught.value.code == ErrorCode.INVALID_INPUT
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.submit("lucy-restyle-2", tmp_path / "missing.mp4", prompt="x")
        assert caught.value.code == ErrorCode.INVALID_INPUT
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.status("0000000000000000")
        assert "job not found" in caught.value.message
        # a video the job's process cannot read: it runs, says so, and fails with its reason
        worker = server.state.job_worker
        assert worker is not None
        worker.command = [
            sys.executable,
            "-c",
            "import sys, time; sys.stdin.readline(); "
            'print(\'{"done": 1, "total": 4}\', flush=True); time.sleep(3); '
            'print(\'{"error": "cannot read the video: no frames"}\', flush=True); sys.exit(2)',
        ]
        job = await client.jobs.submit("lucy-restyle-2", clip, prompt="anime")
        seen: list[JobStatus] = []
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.wait(job.job_id, on_progress=seen.append, poll_interval=0.1)
        assert caught.value.code == ErrorCode.INVALID_INPUT
        assert caught.value.message == (
            f"job {job.job_id} failed: invalid video: cannot read the video: no frames"
        )
        assert JobStatus(job.job_id, "processing", 0.25) in seen
        assert seen[-1].status == "failed" and seen[-1].error
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.result(job.job_id)
        assert "409" in caught.value.message
        assert not (tmp_path / "never.mp4").exists()
        with pytest.raises(LivemorphError):
            await client.jobs.save(job.job_id, tmp_path / "never.mp4")
        assert not (tmp_path / "never.mp4").exists()
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


@pytest.mark.slow
async def test_an_image_edit_comes_back_its_size_and_edited(tmp_path: Path) -> None:
    astronaut = photo(96, 64)
    settings = Settings(data_dir=tmp_path / "data", engine="grade")
    path = tmp_path / "photo.png"
    path.write_bytes(png(astronaut))
    async with (
        serve_in_process(settings) as server,
        create_client(server.api_key, server.base_url) as client,
    ):
        for image in (path, str(path), path.read_bytes(), astronaut):
            edited = await client.edit_image("lucy-image-2", image, prompt="anime")
            picture = np.asarray(Image.open(io.BytesIO(edited)).convert("RGB"))
            assert picture.shape == astronaut.shape
            assert mean_abs_diff(picture, astronaut) > 8
        with path.open("rb") as handle:
            edited = await client.edit_image(
                "lucy-image-2", handle, prompt="sketch", reference_image=png(photo(32, 32))
            )
        assert Image.open(io.BytesIO(edited)).size == (96, 64)
        with pytest.raises(LivemorphError) as caught:
            await client.edit_image("lucy-image-2", b"not an image", prompt="anime")
        assert caught.value.code == ErrorCode.INVALID_INPUT
        with pytest.raises(LivemorphError) as caught:
            await client.edit_image("lucy-9", path, prompt="anime")
        assert caught.value.code == ErrorCode.MODEL_NOT_FOUND


async def test_a_server_without_jobs_is_told_apart() -> None:
    def answer(routes: bool):  # type: ignore[no-untyped-def]
        def handler(request: httpx.Request) -> httpx.Response:
            if request.headers["x-api-key"] == "bad":
                return httpx.Response(401, json={"error": "invalid api key"})
            if routes:
                return httpx.Response(404, json={"error": "job not found: '0000000000000000'"})
            return httpx.Response(404, json={"detail": "Not Found"})

        return httpx.MockTransport(handler)

    for routes in (True, False):
        async with create_client("k", "http://jobs.test", transport=answer(routes)) as client:
            assert await client.jobs.available() is routes
    async with create_client("bad", "http://jobs.test", transport=answer(True)) as client:
        with pytest.raises(LivemorphError) as caught:
            await client.jobs.available()
        assert caught.value.code == ErrorCode.INVALID_API_KEY
