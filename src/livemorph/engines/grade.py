"""A cheap, real CPU transform: colour grading driven by the prompt and reference image.

It is the fallback when no neural engine is available, and the engine the protocol
tests use: every prompt maps (deterministically, by hash) to its own grade, and a
reference image lends its colour statistics (mean and spread of Y, U, V: a Reinhard-style
transfer) while the prompt keeps setting the tone, so control visibly changes the output.
All work is 256-entry lookup tables applied to the yuv420p planes: a few milliseconds at
1280x704.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from av import VideoFrame

from ..media.frames import fit_frame, frame_from_yuv, yuv_planes
from ..models import ModelSpec
from .base import Controls, Engine, EngineSession

_RAMP = np.arange(256, dtype=np.float32)


@dataclass(frozen=True, slots=True)
class Grade:
    """A colour grade: contrast and posterisation on luma, tint and saturation on chroma."""

    contrast: float = 1.0
    levels: int = 0
    saturation: float = 1.0
    tint_u: float = 0.0
    tint_v: float = 0.0

    @classmethod
    def from_prompt(cls, prompt: str) -> Grade:
        """The same text always gives the same grade; different texts, different grades."""
        normalized = " ".join(prompt.lower().split())
        digest = hashlib.sha256(normalized.encode()).digest()
        unit = [b / 255.0 for b in digest[:5]]
        angle = unit[0] * 2.0 * math.pi
        strength = 18.0 + unit[1] * 30.0
        return cls(
            contrast=0.85 + unit[2] * 0.6,
            levels=(0, 5, 7, 10)[digest[5] % 4],
            saturation=0.5 + unit[3] * 1.3,
            tint_u=strength * math.cos(angle),
            tint_v=strength * math.sin(angle),
        )

    def describe(self) -> str:
        levels = f", posterised to {self.levels} levels" if self.levels else ""
        return (
            f"colour grade: contrast {self.contrast:.2f}, saturation {self.saturation:.2f}, "
            f"tint ({self.tint_u:+.0f} U, {self.tint_v:+.0f} V){levels}"
        )

    def luts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        y = (_RAMP - 128.0) * self.contrast + 128.0
        if self.levels:
            step = 255.0 / (self.levels - 1)
            y = np.round(np.clip(y, 0, 255) / step) * step
        u = (_RAMP - 128.0) * self.saturation + 128.0 + self.tint_u
        v = (_RAMP - 128.0) * self.saturation + 128.0 + self.tint_v
        return tuple(np.clip(c, 0, 255).astype(np.uint8) for c in (y, u, v))


def rgb_to_yuv_stats(image: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of BT.601 Y, U, V over an RGB image: shape (3, 2)."""
    rgb = image[::4, ::4].reshape(-1, 3).astype(np.float32)
    matrix = np.array(
        [[0.257, 0.504, 0.098], [-0.148, -0.291, 0.439], [0.439, -0.368, -0.071]],
        dtype=np.float32,
    )
    yuv = rgb @ matrix.T + np.array([16.0, 128.0, 128.0], dtype=np.float32)
    return np.stack([yuv.mean(axis=0), yuv.std(axis=0) + 1e-3], axis=1)


def _plane_stats(plane: np.ndarray) -> tuple[float, float]:
    sample = plane[::4, ::4].astype(np.float32)
    return float(sample.mean()), float(sample.std()) + 1e-3


def _transfer_lut(src: tuple[float, float], dst: np.ndarray) -> np.ndarray:
    mean, std = src
    gain = min(float(dst[1]) / std, 3.0)
    return np.clip((_RAMP - mean) * gain + float(dst[0]), 0, 255)


class GradeSession(EngineSession):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._luts: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._reference: np.ndarray | None = None
        self._description: str | None = None

    def configure(self, controls: Controls) -> None:
        self._reference = None if controls.image is None else rgb_to_yuv_stats(controls.image)
        # With an image and no prompt, the reference image alone sets the look.
        grade = None if controls.prompt is None else Grade.from_prompt(controls.prompt)
        self._luts = None if grade is None else grade.luts()
        self._description = None if grade is None else grade.describe()

    @property
    def description(self) -> str | None:
        return self._description

    def transform(self, frame: VideoFrame) -> VideoFrame:
        fitted = fit_frame(frame, self.spec.width, self.spec.height)
        if self._luts is None and self._reference is None:
            return fitted
        planes = list(yuv_planes(fitted))
        if self._reference is not None:
            for i, plane in enumerate(planes):
                lut = _transfer_lut(_plane_stats(plane), self._reference[i]).astype(np.uint8)
                planes[i] = lut[plane]
        if self._luts is not None:
            # With a reference image, the image sets the palette and the prompt only the
            # tone (contrast, posterisation); without one, the prompt sets both.
            count = 1 if self._reference is not None else 3
            for i in range(count):
                planes[i] = self._luts[i][planes[i]]
        return frame_from_yuv(*planes)


class GradeEngine(Engine):
    name = "grade"

    def open_session(self, spec: ModelSpec) -> EngineSession:
        return GradeSession(spec)
