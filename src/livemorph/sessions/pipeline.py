"""Camera frames through the engine to an output track, newest frame first.

    remote track --pump--> [newest frame] --loop--> engine (worker thread) --> [newest output]
                                                                                  |
                                                               PipelineTrack.recv()

The pump drains the remote track as fast as frames arrive, so aiortc's decoder queue
never grows; the loop always takes the newest frame and drops the rest, so when the
engine is slower than the camera, latency stays one engine step, not a growing queue.
Control changes (prompt, image) are applied by the same loop between two frames: a
change is in effect for the next frame once `apply` returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame

from ..engines.base import Controls, EngineSession, EngineUnavailable
from ..media.slot import LatestSlot, SlotClosed

logger = logging.getLogger(__name__)

T = TypeVar("T")

VIDEO_CLOCK_RATE = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_RATE)


def _ignore(seconds: float) -> None:
    return None


@dataclass(frozen=True, slots=True)
class FrameTimings:
    """Where the pipeline reports each frame's times (the server's metrics); by default
    nowhere. Each is called on the event loop with seconds.

    `engine`: how long `transform` took, timed in the worker thread around the call alone.
    `latency`: from the decoded camera frame reaching the pipeline (`feed`) to its output
    leaving `PipelineTrack.recv` for the encoder; decoding before and encoding after are
    not in it, nor are frames that never got out."""

    engine: Callable[[float], None] = _ignore
    latency: Callable[[float], None] = _ignore


class FramePacer:
    """Admits frames at most at `fps` on average, tolerating jitter in arrival times.

    Frames are due on a fixed grid of 1/fps; a frame is admitted when it arrives no more
    than half an interval before its slot. A 30 fps camera into a 25 fps model yields 25.
    """

    def __init__(self, fps: float) -> None:
        self.interval = 1.0 / fps
        self._next_due: float | None = None

    def admit(self, now: float) -> bool:
        if self._next_due is None or now - self._next_due > self.interval:
            self._next_due = now + self.interval
            return True
        if now >= self._next_due - self.interval / 2:
            self._next_due += self.interval
            return True
        return False


class PipelineTrack(MediaStreamTrack):
    """The transformed video: what the engine produced last, restamped on a wall clock."""

    kind = "video"

    def __init__(
        self,
        outbox: LatestSlot[tuple[VideoFrame, float]],
        on_first_frame: Callable[[], None],
        timings: FrameTimings | None = None,
    ) -> None:
        super().__init__()
        self._outbox = outbox
        self._on_first_frame: Callable[[], None] | None = on_first_frame
        self._start: float | None = None
        self._latency = (timings or FrameTimings()).latency
        self.frames_sent = 0

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        try:
            frame, received = await self._outbox.get()
        except SlotClosed:
            self.stop()
            raise MediaStreamError from None
        now = time.monotonic()
        self.frames_sent += 1
        self._latency(now - received)
        if self._start is None:
            self._start = now
        frame.pts = int((now - self._start) * VIDEO_CLOCK_RATE)
        frame.time_base = VIDEO_TIME_BASE
        if self._on_first_frame is not None:
            callback, self._on_first_frame = self._on_first_frame, None
            callback()
        return frame


class Pipeline:
    """Runs one session's frames and control changes through its engine session."""

    def __init__(
        self,
        engine: EngineSession,
        executor: Executor,
        on_first_frame: Callable[[], None],
        timings: FrameTimings | None = None,
    ) -> None:
        self.engine = engine
        self._executor = executor
        self._pacer = FramePacer(engine.spec.fps)
        self._frame: VideoFrame | None = None
        #: When `_frame` reached the pipeline (monotonic seconds).
        self._frame_at = 0.0
        self._controls: deque[tuple[Controls, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._outbox: LatestSlot[tuple[VideoFrame, float]] = LatestSlot()
        self._engine_time = (timings or FrameTimings()).engine
        self.track = PipelineTrack(self._outbox, on_first_frame, timings)
        self._tasks: list[asyncio.Task[None]] = [asyncio.create_task(self._run(), name="pipeline")]
        self.frames_in = 0
        self.frames_dropped = 0
        self.frames_out = 0

    async def apply(self, controls: Controls) -> None:
        """Hand new controls to the engine; returns once they govern the next frame."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._controls.append((controls, done))
        self._wake.set()
        await done

    def feed(self, frame: VideoFrame) -> None:
        """Offer a camera frame; an older frame still waiting is dropped."""
        self.frames_in += 1
        if self._frame is not None:
            self.frames_dropped += 1
        self._frame = frame
        self._frame_at = time.monotonic()
        self._wake.set()

    def consume(self, track: MediaStreamTrack) -> None:
        """Start draining a remote video track into the pipeline."""
        self._tasks.append(asyncio.create_task(self._pump(track), name="pipeline-pump"))

    async def _pump(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                self.feed(await track.recv())  # type: ignore[arg-type]
        except MediaStreamError:
            logger.debug("input track ended")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._controls:
                controls, done = self._controls.popleft()
                try:
                    await self._in_worker(loop, self.engine.configure, controls)
                except EngineUnavailable as exc:  # a known lack, said in full: no traceback
                    logger.error("engine cannot apply controls: %s", exc)
                    if not done.done():
                        done.set_exception(exc)
                except Exception as exc:
                    logger.exception("engine failed to apply controls")
                    if not done.done():
                        done.set_exception(exc)
                else:
                    if not done.done():
                        done.set_result(None)
            frame, self._frame = self._frame, None
            if frame is None:
                continue
            received = self._frame_at
            if not self._pacer.admit(loop.time()):
                self.frames_dropped += 1
                continue
            try:
                output, seconds = await self._in_worker(loop, self._timed_transform, frame)
            except Exception:
                logger.exception("engine failed on a frame; dropping it")
                self.frames_dropped += 1
                continue
            self.frames_out += 1
            self._engine_time(seconds)
            self._outbox.put((output, received))

    def _timed_transform(self, frame: VideoFrame) -> tuple[VideoFrame, float]:
        started = time.perf_counter()
        output = self.engine.transform(frame)
        return output, time.perf_counter() - started

    def _in_worker(
        self, loop: asyncio.AbstractEventLoop, call: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        """`call(*args)` on a worker thread, in a copy of this task's context, so what the
        engine logs there carries the session's log fields (logs.py)."""
        return loop.run_in_executor(self._executor, contextvars.copy_context().run, call, *args)

    @property
    def frames_sent(self) -> int:
        """Output frames handed on to the encoder."""
        return self.track.frames_sent

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        self._outbox.close()
        self.track.stop()
        for _, done in self._controls:
            if not done.done():
                done.set_exception(SessionClosedError("session closed"))
        self._controls.clear()
        self.engine.close()


class SessionClosedError(RuntimeError):
    """Raised to callers still waiting on a pipeline that has been closed."""
