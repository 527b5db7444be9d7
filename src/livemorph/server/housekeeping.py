"""Memory handed back to the system when a node falls idle.

A session's peer connections end in aiortc's reference cycles, which only the garbage
collector's full pass frees; the heavy parts (the VP8 codec and its frames) are freed at
close without it (SharedVp8Encoder.release), but the rest waits. And what is freed goes back
to the C allocator, which keeps it: glibc's arenas grow to the busiest moment and stay
there. Over 20 minutes of churn (bench/soak.py: 87 sessions, 103 viewers on 3 nodes) each
node ended 128-195 MiB above its baseline with no session left.

So when the last session ends and none starts for `IDLE_AFTER` seconds, the node runs a full
collection and asks glibc to return its free pages (`malloc_trim`). Both block the event loop
(93-147 ms each in bench/memory.py), which is why they wait for a node with no session: no
frame is late for it. A node that never falls idle is not trimmed; its memory is bounded by
its busiest moment, not by the sessions it has served.

Measured with the same soak after this: the nodes ended at 226-249 MiB with no session
(396-463 before; 146 at start), 25-82 MiB above their post-warm-up baselines. With
bench/memory.py (one node, rounds of 2 sessions each with a viewer, RSS once idle): 166-200
MiB over 12 rounds from 145 at start, where without the tidy it climbed to 343 and levelled
off there. A one-off tracemalloc comparison of such rounds (not a script in the repo) found
a few KiB of Python objects left between them; what stays is in the C heap.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

#: Seconds a node must have been without a session before it is tidied.
IDLE_AFTER = 2.0


def _load_trim() -> Callable[[], None] | None:
    """glibc's `malloc_trim(0)`, where the C library is glibc; None elsewhere."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # musl, macOS: no malloc_trim
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int

    def call() -> None:
        trim(0)

    return call


malloc_trim = _load_trim()


class IdleTidy:
    """Tidies memory once the node has had no session for `delay` seconds (`poke` after each
    session ends; `count` says how many run now)."""

    def __init__(self, count: Callable[[], int], delay: float = IDLE_AFTER) -> None:
        self._count = count
        self._delay = delay
        self._task: asyncio.Task[None] | None = None
        #: Times the node was tidied (for tests and logs).
        self.runs = 0

    def poke(self) -> None:
        """A session ended: tidy later, if the node is still idle then."""
        if self._count() == 0 and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._later(), name="idle-tidy")

    async def _later(self) -> None:
        await asyncio.sleep(self._delay)
        if self._count() == 0:
            self.tidy()

    def tidy(self) -> None:
        started = time.perf_counter()
        collected = gc.collect()
        if malloc_trim is not None:
            malloc_trim()
        self.runs += 1
        logger.debug(
            "idle: collected %d objects and trimmed the heap in %.0f ms",
            collected,
            (time.perf_counter() - started) * 1000,
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
