"""`livemorph transform --server` on a server that takes batch jobs: the file goes as a job
(progress shown, no real-time pacing) and the MP4 it makes lands in OUTPUT, whatever its
container; what a job cannot do (prompts on a timeline) and `--realtime` stream instead."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from livemorph.testing import LiveServer, serve
from tests.media import mean_abs_diff
from tests.test_transform import SIZE, Clip, make_clip, transform

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("jobs-server"), "--engine", "grade") as live:
        yield live


@pytest.fixture
def keyed(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> LiveServer:
    monkeypatch.setenv("LIVEMORPH_API_KEY", server.api_key)
    return server


def job_files(server: LiveServer) -> list[str]:
    jobs = server.data_dir / "jobs"
    return sorted(os.listdir(jobs)) if jobs.is_dir() else []


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_file_goes_as_a_job_and_comes_back_whole(
    keyed: LiveServer, tmp_path: Path, capsys, suffix: str
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.2)
    out = tmp_path / f"out{suffix}"
    before = job_files(keyed)
    status, err = transform(
        capsys, clip, out, "--model", "mirage", "--prompt", "anime", "--server", keyed.base_url
    )
    assert status == 0, err
    assert len(job_files(keyed)) == len(before) + 1, "no job was submitted"
    # the server's engine, frame for frame, as a local run of the same engine makes it
    local = tmp_path / f"local{suffix}"
    status, _ = transform(
        capsys, clip, local, "--model", "mirage", "--prompt", "anime", "--engine", "grade"
    )
    assert status == 0
    source, result, here = Clip(clip), Clip(out), Clip(local)
    assert len(result.rgb) == len(source.rgb) == 30
    # the input's timestamps (.mkv shifts them all by the AAC priming, as a local run does)
    assert result.times == here.times
    assert result.times == pytest.approx(source.times, abs=0.025)
    assert result.size == SIZE and result.rate == 25
    assert result.audio == "aac" and result.sound == pytest.approx(1.2, abs=0.05)
    assert max(mean_abs_diff(a, b) for a, b in zip(here.rgb, result.rgb, strict=True)) < 3
    assert min(mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)) > 8
    last = err.splitlines()[-1]
    assert f"wrote {out}: 30 frames" in last and "latency" not in last
    assert "30/30 frames (100%)" in err, err
    assert f"submitted to {keyed.base_url}" in err.splitlines()[0]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "a hidden file left"


def test_what_a_job_cannot_do_streams_in_real_time(
    keyed: LiveServer, tmp_path: Path, capsys
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    before = job_files(keyed)
    timed = tmp_path / "timed.mp4"
    status, err = transform(
        capsys,
        *(clip, timed, "--model", "mirage", "--prompt", "anime", "--prompt", "sketch@0.5"),
        *("--server", keyed.base_url),
    )
    assert status == 0, err
    assert "a job takes one prompt for the whole clip; streaming in real time" in err
    assert "latency" in err.splitlines()[-1]
    forced = tmp_path / "forced.mp4"
    status, err = transform(
        capsys,
        *(clip, forced, "--model", "mirage", "--prompt", "anime"),
        *("--server", keyed.base_url, "--realtime"),
    )
    assert status == 0, err
    assert "latency" in err.splitlines()[-1]
    assert job_files(keyed) == before, "a job was submitted"
    assert len(Clip(forced).rgb) == len(Clip(clip).rgb) == 25


def test_a_refused_job_is_one_line_and_writes_nothing(
    server: LiveServer, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.4)
    out = tmp_path / "out.mp4"
    monkeypatch.setenv("LIVEMORPH_API_KEY", "no-such-key")
    status, err = transform(
        capsys, clip, out, "--model", "mirage", "--prompt", "anime", "--server", server.base_url
    )
    assert status == 2, err
    assert err.strip().splitlines()[-1].endswith("invalid api key"), err
    status, err = transform(capsys, clip, out, "--model", "mirage", "--prompt", "x", "--realtime")
    assert status == 2 and "--realtime is for --server" in err
    assert sorted(os.listdir(tmp_path)) == ["clip.mp4"]


def test_a_server_without_jobs_gets_the_file_in_real_time(
    keyed: LiveServer, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_jobs(self: object) -> bool:
        return False

    monkeypatch.setattr("livemorph.sdk.jobs.JobsClient.available", no_jobs)
    clip = make_clip(tmp_path / "clip.mp4", seconds=0.6)
    out = tmp_path / "out.mp4"
    before = job_files(keyed)
    status, err = transform(
        capsys, clip, out, "--model", "mirage", "--prompt", "anime", "--server", keyed.base_url
    )
    assert status == 0, err
    assert "the server takes no jobs; streaming in real time" in err
    assert "latency" in err.splitlines()[-1]
    assert job_files(keyed) == before
    assert len(Clip(out).rgb) == 15
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
