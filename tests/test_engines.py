"""The CPU engines: output depends on prompt and reference image, measurably."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from av import VideoFrame

from livemorph.engines.base import Controls
from livemorph.engines.grade import Grade, GradeEngine
from livemorph.engines.passthrough import PassthroughEngine
from livemorph.engines.registry import EngineRegistry, parse_model_engines
from livemorph.models import CATALOG, UnknownModelError
from livemorph.testing import free_port, serve
from tests.media import mean_abs_diff, photo

SPEC = CATALOG["mirage"]


def run(session, rgb: np.ndarray) -> np.ndarray:
    out = session.transform(VideoFrame.from_ndarray(rgb, format="rgb24"))
    assert (out.width, out.height) == (SPEC.width, SPEC.height)
    return out.to_ndarray(format="rgb24")


def test_passthrough_fits_any_camera_to_the_model() -> None:
    session = PassthroughEngine().open_session(SPEC)
    camera = photo(640, 480)  # 4:3 into 1280x704: center-cropped, not stretched
    out = run(session, camera)
    assert out.shape == (704, 1280, 3)


def test_prompts_change_the_output_and_are_deterministic() -> None:
    source = photo(SPEC.width, SPEC.height)
    session = GradeEngine().open_session(SPEC)
    outputs = {}
    for prompt in ("anime", "cyberpunk neon city", "watercolor painting"):
        session.configure(Controls(prompt=prompt))
        outputs[prompt] = run(session, source)
        assert mean_abs_diff(outputs[prompt], source) > 8
    assert mean_abs_diff(outputs["anime"], outputs["cyberpunk neon city"]) > 5
    assert mean_abs_diff(outputs["anime"], outputs["watercolor painting"]) > 5
    assert Grade.from_prompt("Anime ") == Grade.from_prompt("anime")


def test_reference_image_changes_output_and_none_restores_the_prompt() -> None:
    source = photo(SPEC.width, SPEC.height)
    session = GradeEngine().open_session(SPEC)
    session.configure(Controls(prompt="anime"))
    prompt_only = run(session, source)
    reference = np.zeros((64, 64, 3), np.uint8)
    reference[..., 2] = 220  # a deep blue picture
    session.configure(Controls(prompt="anime", image=reference))
    with_image = run(session, source)
    assert mean_abs_diff(with_image, prompt_only) > 5
    session.configure(Controls(prompt="anime", image=None))
    assert mean_abs_diff(run(session, source), prompt_only) < 1.0


def test_passthrough_controls_leave_the_picture_alone() -> None:
    source = photo(SPEC.width, SPEC.height)
    session = GradeEngine().open_session(SPEC)
    session.configure(Controls())
    assert mean_abs_diff(run(session, source), source) < 3.0  # only yuv420p rounding


def test_registry_maps_models_to_engines() -> None:
    registry = EngineRegistry()
    spec, engine = registry.resolve("mirage_v2")
    assert spec.fps == 22 and engine.name == "neural"
    assert registry.resolve("lucy_2_rt")[1] is engine, "engines load once per process"
    assert registry.engine_name("live_avatar") == "avatar"
    try:
        registry.resolve("nope")
        raise AssertionError
    except UnknownModelError as exc:
        assert "model not found" in str(exc)
    assert EngineRegistry("passthrough").resolve("mirage")[1].name == "passthrough"


def test_a_forced_engine_applies_to_the_models_of_its_kind() -> None:
    """A camera engine cannot serve an avatar, nor a listening engine a camera model."""
    camera = EngineRegistry("passthrough")
    assert camera.engine_name("mirage") == "passthrough"
    assert camera.engine_name("live_avatar") == "avatar"
    listening = EngineRegistry("meter")
    assert listening.resolve("live_avatar")[1].name == "meter"
    assert listening.engine_name("mirage") == "neural"


def test_engine_specs_with_an_argument() -> None:
    engine = EngineRegistry("sleep:30").resolve("mirage")[1]
    assert engine.name == "sleep" and engine.delay == 0.03
    try:
        EngineRegistry("warp:9")
        raise AssertionError("unknown engines are refused at start")
    except ValueError as exc:
        assert "unknown engine" in str(exc)


def test_each_model_may_name_its_own_engine() -> None:
    chosen = parse_model_engines("mirage=sleep:30; mirage_v2=sleep:30 ;live_avatar=meter;")
    assert chosen == {"mirage": "sleep:30", "mirage_v2": "sleep:30", "live_avatar": "meter"}
    registry = EngineRegistry("grade", chosen)
    assert registry.engine_name("mirage") == "sleep", "a model's own engine comes first"
    assert registry.engine_name("lucy_2_rt") == "grade", "then --engine"
    assert registry.engine_name("live_avatar") == "meter"
    mirage, v2 = registry.resolve("mirage")[1], registry.resolve("mirage_v2")[1]
    assert mirage is v2, "models given one spec share one loaded engine"
    # a spec keeps its own commas, colons and equals signs
    assert parse_model_engines("mirage=neural:size=320x176,faces=0") == {
        "mirage": "neural:size=320x176,faces=0"
    }


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("mirage", "'mirage' is not MODEL=ENGINE"),
        ("mirage=", "'mirage=' is not MODEL=ENGINE"),
        ("mirag=grade", "no model 'mirag'"),
        ("mirage=grade;mirage=passthrough", "mirage is named twice"),
    ],
)
def test_bad_model_engines_are_refused_by_name(text: str, said: str) -> None:
    with pytest.raises(ValueError, match=re.escape(said)):
        parse_model_engines(text)


def test_a_model_cannot_be_given_an_engine_of_the_other_kind() -> None:
    with pytest.raises(ValueError, match="mirage cannot use meter: it listens to audio"):
        EngineRegistry(None, {"mirage": "meter"})
    with pytest.raises(ValueError, match="live_avatar cannot use grade: it transforms a camera"):
        EngineRegistry(None, {"live_avatar": "grade"})
    with pytest.raises(ValueError, match="unknown engine 'warp'"):
        EngineRegistry(None, {"mirage": "warp"})


def test_serve_gives_each_model_its_engine_and_refuses_a_bad_choice(tmp_path: Path) -> None:
    with serve(tmp_path / "ok", "--model-engines", "mirage=grade;mirage_v2=passthrough") as live:
        models = {m["name"]: m["engine"] for m in httpx.get(f"{live.base_url}/v1/models").json()}
    assert models["mirage"] == "grade" and models["mirage_v2"] == "passthrough"
    assert models["lucy_2_rt"] == "neural"
    refused = subprocess.run(
        [
            *(sys.executable, "-m", "livemorph.cli", "serve", "--data-dir", str(tmp_path / "bad")),
            *("--port", str(free_port()), "--model-engines", "mirage=meter"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        "livemorph: --model-engines: mirage cannot use meter: it listens to audio"
    ), "one line, before anything is made"
    assert not (tmp_path / "bad").exists()
