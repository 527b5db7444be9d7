"""The diffusion engine on tiny Stable Diffusion pipelines built here (tests/tiny_diffusion.py),
loaded through the engine's real loading code, on the CPU: in process, and through a real
server and the SDK over WebRTC."""

from __future__ import annotations

import asyncio
import fractions
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from av import VideoFrame
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from livemorph import create_client, models
from livemorph.engines.base import Controls, EngineRefused
from livemorph.engines.diffusion import DiffusionLoadError, DiffusionOptions, require_runtime
from livemorph.engines.registry import EngineLoadError, EngineRegistry
from livemorph.media.frames import yuv_planes
from livemorph.models import CATALOG
from livemorph.testing import LiveServer, serve
from tests.media import CLOCK_RATE, FrameSink, mean_abs_diff, photo
from tests.support import eventually

if importlib.util.find_spec("diffusers") is None or importlib.util.find_spec("torch") is None:
    message = "the diffusion extra is not installed: pip install -e '.[test]'"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=True)

import torch

from livemorph.engines.diffusion.engine import Batcher, yuv420
from tests.tiny_diffusion import build_tiny_ip_adapter, build_tiny_pipeline, build_tiny_taesd

SPEC = CATALOG["mirage"]
#: Few threads: CI has two cores, and the server subprocess needs its own.
THREADS = 1


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(THREADS)
    root = tmp_path_factory.mktemp("diffusion")
    return build_tiny_pipeline(root / "pipeline"), build_tiny_taesd(root / "taesd")


@pytest.fixture(scope="module")
def engine(weights):
    """The engine as the server loads it: through the registry, from the folder."""
    registry = EngineRegistry(f"diffusion:model={weights[0]},threads={THREADS},stream=on")
    registry.preload()
    yield registry.resolve("mirage")[1]
    registry.close()


def camera_frame(rgb: np.ndarray) -> VideoFrame:
    return VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")


def run(session, rgb: np.ndarray) -> np.ndarray:
    out = session.transform(camera_frame(rgb))
    assert (out.width, out.height) == (SPEC.width, SPEC.height)
    return out.to_ndarray(format="rgb24")


# -- options and load errors, no weights needed ------------------------------------------


def test_options_parse_and_refuse_plainly() -> None:
    options = DiffusionOptions.parse("model=/w/sd-turbo, steps=1,size=512x512,strength=0.4")
    assert options.model == Path("/w/sd-turbo") and options.steps == 1
    assert options.size == (512, 512) and options.strength == 0.4 and options.cfg == "self"
    for spec, words in (
        ("steps=2", "needs a model folder"),
        ("model=/w,steps=0", "steps takes 1 to 8"),
        ("model=/w,size=512", "WIDTHxHEIGHT"),
        ("model=/w,cfg=maybe", "cfg takes one of none, self, full"),
        ("model=/w,turbo=1", "unknown diffusion engine option 'turbo'"),
    ):
        with pytest.raises(ValueError, match=words):
            DiffusionOptions.parse(spec)


def test_without_the_extra_the_error_says_what_to_install(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name)
    )
    with pytest.raises(DiffusionLoadError, match=r"pip install 'livemorph\[diffusion\]'"):
        require_runtime()
    with pytest.raises(
        EngineLoadError, match=r"the engine diffusion cannot start: .*needs diffus"
    ) as info:
        EngineRegistry("diffusion:model=/nowhere").preload()
    assert isinstance(info.value.__cause__, DiffusionLoadError)


def test_missing_or_broken_model_folders_fail_at_load(tmp_path, weights) -> None:
    def load(folder: Path | str) -> str:
        with pytest.raises(EngineLoadError) as error:
            EngineRegistry(f"diffusion:model={folder},threads={THREADS}").preload()
        assert isinstance(error.value.__cause__, DiffusionLoadError)
        return str(error.value)

    assert "does not exist" in load(tmp_path / "absent")
    assert "no model_index.json" in load(tmp_path)
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(weights[0]), str(broken)], check=True)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    assert f"could not load the diffusers pipeline in {broken}" in load(broken)
    subprocess.run(["rm", "-r", str(broken / "unet")], check=True)
    assert "model_index.json lists unet, but the folder is missing" in load(broken)


