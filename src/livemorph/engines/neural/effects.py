"""Image operations that compose with the style networks: line art, cel shading, tone
curves, monochrome, paper grain and materials (stone, metal, chalk).

The networks only know their 26 painted styles; these plain operations reach the looks
they cannot (a marble statue, a charcoal drawing, clean anime line art). A `Look` carries
an `Effects` value (all off by default); each session owns an `EffectsRenderer` that the
engine calls twice per frame:

- `small` on the stylised picture at the network's size (planar float RGB), after the
  colour grade and the strength mix;
- `full` on the output frame's yuv420p planes, for what needs the full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The materials `Effects.material` may name ("" for none).
MATERIALS = ("", "stone", "marble", "metal", "bronze", "gold", "chrome", "chalk")


@dataclass(frozen=True, slots=True)
class Effects:
    """What to do to a frame besides the networks' styles; every field off by default."""

    #: Line art from the camera's luma (extended difference of Gaussians): how dark the
    #: lines are, 0 (none) .. 1 (black ink).
    line: float = 0.0
    #: Line width: the inner Gaussian's sigma in pixels of a 704-line frame.
    line_width: float = 1.0
    #: 0..1: higher keeps only the stronger edges.
    line_threshold: float = 0.5
    #: Cel shading: the number of luma bands (0: off, else 2..8).
    cel: int = 0
    #: Width of the soft step between cel bands (0: hard, 1: no steps).
    cel_softness: float = 0.25
    #: Tone curve at the network's size: an S-curve (positive: more contrast) ...
    curve: float = 0.0
    #: ... then lift, gamma and gain, each one value or one per channel (R, G, B).
    lift: tuple[float, float, float] = (0.0, 0.0, 0.0)
    gamma: tuple[float, float, float] = (1.0, 1.0, 1.0)
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: 0..1: how much colour is removed.
    monochrome: float = 0.0
    #: The colour white becomes once the effects ran (paper colour), RGB gains.
    paper_colour: tuple[float, float, float] = (1.0, 1.0, 1.0)
    #: Paper tooth: dark strokes broken by the paper's grain, 0..1.
    grain: float = 0.0
    #: Manga screentone: mid-tones as halftone dots, 0..1.
    screentone: float = 0.0
    #: A material look: one of `MATERIALS`.
    material: str = ""
    #: How much of the material shows, 0..1.
    material_strength: float = 1.0

    @property
    def active(self) -> bool:
        """Whether any effect is on (the engine skips both passes otherwise)."""
        return self != Effects()


class EffectsRenderer:
    """One session's effect buffers and textures, rebuilt when a size changes."""

    def __init__(self, output_size: tuple[int, int], network_size: tuple[int, int]) -> None:
        self.output_size = output_size
        self.network_size = network_size

    def small(self, rgb: np.ndarray, camera: np.ndarray, effects: Effects) -> None:
        """In place on the stylised picture at the network's size: planar float32
        (3, h, w) RGB in 0..1; `camera` is the camera picture at the same size."""

    def full(
        self,
        y: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        camera_y: np.ndarray,
        effects: Effects,
    ) -> None:
        """In place on the output frame's yuv420p planes (uint8: y (H, W), u and v
        (H/2, W/2)); `camera_y` is the camera's full-resolution luma (read only)."""
