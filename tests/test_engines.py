"""The CPU engines: output depends on prompt and reference image, measurably."""

from __future__ import annotations

import numpy as np
from av import VideoFrame

from livemorph.engines.base import Controls
from livemorph.engines.grade import Grade, GradeEngine
from livemorph.engines.passthrough import PassthroughEngine
from livemorph.engines.registry import EngineRegistry
from livemorph.models import CATALOG, UnknownModelError
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
