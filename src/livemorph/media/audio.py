"""The avatar's media: a clock in place of a camera, and the client's audio out and back.

An avatar session has no camera. Its video is made from the client's speech, so:

- `ClockTrack` is the pipeline's input: a tiny blank frame at the model's rate, its `time`
  the monotonic second it is due, so the engine renders the moment it is asked for and the
  pipeline's newest-frame-first rule still holds (a late engine skips ticks, never queues);
- `AudioTap` drains the client's audio track: each frame is resampled to mono float32 at
  the engine's rate and handed to `EngineSession.hear`, and the original frame goes on to
- `DelayedAudioTrack`, which sends it back to the client `delay` seconds after it arrived,
  so the voice leaves the server together with the video frames whose mouth it moved
  (the person hears the avatar only through this stream: the published clients play the
  clip into the connection, not on the speakers). Frames are restamped on a continuous
  clock, so the client's jitter buffer sees one steady stream whatever the client's
  timestamps did.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections import deque
from collections.abc import Callable

import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, AudioResampler, VideoFrame

logger = logging.getLogger(__name__)

CLOCK_RATE = 90_000
#: A frame older than this is dropped rather than sent late (its moment has passed).
MAX_AUDIO_BACKLOG = 0.5


class ClockTrack(MediaStreamTrack):
    """Blank 2x2 frames at `fps`, on time, each stamped with the moment it is due."""

    kind = "video"

    def __init__(self, fps: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = 1.0 / fps
        self._clock = clock
        self._start: float | None = None
        self._count = 0

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._count * self.interval
        if due > now:
            await asyncio.sleep(due - now)
        elif now - due > self.interval:  # fell behind (a stalled loop): skip, don't burst
            self._count = int((now - self._start) / self.interval)
            due = self._start + self._count * self.interval
        self._count += 1
        frame = VideoFrame(2, 2, "yuv420p")
        frame.pts = round(due * CLOCK_RATE)
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        return frame


class DelayedAudioTrack(MediaStreamTrack):
    """What the client said, sent back `delay` seconds after it was heard."""

    kind = "audio"

    def __init__(self, delay: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.delay = delay
        self._clock = clock
        self._frames: deque[tuple[float, AudioFrame]] = deque()
        self._arrived = asyncio.Event()
        self._next_pts: int | None = None

    def push(self, frame: AudioFrame, heard: float) -> None:
        self._frames.append((heard, frame))
        self._arrived.set()

    def end(self) -> None:
        self._arrived.set()
        self.stop()

    async def recv(self) -> AudioFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            if not self._frames:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            heard, frame = self._frames[0]
            wait = heard + self.delay - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self._frames.popleft()
            if -wait > MAX_AUDIO_BACKLOG:
                continue  # the moment passed long ago (the loop stalled): drop, don't pile up
            return self._restamp(frame)

    def _restamp(self, frame: AudioFrame) -> AudioFrame:
        if self._next_pts is None:
            self._next_pts = 0
        frame.pts = self._next_pts
        frame.time_base = fractions.Fraction(1, frame.sample_rate)
        self._next_pts += frame.samples
        return frame


class AudioTap:
    """Drains an audio track: mono float32 at `rate` to `hear`, each frame to `echo`."""

    def __init__(
        self,
        rate: int,
        hear: Callable[[np.ndarray, float], None],
        echo: DelayedAudioTrack | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self._hear = hear
        self._echo = echo
        self._clock = clock
        self._resampler = AudioResampler(format="flt", layout="mono", rate=rate)
        self.frames = 0

    async def run(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                assert isinstance(frame, AudioFrame)
                self.take(frame)
        except MediaStreamError:
            logger.debug("audio track ended")
        finally:
            if self._echo is not None:
                self._echo.end()

    def take(self, frame: AudioFrame) -> None:
        """One frame of the client's audio, heard now."""
        heard = self._clock()
        self.frames += 1
        if self._echo is not None:
            self._echo.push(frame, heard)
        chunks = [
            np.frombuffer(memoryview(out.planes[0]), np.float32)[: out.samples]
            for out in self._resampler.resample(_detached(frame))
        ]
        if chunks:
            self._hear(np.concatenate(chunks), heard)


def _detached(frame: AudioFrame) -> AudioFrame:
    """A copy of `frame` for the resampler (which may take ownership of its timestamps)."""
    copy = AudioFrame.from_ndarray(
        frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name
    )
    copy.sample_rate = frame.sample_rate
    return copy
