"""The network's size follows the CPU, the way WebRTC's quality scaler follows the encoder.

A larger network input paints finer strokes but costs time in proportion to its pixels,
and what a machine can afford depends on its cores, its other sessions, the codecs and
everything else running on it. Judging only the engine's own frame time is not enough:
on a 2-core machine the network took 23.6 ms of the 40 ms interval at 224x124, under the
climb threshold, while decoding, encoding and the client on the same machine left no CPU
for the next size, and latency crept up over a minute. So three signals decide:

- the engine's own time per frame (running mean), against the frame interval;
- how much of the machine's CPU is idle (`CpuMeter`, from /proc/stat: every process,
  this one included), after the step's extra cost;
- frames the session missed (gaps in the camera's timestamps: the pipeline drops a frame
  when the engine is still busy with the previous one).

A session starts at `START`, steps up only while all three have room (frames well under
the interval, the machine with CPU to spare after the step, no frame missed) and steps
down as soon as one of them runs short, before latency can build up, down to sizes below
the start when the machine is busy. The gap between the thresholds is wider than one
step's cost ratio, so a size that was just reached does not trip the way back; a size that
had to be left is not tried again for a while (longer after each fall), so a busy machine
does not see it oscillate.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence

Size = tuple[int, int]

#: Network sizes for 1280x704 output, smallest first (16:9-ish, multiples of 4).
LADDER: tuple[Size, ...] = (
    (160, 88),
    (192, 104),
    (224, 124),
    (256, 140),
    (320, 176),
    (384, 212),
    (448, 248),
)
#: Where a session starts: the sizes below are for a machine too busy for this one.
START = LADDER.index((224, 124))

#: Step up when the next size's predicted frame time is under this share of the interval.
UP_AT = 0.6
#: Step down when the frame time is over this share of the interval.
DOWN_AT = 0.9
#: Step up only if this share of the machine's CPU stays idle after the step's extra cost.
SPARE_UP = 0.2
#: Step down when less than this share of the machine's CPU is idle.
SPARE_DOWN = 0.05
#: Missed frames per frame (running mean): step down over DROPS_DOWN, up only under DROPS_UP.
#: Averaged over about 50 frames (DROP_SMOOTHING), so one hiccup of the network or the
#: client (a burst of three frames, two of them dropped) does not cost a size for 20 s.
DROPS_DOWN = 0.08
DROPS_UP = 0.01
DROP_SMOOTHING = 0.02
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
    """Picks the next network size from how long frames take and how busy the machine is.

    `record` is called once per frame with its processing time, the machine's idle share
    (0..1) and the frames missed since the previous one; it returns the size the next frame
    should use when that changes, else None. Not thread-safe: one session's frames are
    processed one at a time.
    """

    def __init__(
        self,
        sizes: Sequence[Size],
        interval: float,
        *,
        frames_before_up: int = FRAMES_BEFORE_UP,
        frames_before_down: int = FRAMES_BEFORE_DOWN,
        start: Size | None = None,
        cores: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not sizes or interval <= 0:
            raise ValueError("a scaler needs at least one size and a positive interval")
        self.sizes = sorted(sizes, key=lambda size: size[0] * size[1])
        self.interval = interval
        self.index = self.sizes.index(start) if start in self.sizes else 0
        self.cores = max(1, cores)
        self._frames_before_up = frames_before_up
        self._frames_before_down = frames_before_down
        self._clock = clock
        self._mean: float | None = None
        self._spare = 1.0
        self._drops = 0.0
        #: Why the size last changed (for logs).
        self.reason = ""
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

    @property
    def spare(self) -> float:
        """The machine's idle CPU share, running mean."""
        return self._spare

    @property
    def drops(self) -> float:
        """Frames missed per frame, running mean."""
        return self._drops

    def record(self, seconds: float, spare: float = 1.0, dropped: int = 0) -> Size | None:
        self._frames += 1
        if self._frames <= WARM_UP_FRAMES:
            return None
        first = self._mean is None
        self._mean = (
            seconds if self._mean is None else self._mean + SMOOTHING * (seconds - self._mean)
        )
        if first:
            self._spare, self._drops = spare, float(dropped)
        else:
            self._spare += SMOOTHING * (spare - self._spare)
            self._drops += DROP_SMOOTHING * (dropped - self._drops)
        counted = self._frames - WARM_UP_FRAMES
        if self.index > 0 and counted >= self._frames_before_down:
            reason = self._overload()
            if reason:
                self._falls[self.index] += 1
                backoff = RETRY_AFTER * 2 ** (self._falls[self.index] - 1)
                self._blocked_until[self.index] = self._clock() + backoff
                return self._move(-1, reason)
        if counted >= self._frames_before_up and self.index + 1 < len(self.sizes):
            upper = self.sizes[self.index + 1]
            predicted = self._mean * _pixels(upper) / _pixels(self.size)
            extra = (predicted - self._mean) / (self.interval * self.cores)
            allowed = self._clock() >= self._blocked_until[self.index + 1]
            if (
                allowed
                and predicted < UP_AT * self.interval
                and self._spare - extra > SPARE_UP
                and self._drops < DROPS_UP
            ):
                return self._move(+1, "time to spare")
        return None

    def _overload(self) -> str:
        """Why the current size is too much for the machine, or "" if it is not."""
        assert self._mean is not None
        if self._mean > DOWN_AT * self.interval:
            return "frames take too long"
        if self._spare < SPARE_DOWN:
            return "the machine has no CPU to spare"
        if self._drops > DROPS_DOWN:
            return "frames are being missed"
        return ""

    def _move(self, step: int, reason: str) -> Size:
        self.index += step
        self.reason = reason
        self.left_at = self._mean
        self._mean = None
        self._frames = 0
        return self.size


def _pixels(size: Size) -> int:
    return size[0] * size[1]


class CpuMeter:
    """The machine's idle CPU share (0..1), from /proc/stat, over the last `period` seconds.

    One meter serves every session of a process; reading /proc/stat costs about 20 us and
    happens at most once per period. Where /proc/stat does not exist, it says 1.0 (idle):
    the other two signals still hold the size down.
    """

    def __init__(self, period: float = 0.5, path: str = "/proc/stat") -> None:
        self.period = period
        self._path = path
        self._lock = threading.Lock()
        self._last: tuple[float, float, float] | None = None  # (when, busy, total) ticks
        self._spare = 1.0

    def _read(self) -> tuple[float, float] | None:
        try:
            with open(self._path) as stat:
                values = [int(v) for v in stat.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = values[3] + values[4]  # idle + iowait
        total = sum(values)
        return total - idle, total

    def spare(self) -> float:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.period:
                return self._spare
            reading = self._read()
            if reading is None:
                return 1.0
            busy, total = reading
            if self._last is not None and total > self._last[2]:
                used = (busy - self._last[1]) / (total - self._last[2])
                self._spare = min(1.0, max(0.0, 1.0 - used))
            self._last = (now, busy, total)
            return self._spare
