"""A listening engine that draws what it hears: the portrait, dimmed in silence, lit by the
voice's loudness.

It is to the avatar what `grade` is to the restyle models: cheap, exact and easy to read
from the frames, so the tests and `--avatar-engine meter` can check the audio path (the
clock, the client's audio reaching the engine, the delayed audio going back) apart from
the avatar's animation. Brightness follows the RMS of the last frame interval of audio
heard: silence shows the portrait at a quarter of its brightness, full-scale speech at all
of it.
"""

from __future__ import annotations

import threading

import numpy as np
from av import VideoFrame

from ..media.frames import center_crop
from ..models import ModelSpec
from .base import AUDIO_RATE, Controls, Engine, EngineRefused, EngineSession

#: Says "not allowed" so that the published clients do not retry: only a portrait helps.
NO_PORTRAIT = (
    "live_avatar needs a portrait: a session without one is not allowed;"
    " send set_image with image_data"
)
#: Brightness in silence, and the RMS (float samples) that lights the portrait fully.
FLOOR, FULL_RMS = 0.25, 0.2


class MeterSession(EngineSession):
    listens = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._lock = threading.Lock()
        self._heard: list[tuple[np.ndarray, float]] = []
        self._portrait: VideoFrame | None = None

    def configure(self, controls: Controls) -> None:
        if controls.image is None:
            raise EngineRefused(NO_PORTRAIT)
        rgb = center_crop(controls.image[..., :3], self.spec.width / self.spec.height)
        self._portrait = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")

    def hear(self, samples: np.ndarray, until: float) -> None:
        with self._lock:
            self._heard.append((samples, until))
            keep = max(0.0, until - 1.0)
            self._heard = [(s, t) for s, t in self._heard if t >= keep]

    def level(self, until: float) -> float:
        """RMS of the audio heard in the frame interval up to `until`."""
        start = until - 1.0 / self.spec.fps
        with self._lock:
            recent = [s for s, t in self._heard if start < t <= until]
        if not recent:
            return 0.0
        samples = np.concatenate(recent)[-int(AUDIO_RATE / self.spec.fps) :]
        return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2)))

    def transform(self, frame: VideoFrame) -> VideoFrame:
        if self._portrait is None:
            raise EngineRefused(NO_PORTRAIT)
        gain = FLOOR + (1.0 - FLOOR) * min(1.0, self.level(frame.time or 0.0) / FULL_RMS)
        rgb = self._portrait.reformat(self.spec.width, self.spec.height).to_ndarray(format="rgb24")
        lit = (rgb.astype(np.float32) * gain).astype(np.uint8)
        return VideoFrame.from_ndarray(lit, format="rgb24").reformat(format="yuv420p")


class MeterEngine(Engine):
    name = "meter"

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return MeterSession(spec)