# -- the engine in process -----------------------------------------------------------------


def test_frames_at_the_model_size_and_prompts_change_them(engine) -> None:
    camera = photo(640, 360)  # 16:9 into the model's 1280x704: cropped, then the working size
    session = engine.open_session(SPEC)
    try:
        assert session.size[0] > session.size[1], "the working size keeps the output's aspect"
        session.configure(Controls())
        assert mean_abs_diff(run(session, camera), photo(1280, 704)) < 12, "passthrough"
        session.configure(Controls(prompt="a marble statue"))
        statue = run(session, camera)
        assert mean_abs_diff(statue, photo(1280, 704)) > 8
        session.configure(Controls(prompt="a cartoon character"))
        cartoon = run(session, camera)
        assert mean_abs_diff(cartoon, statue) > 1
        session.configure(Controls(prompt="a marble statue"))
        assert mean_abs_diff(run(session, camera), statue) < 0.5, "the same prompt, the same look"
    finally:
        session.close()


def test_a_still_camera_gives_a_still_picture_and_is_skipped(engine) -> None:
    camera = photo(1280, 704)
    session = engine.open_session(SPEC)
    try:
        session.configure(Controls(prompt="a marble statue"))
        outputs = [run(session, camera) for _ in range(12)]
        assert session.skipped >= 6, "identical frames are skipped (10 in a row at most)"
        assert session.frames + session.skipped == 12
        assert max(mean_abs_diff(a, b) for a, b in itertools.pairwise(outputs)) < 0.5
        moved = camera.copy()
        moved[:, :640] = camera[:, 640:]  # half the picture changes
        before = session.skipped
        run(session, moved)  # stream batch: the frame in flight before it comes out first
        changed = run(session, moved)  # alike, but not skipped before the stream is flushed
        assert session.skipped == before and mean_abs_diff(changed, outputs[-1]) > 1
    finally:
        session.close()


def test_image_prompts_are_refused_without_an_ip_adapter(engine) -> None:
    session = engine.open_session(SPEC)
    try:
        with pytest.raises(EngineRefused, match="not allowed"):
            session.configure(Controls(prompt="x", image=np.zeros((8, 8, 3), np.uint8)))
    finally:
        session.close()


def test_reference_images_steer_the_picture_through_an_ip_adapter(weights, tmp_path) -> None:
    adapter, encoder = build_tiny_ip_adapter(tmp_path / "ip-adapter", weights[0])
    registry = EngineRegistry(
        f"diffusion:model={weights[0]},ip_adapter={adapter},image_encoder={encoder},"
        f"threads={THREADS},similarity=0"
    )
    registry.preload()
    session = registry.resolve("mirage")[1].open_session(SPEC)
    camera = photo(1280, 704)
    red, blue = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = blue[..., 2] = 220
    try:
        session.configure(Controls(prompt="a marble statue"))
        plain = run(session, camera)
        session.configure(Controls(prompt="a marble statue", image=red))
        reddish = run(session, camera)
        session.configure(Controls(prompt="a marble statue", image=blue))
        bluish = run(session, camera)
        assert mean_abs_diff(reddish, plain) > 2 and mean_abs_diff(bluish, reddish) > 2
        session.configure(Controls(prompt="a marble statue"))
        assert mean_abs_diff(run(session, camera), plain) < 0.5, "no image: as before"
    finally:
        session.close()
        registry.close()


def test_sessions_free_their_memory_when_they_end(engine) -> None:
    sessions = [engine.open_session(SPEC) for _ in range(2)]
    for session in sessions:
        session.configure(Controls(prompt="a marble statue"))
        run(session, photo(1280, 704))
    assert engine.held_bytes() > 0
    for session in sessions:
        session.close()
    assert engine.held_bytes() == 0
    assert not engine._cache, "the prompt cache empties with the last session"


