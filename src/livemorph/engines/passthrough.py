"""The identity engine: output is the camera, fitted to the model's size."""

from __future__ import annotations

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
