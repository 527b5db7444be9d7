"""Recording what a connection receives into a file, with aiortc's `MediaRecorder`.

`rt.record(path)` starts it and `await rt.stop_recording()` (or `disconnect()`) finishes
the file. What is recorded is the remote video, and the remote audio when the connection
receives some when recording starts (a session that sends audio, an avatar's voice).

The recorder reads its own copy of each remote track (the connection relays them), so the
caller's `video_track` still sees every frame. Two things are set right on the way in:

- Timestamps. Received frames carry RTP time, which starts anywhere (a file that would
  begin minutes in), and `MediaRecorder` encodes video on a 1/30 s grid, where two frames
  that arrive close together would share a stamp and stop the recording. Each frame gets
  a copy stamped from the recording's start, using the sender's own spacing, one grid
  step at least after the previous one.
- Reconnects. A dropped session comes back with new tracks; the recording follows them
  into the same file. The gap shows as the last picture held and as silence.
"""

from __future__ import annotations

import asyncio
import fractions
import os
import time
from pathlib import Path

from aiortc.contrib.media import MediaRecorder
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, VideoFrame

#: `MediaRecorder` adds its video stream with `rate=30`, so its encoder counts in 1/30 s.
RECORDER_RATE = 30
RECORDER_TIME_BASE = fractions.Fraction(1, RECORDER_RATE)
#: A jump in the audio's time beyond this is a gap (a reconnect), kept as silence; less is
#: jitter, and the samples follow on from the previous frame's.
AUDIO_GAP = 0.1


class _Follower(MediaStreamTrack):
    """One kind of what the connection receives, across its reconnects, restamped."""

    def __init__(self, kind: str, started: float, after: asyncio.Event | None = None) -> None:
        super().__init__()
        self.kind = kind
        self._started = started
        #: Hand over nothing until this is set (audio waits for the first video frame).
        self._after = after
        #: Set once the first frame has been handed over.
        self.delivered = asyncio.Event()
        #: Every video frame is written at the first one's size.
        self._size: tuple[int, int] | None = None
        self._source: MediaStreamTrack | None = None
        self._changed = asyncio.Event()
        #: The current source's first timestamp and where it fell in the recording.
        self._anchor: tuple[float, float] | None = None
        self._next_pts = 0
        #: Frames handed to the recorder so far.
        self.frames = 0

    def attach(self, source: MediaStreamTrack) -> None:
        """Record `source` from now on: the first track, or a reconnect's new one. The old
        one ends with its connection, which a reconnect closes first."""
        self._source = source
        self._anchor = None
        self._changed.set()

    async def recv(self) -> VideoFrame | AudioFrame:
        if self._after is not None:
            await self._after.wait()
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            source = self._source
            if source is None:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                frame = await source.recv()
            except MediaStreamError:
                if self._source is source:
                    self._source = None  # until a reconnect brings a new track
                continue
            if source is self._source:
                self.frames += 1
                self.delivered.set()
                return self._stamped(frame)  # type: ignore[arg-type]

    def _seconds(self, frame: VideoFrame | AudioFrame) -> float:
        """Where `frame` falls in the recording: the sender's spacing from the source's
        first frame, which lands at the moment it arrived."""
        now = time.monotonic() - self._started
        if frame.pts is None or frame.time_base is None:
            return now
        own = float(frame.pts * frame.time_base)
        if self._anchor is None:
            self._anchor = (own, now)
        return self._anchor[1] + own - self._anchor[0]

    def _stamped(self, frame: VideoFrame | AudioFrame) -> VideoFrame | AudioFrame:
        """A copy of `frame` with its place in the recording: the relay hands the caller
        the same frame object, whose stamps are not ours to change."""
        seconds = self._seconds(frame)
        if isinstance(frame, VideoFrame):
            # MediaRecorder sizes its video stream by the first frame and cannot change it.
            if self._size is None:
                self._size = (frame.width, frame.height)
            width, height = self._size
            copy = frame.reformat(width=width, height=height, format="yuv420p")
            if copy is frame:
                copy = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
            pts = max(round(seconds * RECORDER_RATE), self._next_pts)
            copy.pts, copy.time_base = pts, RECORDER_TIME_BASE
            self._next_pts = pts + 1
            return copy
        audio = AudioFrame.from_ndarray(
            frame.to_ndarray(), format=frame.format.name, layout=frame.layout.name
        )
        audio.sample_rate = frame.sample_rate
        pts = round(seconds * frame.sample_rate)
        if pts < self._next_pts + AUDIO_GAP * frame.sample_rate:
            pts = self._next_pts  # seamless: the samples follow on
        audio.pts, audio.time_base = pts, fractions.Fraction(1, frame.sample_rate)
        self._next_pts = pts + frame.samples
        return audio


class Recording:
    """One file being written from a connection's remote tracks."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        sources: dict[str, MediaStreamTrack],
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        # MediaRecorder opens its file only when the first frame is written, and a failure
        # there would end its task unseen: a path that cannot be written is refused now.
        with self.path.open("wb"):
            pass
        started = time.monotonic()
        self._recorder = MediaRecorder(str(self.path), format=format, options=options)
        self._followers: dict[str, _Follower] = {}
        # The video first: MediaRecorder sets its video stream's size from the first video
        # frame, which must come before anything is written (the first audio packet opens
        # every codec, and the size can no longer change). Audio waits for that frame.
        video_first = sorted(sources.items(), key=lambda item: item[0] != "video")
        for kind, source in video_first:
            video = self._followers.get("video")
            after = video.delivered if kind == "audio" and video is not None else None
            follower = _Follower(kind, started, after)
            follower.attach(source)
            self._recorder.addTrack(follower)
            self._followers[kind] = follower

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self._followers)

    def frames(self, kind: str) -> int:
        """Frames of `kind` handed to the recorder so far (0 for a kind not recorded)."""
        follower = self._followers.get(kind)
        return 0 if follower is None else follower.frames

    async def start(self) -> None:
        await self._recorder.start()

    def follow(self, kind: str, source: MediaStreamTrack) -> bool:
        """Go on with a reconnect's new track of `kind`; False if this kind is not recorded
        (a stream that was not there when recording started)."""
        follower = self._followers.get(kind)
        if follower is None:
            return False
        follower.attach(source)
        return True

    async def stop(self) -> Path:
        """Finish the file (the encoders flushed, the container closed); its path."""
        try:
            await self._recorder.stop()
        finally:
            for follower in self._followers.values():
                follower.stop()
        return self.path