def test_calls_that_meet_share_one_unet_batch() -> None:
    """While one call runs, the calls arriving queue and then go as one batch, each caller
    getting its own rows back; a call of other shapes waits for a batch of its own."""
    gate, runs = threading.Event(), []

    def unet(x, t, embeds, images):
        runs.append(x.shape[0])
        if len(runs) == 1:
            assert gate.wait(10)
        return x * 2

    batcher = Batcher(unet, limit=4)
    inputs = [torch.full((1, 4, 2, 2), float(i)) for i in range(3)] + [torch.ones(1, 4, 3, 3)]
    results: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        x = inputs[i]
        results[i] = batcher(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 8), None)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    threads[0].start()
    while not runs:
        time.sleep(0.01)
    for thread in threads[1:]:
        thread.start()
    while len(batcher._queue) < 3:
        time.sleep(0.01)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert sorted(runs) == [1, 1, 2], "the first alone, two alike together, the odd one alone"
    for i, x in enumerate(inputs):
        assert torch.equal(results[i], x * 2)


def test_concurrent_sessions_get_their_own_pictures(engine) -> None:
    sessions = [engine.open_session(SPEC) for _ in range(3)]
    for session in sessions:
        session.configure(Controls(prompt="a marble statue"))
    frames = [photo(1280, 704)[:, ::-1].copy(), photo(1280, 704)]
    alone = run(sessions[2], frames[0])

    def stream(session) -> None:
        for i in range(7):  # alternate pictures: nothing is skipped
            run(session, frames[i % 2])

    threads = [threading.Thread(target=stream, args=(s,)) for s in sessions[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run(sessions[0], frames[0])  # flushes the stream: the frame in flight is this one
    assert mean_abs_diff(run(sessions[0], frames[0]), alone) < 0.5
    for session in sessions:
        session.close()


def test_tiny_autoencoder_residual_cfg_and_sequential_steps(weights) -> None:
    """The other paths: TAESD for the VAE, residual and full guidance, steps one by one."""
    for options in ("vae={taesd},guidance=2,cfg=self", "guidance=2,cfg=full,stream=off,steps=3"):
        spec = options.format(taesd=weights[1])
        registry = EngineRegistry(f"diffusion:model={weights[0]},threads={THREADS},{spec}")
        registry.preload()
        engine = registry.resolve("mirage")[1]
        session = engine.open_session(SPEC)
        session.configure(Controls(prompt="a marble statue"))
        first = run(session, photo(1280, 704))
        assert first.shape == (SPEC.height, SPEC.width, 3) and first.std() > 1
        session.close()
        registry.close()


def test_output_planes_made_on_a_device_match_swscale() -> None:
    """On a GPU the output's yuv420p planes are made there (on the CPU, swscale's are):
    the same BT.601 conversion, within rounding and swscale's chroma filter."""
    rgb = photo(1280, 704)
    reference = yuv_planes(VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p"))
    planes = yuv420(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float())
    for ours, theirs in zip(planes, reference, strict=True):
        assert ours.shape == theirs.shape
        assert mean_abs_diff(ours, theirs) < 0.2
        assert np.abs(ours.astype(np.int16) - theirs).max() <= 4


# -- through a real server -----------------------------------------------------------------


class StillTrack(MediaStreamTrack):
    """A camera on a tripod: the same photo, frame after frame."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float = 25) -> None:
        super().__init__()
        self._rgb = photo(width, height)
        self._interval = 1.0 / fps
        self._count = 0
        self._start: float | None = None

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        self._start = now if self._start is None else self._start
        due = self._start + self._count * self._interval
        if due > now:
            await asyncio.sleep(due - now)
        frame = VideoFrame.from_ndarray(self._rgb, format="rgb24")
        frame.pts = int(self._count * self._interval * CLOCK_RATE)
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        self._count += 1
        return frame


@pytest.fixture(scope="module")
def diffusion_server(weights, tmp_path_factory):
    with serve(
        tmp_path_factory.mktemp("diffusion-server"),
        "--engine",
        f"diffusion:model={weights[0]},threads={THREADS}",
    ) as live:
        yield live


def closed_sessions(server: LiveServer) -> list[str]:
    return [line for line in server.log.splitlines() if "diffusion session closed" in line]


@pytest.mark.slow
async def test_a_server_session_streams_model_sized_frames_that_follow_the_prompt(
    diffusion_server,
) -> None:
    server = diffusion_server
    async with httpx.AsyncClient() as http:
        listed = (await http.get(f"{server.base_url}/v1/models")).json()
    engines = {model["name"]: model["engine"] for model in listed}
    assert engines["mirage"] == "diffusion", "named, without the server's paths"
    assert "on cpu (float32)" in server.log, "the device and dtype are logged"

    model = models.realtime("mirage")
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        rt = await client.realtime.connect(
            StillTrack(640, 352, fps=model.fps),
            model=model,
            initial_state={"prompt": {"text": "a marble statue", "enhance": False}},
        )
        output = FrameSink(rt.video_track)
        try:
            statue = await output.fresh(10)
            assert statue.shape == (model.height, model.width, 3)
            again = await output.fresh()
            await rt.set_prompt("a cartoon character", enhance=False)
            cartoon = await output.fresh()
            # Frames of a still camera differ by the codec's noise alone: the prompt, more.
            assert mean_abs_diff(cartoon, statue) > 2 * mean_abs_diff(again, statue)
        finally:
            await output.close()
            await rt.disconnect()
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0
    await eventually(lambda: len(closed_sessions(server)) >= 2)  # the warm-up's and this one
    assert closed_sessions(server)[-1].endswith("0 open, 0 bytes held by sessions")


@pytest.mark.slow
async def test_a_still_camera_is_skipped_by_the_similarity_filter(diffusion_server) -> None:
    server = diffusion_server
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        before = len(closed_sessions(server))
        rt = await client.realtime.connect(
            StillTrack(640, 352),
            model="mirage",
            initial_state={"prompt": {"text": "a marble statue", "enhance": False}},
        )
        output = FrameSink(rt.video_track)
        try:
            await output.fresh(25)
        finally:
            await output.close()
            await rt.disconnect()
    await eventually(lambda: len(closed_sessions(server)) > before)
    line = closed_sessions(server)[-1]
    frames = int(line.split(" after ")[1].split()[0])
    skipped = int(line.split("frames (")[1].split()[0])
    assert skipped > frames, f"most still frames are skipped: {line}"


@pytest.mark.slow
def test_the_server_refuses_to_start_on_a_missing_or_broken_model(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, words in (
        (tmp_path / "absent", "does not exist"),
        (tmp_path / "empty", "no model_index.json"),
    ):
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "livemorph.cli",
                "serve",
                "--data-dir",
                str(tmp_path),
                "--port",
                "0",
                "--engine",
                f"diffusion:model={folder}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 1
        assert "livemorph: the engine diffusion" in result.stderr and words in result.stderr


def test_the_engine_is_full_at_its_session_limit(weights) -> None:
    registry = EngineRegistry(f"diffusion:model={weights[0]},threads={THREADS},sessions=2")
    try:
        engine = registry.resolve("mirage")[1]
        assert not engine.full()
        first = engine.open_session(SPEC)
        assert not engine.full()
        second = engine.open_session(SPEC)
        assert engine.full()
        second.close()
        assert not engine.full(), "a session that ends makes room"
        first.close()
    finally:
        registry.close()


@pytest.mark.slow
async def test_sessions_past_the_engines_limit_get_the_at_capacity_error(weights, tmp_path) -> None:
    spec = f"diffusion:model={weights[0]},threads={THREADS},sessions=1"
    with serve(tmp_path / "server", "--engine", spec) as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with connect(url) as first:
            assert json.loads(await first.recv())["type"] == "session_id"
            async with connect(url) as second:
                said = json.loads(await second.recv())
                with pytest.raises(ConnectionClosed) as closed:
                    await second.recv()
            assert said == {"type": "error", "error": "Server at capacity, try again shortly"}
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            await first.send(json.dumps({"type": "prompt", "prompt": "still served"}))
            ack = json.loads(await first.recv())
            assert ack["type"] == "prompt_ack" and ack["success"], ack
        assert await asyncio.to_thread(server.wait_sessions, 0) == 0
        async with connect(url) as third:  # the first has gone: there is room again
            assert json.loads(await third.recv())["type"] == "session_id"
