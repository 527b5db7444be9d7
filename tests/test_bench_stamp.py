"""bench/stamp.py: the bench's wrapper puts the camera's latency stamp back over what the
wrapped engine painted, and leaves the rest of the engine's picture alone."""

from __future__ import annotations

import numpy as np
import pytest
from av import VideoFrame
from bench import framecode
from bench.stamp import StampKeepingEngine, StampKeepingSession, factory

from livemorph.engines.base import Controls, Engine, EngineSession
from livemorph.engines.passthrough import PassthroughEngine
from livemorph.models import CATALOG, ModelSpec

SPEC = CATALOG["mirage"]
GRAY = 77


class Painter(EngineSession):
    """Paints every frame one flat gray: a restyle that covers the stamp."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.controls: list[Controls] = []
        self.closed = False

    def configure(self, controls: Controls) -> None:
        self.controls.append(controls)

    def transform(self, frame: VideoFrame) -> VideoFrame:
        gray = np.full((self.spec.height, self.spec.width, 3), GRAY, np.uint8)
        return VideoFrame.from_ndarray(gray, format="rgb24")  # not yuv420p: the wrapper copes

    @property
    def description(self) -> str | None:
        return "flat gray"

    def close(self) -> None:
        self.closed = True


class PainterEngine(Engine):
    name = "painter"

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return Painter(spec)


def camera(value: int, width: int = SPEC.width, height: int = SPEC.height) -> VideoFrame:
    rng = np.random.default_rng(value)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    framecode.stamp(image, value)
    return VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")


def luma(frame: VideoFrame) -> np.ndarray:
    return frame.reformat(format="yuv420p").to_ndarray()[: frame.height]


def test_the_stamp_survives_the_engine_and_only_the_stamp_does() -> None:
    frame = camera(0xDEADBEEF)
    painted = Painter(SPEC).transform(frame)
    assert framecode.read_yuv(painted.reformat(format="yuv420p")) is None, "the engine covers it"
    session = StampKeepingEngine(PainterEngine(), framecode.WIDTH, framecode.HEIGHT).open_session(
        SPEC
    )
    output = session.transform(frame)
    assert framecode.read_yuv(output) == 0xDEADBEEF
    y = luma(output)
    corner = y[: framecode.HEIGHT, : framecode.WIDTH]
    assert np.array_equal(corner, luma(frame)[: framecode.HEIGHT, : framecode.WIDTH])
    outside = np.ones_like(y, bool)
    outside[: framecode.HEIGHT, : framecode.WIDTH] = False
    assert np.array_equal(y[outside], luma(painted)[outside]), "the rest is the engine's"


def test_a_camera_of_another_size_is_fitted_before_its_corner_is_copied() -> None:
    frame = camera(4242, SPEC.width // 2, SPEC.height // 2)
    session = StampKeepingEngine(PainterEngine(), framecode.WIDTH, framecode.HEIGHT).open_session(
        SPEC
    )
    output = session.transform(frame)
    assert (output.width, output.height) == (SPEC.width, SPEC.height)
    assert output.format.name == "yuv420p"


def test_the_wrapper_passes_controls_description_and_close_through() -> None:
    session = StampKeepingEngine(PainterEngine(), framecode.WIDTH, framecode.HEIGHT).open_session(
        SPEC
    )
    assert isinstance(session, StampKeepingSession)
    inner = session.inner
    assert isinstance(inner, Painter)
    session.configure(Controls(prompt="ink"))
    assert [c.prompt for c in inner.controls] == ["ink"]
    assert session.description == "flat gray"
    session.close()
    assert inner.closed


def test_the_factory_wraps_engines_by_spec() -> None:
    stamped = factory(framecode.WIDTH, framecode.HEIGHT)
    engine = stamped("passthrough")
    assert isinstance(engine, StampKeepingEngine) and isinstance(engine.inner, PassthroughEngine)
    frame = camera(7)
    assert engine.open_session(SPEC).transform(frame) is frame, "passthrough is left as is"
    for bad in ("stamped", "stamped:neural", "warp_drive"):
        with pytest.raises(ValueError, match="cannot wrap"):
            stamped(bad)
