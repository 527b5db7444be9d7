"""`livemorph transform`: a clip made here (the astronaut sliding by, a 440 Hz tone) through
the engines, locally and through a real server; the output keeps the clip's frames,
timestamps, size and sound; prompts change on time; bad input is one line and exit 2."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from skimage import data

from livemorph.cli import main
from livemorph.testing import serve
from livemorph.transform import Progress, TransformError, parse_prompts, parse_size
from tests.media import mean_abs_diff

FPS = 25
SIZE = (320, 176)


def make_clip(
    path: Path,
    seconds: float = 2.0,
    size: tuple[int, int] = SIZE,
    audio: str | None = "aac",
    video: bool = True,
) -> Path:
    """The astronaut, sliding 3 pixels a frame, at 25 fps, with a 440 Hz tone."""
    width, height = size
    base = np.asarray(Image.fromarray(data.astronaut()).resize((width, height)))
    with av.open(str(path), "w") as out:
        stream = None
        if video:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        sound = out.add_stream(audio, rate=48_000, layout="mono") if audio else None
        if stream is not None:
            for index in range(round(seconds * FPS)):
                frame = av.VideoFrame.from_ndarray(np.roll(base, 3 * index, axis=1), format="rgb24")
                frame.pts = index
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        if sound is not None:
            samples = round(seconds * 48_000)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48_000)).astype(np.float32)
            for start in range(0, samples, 960):
                chunk = av.AudioFrame.from_ndarray(
                    tone[None, start : start + 960], format="flt", layout="mono"
                )
                chunk.sample_rate, chunk.pts = 48_000, start
                out.mux(sound.encode(chunk))
            out.mux(sound.encode(None))
    return path


class Clip:
    """What a file holds: its frames (RGB), their times, rate, size and audio."""

    def __init__(self, path: Path) -> None:
        with av.open(str(path)) as container:
            video = container.streams.video[0]
            self.rate = video.average_rate
            self.size = (video.codec_context.width, video.codec_context.height)
            self.audio = (
                container.streams.audio[0].codec_context.name if container.streams.audio else None
            )
            frames = list(container.decode(video=0))
        self.times = [float(frame.time) for frame in frames]
        self.rgb = [frame.to_ndarray(format="rgb24") for frame in frames]
        with av.open(str(path)) as container:
            self.sound = (
                sum(frame.samples for frame in container.decode(audio=0)) / 48_000
                if container.streams.audio
                else 0.0
            )


def transform(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str]:
    """`livemorph transform ARGS` in this process: its exit status and stderr."""
    status = main(["transform", *map(str, args)])
    return status, capsys.readouterr().err


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_clip(tmp_path / "clip.mp4")


def test_the_output_keeps_the_clips_frames_size_and_sound(
    clip: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out.mp4"
    status, err = transform(
        capsys, clip, out, "--model", "mirage", "--prompt", "anime", "--engine", "grade"
    )
    assert status == 0, err
    source, result = Clip(clip), Clip(out)
    assert len(result.rgb) == len(source.rgb) == 50
    assert result.times == source.times  # each frame at its own timestamp: 0 to 1.96 s
    assert result.rate == 25 and result.size == SIZE
    assert result.audio == "aac" and result.sound == pytest.approx(2.0, abs=0.05)
    changed = [mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)]
    assert min(changed) > 8, "the picture was not restyled"
    assert f"wrote {out}: 50 frames" in err.splitlines()[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a hidden file left"


def test_other_sound_is_encoded_to_aac_and_size_is_asked_for(tmp_path: Path, capsys) -> None:
    clip = make_clip(tmp_path / "clip.mkv", audio="libopus")
    out = tmp_path / "small.mp4"
    status, err = transform(
        capsys,
        clip,
        out,
        "--model",
        "mirage",
        "--prompt",
        "ink",
        "--engine",
        "grade",
        "--size",
        "160x88",
    )
    assert status == 0, err
    result = Clip(out)
    assert result.size == (160, 88) and len(result.rgb) == 50
    assert result.audio == "aac" and result.sound == pytest.approx(2.0, abs=0.05)


def test_a_clip_without_sound_stays_silent(tmp_path: Path, capsys) -> None:
    clip = make_clip(tmp_path / "mute.mp4", seconds=0.4, audio=None)
    out = tmp_path / "out.mov"
    status, err = transform(
        capsys, clip, out, "--model", "mirage", "--prompt", "ink", "--engine", "passthrough"
    )
    assert status == 0, err
    result = Clip(out)
    assert result.audio is None and len(result.rgb) == 10


def test_a_timed_prompt_changes_the_picture_from_its_time_on(
    clip: Path, tmp_path: Path, capsys
) -> None:
    steady, changing = tmp_path / "steady.mp4", tmp_path / "changing.mp4"
    common = ("--model", "mirage", "--engine", "grade")
    assert transform(capsys, clip, steady, "--prompt", "anime", *common)[0] == 0
    status, err = transform(
        capsys, clip, changing, "--prompt", "oil painting@1", "--prompt", "anime@0", *common
    )
    assert status == 0, err
    before, after = Clip(steady), Clip(changing)
    differences = [mean_abs_diff(a, b) for a, b in zip(before.rgb, after.rgb, strict=True)]
    first = before.times.index(1.0)  # frame 25: the first at or after 1 s
    assert max(differences[:first]) < 2, "the first prompt's frames should match"
    assert min(differences[first:]) > 8, "the frames from 1 s on should show the new prompt"


def test_a_reference_image_restyles_the_clip(clip: Path, tmp_path: Path, capsys) -> None:
    image = tmp_path / "coffee.png"
    Image.fromarray(data.coffee()).save(image)
    plain, styled = tmp_path / "plain.mp4", tmp_path / "styled.mp4"
    common = ("--model", "mirage", "--engine", "grade", "--prompt", "anime")
    assert transform(capsys, clip, plain, *common)[0] == 0
    status, err = transform(capsys, clip, styled, *common, "--image", image)
    assert status == 0, err
    differences = [
        mean_abs_diff(a, b) for a, b in zip(Clip(plain).rgb, Clip(styled).rgb, strict=True)
    ]
    assert min(differences) > 5, "the image's colours should show in every frame"


def test_the_neural_engine_restyles_a_clip(tmp_path: Path, capsys) -> None:
    """The engine a session of mirage uses by default, on the CPU: a short clip."""
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0)
    out = tmp_path / "anime.mp4"
    status, err = transform(
        capsys,
        clip,
        out,
        "--model",
        "mirage",
        "--prompt",
        "anime@0",
        "--prompt",
        "pencil sketch@0.6",
    )
    assert status == 0, err
    source, result = Clip(clip), Clip(out)
    assert len(result.rgb) == 25 and result.size == SIZE and result.audio == "aac"
    assert min(mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)) > 8
    # the look changes at 0.6 s: more between the two prompts than within either
    change = 15  # frame 15 is at 0.6 s
    within = mean_abs_diff(result.rgb[change - 3], result.rgb[change - 1])
    across = mean_abs_diff(result.rgb[change - 1], result.rgb[change + 1])
    assert across > 2 * within, (across, within)


@pytest.mark.parametrize(
    "case",
    [
        "not a video",
        "no video stream",
        "unwritable output",
        "missing input",
        "unknown model",
        "avatar model",
        "bad size",
        "odd size",
        "bad time",
        "negative time",
        "two prompts at once",
        "bad output suffix",
        "unknown engine",
        "refused prompt",
        "missing image",
        "not an image",
    ],
)
def test_bad_input_is_one_line_and_exit_2(case: str, clip: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("not a video at all\n" * 100)
    out = tmp_path / "out.mp4"
    args: list[str | Path] = [
        clip,
        out,
        "--model",
        "mirage",
        "--prompt",
        "anime",
        "--engine",
        "grade",
    ]
    match case:
        case "not a video":
            args[0] = text
        case "no video stream":
            args[0] = make_clip(tmp_path / "sound.m4a", video=False)
        case "unwritable output":
            out = tmp_path / "no such folder" / "out.mp4"
            args[1] = out
        case "missing input":
            args[0] = tmp_path / "gone.mp4"
        case "unknown model":
            args[3] = "warp_drive"
        case "avatar model":
            args[3] = "live_avatar"
        case "bad size":
            args += ["--size", "big"]
        case "odd size":
            args += ["--size", "321x176"]
        case "bad time":
            args[5] = "anime@soon"
        case "negative time":
            args[5] = "anime@-1"
        case "two prompts at once":
            args += ["--prompt", "ink@0"]
        case "missing image":
            args += ["--image", tmp_path / "gone.png"]
        case "not an image":
            args += ["--image", text]
        case "refused prompt":
            args += ["--prompt", "gory horror@1"]  # the policy's, as in a session
        case "unknown engine":
            args[7] = "warp"
        case "bad output suffix":
            out = tmp_path / "out.gif"
            args[1] = out
    status, err = transform(capsys, *args)
    assert status == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("livemorph: ")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_ctrl_c_leaves_no_file_under_the_outputs_name(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    command = [sys.executable, "-m", "livemorph.cli", "transform", str(clip), str(out)]
    command += ["--model", "mirage", "--prompt", "anime", "--engine", "sleep:200"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        line = process.stderr.readline()  # the first progress line: frames are under way
        assert "frames" in line, line
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=60)[1]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, rest
    assert "interrupted" in rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


@pytest.mark.slow
def test_through_a_server_in_real_time(clip: Path, tmp_path: Path) -> None:
    out = tmp_path / "served.mp4"
    with serve(tmp_path / "server", "--engine", "grade") as server:
        command = [sys.executable, "-m", "livemorph.cli", "transform", str(clip), str(out)]
        command += ["--realtime"]  # the server takes jobs, which --server would submit
        result = subprocess.run(
            [*command, "--model", "mirage", "--prompt", "anime", "--server", server.base_url],
            capture_output=True,
            text=True,
            env={**os.environ, "LIVEMORPH_API_KEY": server.api_key},
            timeout=90,
        )
    assert result.returncode == 0, result.stderr
    source, served = Clip(clip), Clip(out)
    assert served.times == source.times and served.size == SIZE and served.rate == 25
    assert served.audio == "aac" and served.sound == pytest.approx(2.0, abs=0.05)
    assert min(mean_abs_diff(a, b) for a, b in zip(source.rgb, served.rgb, strict=True)) > 8
    assert "latency" in result.stderr.splitlines()[-1]
    # Each slot holds the output made from its own input frame (the latency made up for):
    # the frame of a local run of the same engine it looks most like is, mostly, its own.
    local = tmp_path / "local.mp4"
    local_run = ["transform", str(clip), str(local), "--model", "mirage", "--prompt", "anime"]
    assert main([*local_run, "--engine", "grade"]) == 0
    here = Clip(local).rgb
    offsets = sorted(
        min(range(len(here)), key=lambda j: mean_abs_diff(frame, here[j])) - index
        for index, frame in enumerate(served.rgb)
    )
    assert abs(offsets[len(offsets) // 2]) <= 1, offsets


def test_prompts_and_sizes_are_read_strictly() -> None:
    prompts = parse_prompts(["oil painting@3.5", "anime", "mail@home@1"])
    assert [(p.at, p.text) for p in prompts] == [
        (0, "anime"),
        (1, "mail@home"),
        (3.5, "oil painting"),
    ]
    assert parse_size("1280x704") == (1280, 704)
    for bad in ("x", "0x0", "1280", "1281x704", "9000x704"):
        with pytest.raises(TransformError):
            parse_size(bad)


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    now = [0.0]
    terminal, log = io.StringIO(), io.StringIO()
    bar = Progress(100, terminal, interactive=True, clock=lambda: now[0])
    plain = Progress(100, log, interactive=False, clock=lambda: now[0])
    for done in range(1, 101):
        now[0] = done / 20  # 20 frames a second
        bar.update(done)
        plain.update(done)
    bar.close()
    assert terminal.getvalue().startswith("\r[") and terminal.getvalue().endswith("\n")
    assert "100/100 frames (100%), 20.0 fps, 0:00 left" in terminal.getvalue()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and "\r" not in log.getvalue()
    assert lines[5] == "livemorph: 50/100 frames (50%), 20.0 fps, 0:02 left"
