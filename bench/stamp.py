"""A bench-only engine that keeps the latency stamp: `stamped:<engine>` wraps any camera
engine and copies the camera's top-left stamp corner into its output unchanged.

bench/latency.py times a frame from capture to arrival by the number its source stamps in
that corner (framecode.py). A restyling engine paints over it, so the e2e part of
bench/engine.py runs its engine wrapped in this one: the whole frame still goes through
the engine, so the cost measured is the full cost, and only the corner is put back after.
bench/bench_server.py adds the `stamped` factory to the registry of the server it starts; a
production server has no such engine and no switch that turns one on.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from av import VideoFrame

from livemorph.engines.base import Controls, Engine, EngineSession
from livemorph.engines.registry import ENGINE_FACTORIES
from livemorph.media.frames import fit_frame
from livemorph.models import ModelSpec

NAME = "stamped"


def _plane(frame: VideoFrame, index: int) -> np.ndarray:
    """A writable (height, width) uint8 view of one plane, without its row padding."""
    plane = frame.planes[index]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]


class StampKeepingSession(EngineSession):
    """The inner session's output, with the camera's `width` x `height` top-left corner."""

    def __init__(self, inner: EngineSession, width: int, height: int) -> None:
        if inner.listens:
            raise ValueError("the stamp is a camera's: an engine that listens has none")
        super().__init__(inner.spec)
        self.inner = inner
        self.width, self.height = width, height

    def configure(self, controls: Controls) -> None:
        self.inner.configure(controls)

    def transform(self, frame: VideoFrame) -> VideoFrame:
        output = self.inner.transform(frame)
        camera = fit_frame(frame, self.spec.width, self.spec.height)
        if output is camera:  # passthrough: the stamp is there already
            return output
        if output.format.name != "yuv420p":
            output = output.reformat(format="yuv420p")
        w, h = self.width, self.height
        for index, (pw, ph) in enumerate([(w, h), (w // 2, h // 2), (w // 2, h // 2)]):
            _plane(output, index)[:ph, :pw] = _plane(camera, index)[:ph, :pw]
        return output

    @property
    def description(self) -> str | None:
        return self.inner.description

    def close(self) -> None:
        self.inner.close()


class StampKeepingEngine(Engine):
    """Wraps `inner`: its sessions keep the camera's `width` x `height` top-left corner."""

    name = NAME

    def __init__(self, inner: Engine, width: int, height: int) -> None:
        self.inner = inner
        self.width, self.height = width, height

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return StampKeepingSession(self.inner.open_session(spec), self.width, self.height)

    def close(self) -> None:
        self.inner.close()


def factory(width: int, height: int) -> Callable[..., Engine]:
    """The registry factory for `stamped:<engine spec>` (`stamped` alone wraps `neural`),
    keeping a `width` x `height` corner."""

    def stamped(inner: str = "neural") -> Engine:
        name, _, argument = inner.partition(":")
        if name == NAME or name not in ENGINE_FACTORIES:
            raise ValueError(f"stamped: cannot wrap engine {inner!r}")
        engine = ENGINE_FACTORIES[name](*([argument] if argument else []))
        return StampKeepingEngine(engine, width, height)

    return stamped
