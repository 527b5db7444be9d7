"""The life between words: blinks, the head's drift, nods, and easing between expressions.

Everything is a function of the frame's time and a seed, so a session replays exactly
given the same seed, audio and frame times.

- Blinks come every 2 to 6 seconds (uniformly at random), now and then as a double blink;
  each closes the lids in 50 ms, holds 30 ms and opens over 80 ms, about 160 ms in all.
- The head drifts on slow noise (a few incommensurate sines per axis, 0.05 to 0.4 Hz):
  a degree or so of tilt and a few hundredths of an eye distance of shift, more while
  the person speaks, scaled by the expression's energy; it breathes (a slow rise and
  fall) and dips a little on loud syllables.
- Nods: with an expression's `nod` above zero, a nod (the chin down and back, 0.6 s) comes
  every few seconds, sooner the stronger `nod` is, and only while speaking or shortly
  after, as a listener or talker nods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .animator import Expression, Pose
from .speech import Mouth

BLINK_EVERY = (2.0, 6.0)
BLINK_CLOSE, BLINK_HOLD, BLINK_OPEN = 0.05, 0.03, 0.08
DOUBLE_BLINK = 0.12
#: Drift at full activity and energy 1: tilt (radians), shift (eye distances).
ROLL, SHIFT_X, SHIFT_Y = math.radians(1.4), 0.035, 0.02
#: Share of the drift left in silence.
IDLE_MOTION = 0.35
NOD_LENGTH = 0.6
#: Time to ease most of the way to a new expression (seconds).
EXPRESSION_TIME = 0.35


class Blinker:
    """Blink timing for one session."""

    def __init__(self, seed: int, start: float = 0.0) -> None:
        self._rng = np.random.default_rng([seed, 1])
        self._next = start + float(self._rng.uniform(0.8, 3.0))
        self._current: float | None = None

    def at(self, now: float) -> float:
        """How closed the lids are at `now`, 0 (open) to 1 (shut). Times must not go back."""
        if self._current is None and now >= self._next:
            self._current = self._next
            gap = float(self._rng.uniform(*BLINK_EVERY))
            if self._rng.uniform() < DOUBLE_BLINK:
                gap = 0.25
            self._next = self._current + gap
        if self._current is None:
            return 0.0
        t = now - self._current
        if t < BLINK_CLOSE:
            return _ease(t / BLINK_CLOSE)
        if t < BLINK_CLOSE + BLINK_HOLD:
            return 1.0
        t -= BLINK_CLOSE + BLINK_HOLD
        if t < BLINK_OPEN:
            return 1.0 - _ease(t / BLINK_OPEN)
        self._current = None
        return self.at(now) if now >= self._next else 0.0


def _ease(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


@dataclass(slots=True)
class _Noise:
    """Smooth noise in -1..1: three sines of random frequency and phase."""

    freqs: np.ndarray
    phases: np.ndarray

    @classmethod
    def make(cls, rng: np.random.Generator) -> _Noise:
        return cls(rng.uniform(0.05, 0.4, 3), rng.uniform(0.0, 2 * math.pi, 3))

    def at(self, t: float) -> float:
        return float(np.sin(2 * math.pi * self.freqs * t + self.phases).sum() / 2.2)


class HeadMotion:
    """The head's pose over time for one session."""

    def __init__(self, seed: int, start: float = 0.0) -> None:
        rng = np.random.default_rng([seed, 2])
        self._roll, self._x, self._y = (_Noise.make(rng) for _ in range(3))
        self._nod_rng = np.random.default_rng([seed, 3])
        self._next_nod = start + float(self._nod_rng.uniform(0.5, 2.0))
        self._nod_start: float | None = None
        self._emphasis = 0.0
        self._last: float | None = None

    def at(self, now: float, mouth: Mouth, expression: Expression, motion: float = 1.0) -> Pose:
        """The pose at `now`; `motion` scales all of it (0: a still head)."""
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        energy = expression.energy * motion
        amount = energy * (IDLE_MOTION + (1.0 - IDLE_MOTION) * mouth.activity)
        # a syllable louder than the recent run of speech dips the head a touch
        emphasis = max(0.0, mouth.level - 0.5 * mouth.activity - 0.25)
        self._emphasis += (emphasis - self._emphasis) * (1.0 - math.exp(-dt / 0.15))
        breath = 0.006 * motion * math.sin(2 * math.pi * now / 4.5)
        nod = self._nod(now, expression.nod, mouth.activity) * min(1.0, 0.6 + 0.4 * energy)
        nod *= min(1.0, motion)
        return Pose(
            roll=ROLL * amount * self._roll.at(now),
            x=SHIFT_X * amount * self._x.at(now),
            y=SHIFT_Y * amount * self._y.at(now) + breath + 0.03 * energy * self._emphasis,
            nod=nod,
        )

    def _nod(self, now: float, strength: float, activity: float) -> float:
        if self._nod_start is not None:
            t = (now - self._nod_start) / NOD_LENGTH
            if t < 1.0:
                return math.sin(math.pi * t) ** 2
            self._nod_start = None
        if now >= self._next_nod:
            every = 2.0 + 4.0 * (1.0 - strength)
            self._next_nod = now + every * float(self._nod_rng.uniform(0.7, 1.3))
            if strength > 0.05 and self._nod_rng.uniform() < strength * (0.4 + 0.6 * activity):
                self._nod_start = now
        return 0.0


class ExpressionEase:
    """The expression shown, easing towards the one asked for."""

    def __init__(self, start: Expression | None = None) -> None:
        self.current = start or Expression()
        self._values = self.current.values()
        self._last: float | None = None

    def at(self, now: float, target: Expression) -> Expression:
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        goal = target.values()
        if not np.allclose(goal, self._values, atol=1e-4):
            self._values += (goal - self._values) * (1.0 - math.exp(-dt / EXPRESSION_TIME))
            self.current = Expression.from_values(self._values)
        return self.current
