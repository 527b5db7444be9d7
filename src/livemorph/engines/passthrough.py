"""The identity engine: output is the camera, fitted to the model's size."""

from __future__ import annotations

import time

from av import VideoFrame

from ..media.frames import fit_frame
from ..models import ModelSpec
from .base import Controls, Engine, EngineSession


class PassthroughSession(EngineSession):
    def configure(self, controls: Controls) -> None:
        pass

    def transform(self, frame: VideoFrame) -> VideoFrame:
        return fit_frame(frame, self.spec.width, self.spec.height)


class PassthroughEngine(Engine):
    name = "passthrough"

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return PassthroughSession(spec)


class SleepSession(PassthroughSession):
    def __init__(self, spec: ModelSpec, delay: float) -> None:
        super().__init__(spec)
        self._delay = delay

    def transform(self, frame: VideoFrame) -> VideoFrame:
        time.sleep(self._delay)
        return super().transform(frame)


class SleepEngine(Engine):
    """Passthrough that takes `ms` milliseconds per frame, to emulate a slow model.

    For benchmarks and load tests (`--engine sleep:120`): it shows what the pipeline does
    when the engine cannot keep up with the camera, without burning CPU.
    """

    name = "sleep"

    def __init__(self, ms: str = "100") -> None:
        self.delay = float(ms) / 1000.0
        if not 0 <= self.delay <= 10:
            raise ValueError("sleep engine takes 0 to 10000 ms")

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return SleepSession(spec, self.delay)
