"""The network's size follows the CPU, the way WebRTC's quality scaler follows the encoder.

A larger network input paints finer strokes (faces keep their features) but costs time in
proportion to its pixels, and what a machine can afford depends on its cores, its other
sessions and everything else running on it. So each session starts at the smallest size,
steps up while frames take well under their interval, and steps down as soon as they do
not. The gap between the two thresholds is wider than one step's cost ratio, so a size
that was just reached does not trip the way back; a size that had to be left is not tried
again for a while (longer after each fall), so a busy machine does not see it oscillate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

Size = tuple[int, int]

#: Network sizes for 1280x704 output, smallest first (16:9-ish, multiples of 4).
LADDER: tuple[Size, ...] = ((224, 124), (256, 140), (320, 176), (384, 212), (448, 248))

#: Step up when the next size's predicted frame time is under this share of the interval.
UP_AT = 0.6
#: Step down when the frame time is over this share of the interval.
DOWN_AT = 0.9
#: Frames (after the warm-up) a size must run before it may be left upwards, and downwards.
FRAMES_BEFORE_UP = 50
FRAMES_BEFORE_DOWN = 10
#: After falling from a size, seconds before it may be tried again (doubled on each fall).
RETRY_AFTER = 20.0
#: Weight of the newest frame in the running mean of frame times.
SMOOTHING = 0.05
#: Frames not counted after a change: the first runs at a new size set up its buffers.
WARM_UP_FRAMES = 3


class NetworkScaler:
    """Picks the next network size from how long frames take.

    `record` is called once per frame with its processing time; it returns the size the
    next frame should use when that changes, else None. Not thread-safe: one session's
    frames are processed one at a time.
    """

    def __init__(
        self,
        sizes: Sequence[Size],
        interval: float,
        *,
        frames_before_up: int = FRAMES_BEFORE_UP,
        frames_before_down: int = FRAMES_BEFORE_DOWN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sizes or interval <= 0:
            raise ValueError("a scaler needs at least one size and a positive interval")
        self.sizes = sorted(sizes, key=lambda size: size[0] * size[1])
        self.interval = interval
        self.index = 0
        self._frames_before_up = frames_before_up
        self._frames_before_down = frames_before_down
        self._clock = clock
        self._mean: float | None = None
        #: The mean frame time at the size last left (for logs).
        self.left_at: float | None = None
        self._frames = 0
        self._falls = [0] * len(self.sizes)
        self._blocked_until = [-math.inf] * len(self.sizes)

    @property
    def size(self) -> Size:
        return self.sizes[self.index]

    @property
    def mean_seconds(self) -> float | None:
        """The running mean frame time at the current size; None before its first frame."""
        return self._mean

    def record(self, seconds: float) -> Size | None:
        self._frames += 1
        if self._frames <= WARM_UP_FRAMES:
            return None
        self._mean = (
            seconds if self._mean is None else self._mean + SMOOTHING * (seconds - self._mean)
        )
        counted = self._frames - WARM_UP_FRAMES
        too_slow = self._mean > DOWN_AT * self.interval
        if too_slow and self.index > 0 and counted >= self._frames_before_down:
            self._falls[self.index] += 1
            backoff = RETRY_AFTER * 2 ** (self._falls[self.index] - 1)
            self._blocked_until[self.index] = self._clock() + backoff
            return self._move(-1)
        if counted >= self._frames_before_up and self.index + 1 < len(self.sizes):
            upper = self.sizes[self.index + 1]
            predicted = self._mean * _pixels(upper) / _pixels(self.size)
            allowed = self._clock() >= self._blocked_until[self.index + 1]
            if predicted < UP_AT * self.interval and allowed:
                return self._move(+1)
        return None

    def _move(self, step: int) -> Size:
        self.index += step
        self.left_at = self._mean
        self._mean = None
        self._frames = 0
        return self.size


def _pixels(size: Size) -> int:
    return size[0] * size[1]
