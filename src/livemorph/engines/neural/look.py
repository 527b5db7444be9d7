"""What a prompt resolves to: a blend of the built-in styles, a colour grade and effects.

The text side (`styles.py`) turns prompts into a `Look`; the image side (`engine.py`) runs
the networks and applies it. Keeping the hand-off a plain value keeps the two apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .effects import Effects

NUM_STYLES = 26


@dataclass(frozen=True, slots=True)
class Grade:
    """A colour grade applied to the stylised image (RGB floats in 0..1)."""

    saturation: float = 1.0  # 1 keeps the colours; 0 is grey, 1.5 vivid
    contrast: float = 1.0  # around mid-grey
    brightness: float = 0.0  # added, -1..1
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # per-channel gain


@dataclass(frozen=True, slots=True)
class Look:
    """How to render one prompt; equal prompts give equal looks."""

    #: Normalised weights over the 26 built-in styles of the multi-style network.
    weights: np.ndarray = field(repr=False)
    #: How much of the stylised image to show over the camera picture (0..1).
    strength: float = 1.0
    grade: Grade = Grade()
    #: Image operations beside the networks (line art, materials ...); all off by default.
    effects: Effects = field(default_factory=Effects)
    #: The catalog entry the prompt matched, e.g. "anime".
    name: str = ""
    #: The fuller description the engine used (the "enhanced" prompt).
    description: str = ""

    def __post_init__(self) -> None:
        if self.weights.shape != (NUM_STYLES,):
            raise ValueError(f"a look needs {NUM_STYLES} style weights")
