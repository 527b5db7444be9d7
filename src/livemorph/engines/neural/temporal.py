"""Temporal stabilisation: keep the style still where the camera is still.

A feed-forward style network renders each frame on its own. Camera noise, which a viewer
never notices in the camera picture, changes the network's brush strokes from frame to
frame, so a still scene shimmers. The cure must not smear motion, so it is local: each
low-resolution output pixel is blended with the previous output pixel in proportion to how
little the camera picture changed there since the last frame. Where the camera changed by
more than `threshold` the new stylised pixel goes through untouched, so a moving object is
followed within one frame; where it changed by less (noise, compression artefacts) the
output settles towards a running average. The same rule applied to the network's input
(a noise-reducing blend of consecutive camera frames, `denoise`) removes much of the noise
before the network can turn it into texture. Both work at the network's resolution, where
they cost well under a millisecond.

On a control change (new prompt or image) call `reset`: the next frame is then the new
style alone, with no trace of the old one.
"""

from __future__ import annotations

import numpy as np

#: BT.601 luma weights for planar RGB in 0..1.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32).reshape(3, 1, 1)


def luma(planar: np.ndarray) -> np.ndarray:
    """Luma (h, w) of a planar RGB image (3, h, w) in 0..1."""
    return np.tensordot(_LUMA[:, 0, 0], planar, axes=1)


def _box3(image: np.ndarray) -> np.ndarray:
    """A 3x3 box filter (edges replicated): spreads a change over its neighbours."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + padded[1:-1] + padded[2:]
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) * np.float32(1.0 / 9.0)


class Stabiliser:
    """Per-pixel temporal blending for one stream, at the network's resolution.

    `hold` is how much of the previous frame a perfectly still pixel keeps (0: off);
    `threshold` is the camera change (luma, 0..1) at and above which a pixel is treated as
    moving and not blended at all. Between the two the weight falls off linearly.
    """

    def __init__(self, hold: float = 0.8, threshold: float = 0.04, denoise: float = 0.6) -> None:
        if not 0.0 <= hold < 1.0 or not 0.0 <= denoise < 1.0:
            raise ValueError("hold and denoise must be in [0, 1)")
        self.hold = hold
        self.denoise_hold = denoise
        self.threshold = threshold
        self._previous_camera: np.ndarray | None = None
        self._previous_input: np.ndarray | None = None
        self._previous_output: np.ndarray | None = None
        self._still: np.ndarray | None = None

    @property
    def enabled(self) -> bool:
        return self.hold > 0.0 or self.denoise_hold > 0.0

    def reset(self) -> None:
        """Forget the past: the next frame passes through as it is."""
        self._previous_camera = None
        self._previous_input = None
        self._previous_output = None
        self._still = None

    def denoise(self, camera: np.ndarray) -> np.ndarray:
        """The network's next input: `camera` (3, h, w), averaged with the past where still.

        Also measures where the camera changed, for `stabilise`; call it once per frame,
        before `stabilise`. Works in place on `camera` and returns it.
        """
        current = luma(camera)
        previous = self._previous_camera
        self._previous_camera = current
        if previous is None or previous.shape != current.shape:
            self._previous_input = camera.copy()
            self._previous_output = None
            self._still = None
            return camera
        change = _box3(np.abs(current - previous))
        still = np.clip(1.0 - change / self.threshold, 0.0, 1.0)
        self._still = still
        if self.denoise_hold > 0.0 and self._previous_input is not None:
            weight = still * np.float32(self.denoise_hold)
            camera += weight * (self._previous_input - camera)
        self._previous_input = camera.copy()
        return camera

    def stabilise(self, output: np.ndarray) -> np.ndarray:
        """Blend the stylised `output` (3, h, w) with the previous one where still, in place."""
        previous = self._previous_output
        if (
            self.hold > 0.0
            and previous is not None
            and self._still is not None
            and previous.shape == output.shape
        ):
            output += (self._still * np.float32(self.hold)) * (previous - output)
        self._previous_output = output.copy()
        return output
