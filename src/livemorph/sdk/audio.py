"""The avatar's voice: audio clips decoded for sending, and the track that plays them.

A `live_avatar` session without a microphone sends `ClipAudioTrack`: 20 ms frames of s16
mono 48 kHz on a steady clock, silence while no clip plays, the way `decart==0.0.30` does.
`RealtimeClient.play_audio()` decodes a clip with `decode_audio()` (any container PyAV
reads, or numpy samples) and plays it into that track; it resolves once the clip's last
frame has been handed to the connection, on the client's own clock. The clip is never
played on the local speakers: the avatar's voice comes back from the server, in step with
its mouth.
"""

from __future__ import annotations

import asyncio
import fractions
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import AudioFrame, AudioResampler

from ..errors import ErrorCode, LivemorphError
from .images import Readable

#: What the track sends: s16 mono at 48 kHz, in 20 ms frames.
SAMPLE_RATE = 48_000
FRAME_SAMPLES = 960
TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)
#: Behind the clock by more than this (nobody pulled frames: a reconnect, a stalled loop),
#: the track takes up the clock again from now instead of sending the backlog in a burst.
MAX_LAG = 0.25

AudioInput = bytes | bytearray | memoryview | str | os.PathLike[str] | Readable | np.ndarray
"""An audio file's bytes (WAV, MP3, Ogg, ... anything FFmpeg decodes), its path, a binary
file object, or a numpy array of samples: float in -1..1 or int16, shaped (n,) for mono or
(n, channels), with its `sample_rate`."""


def _invalid(message: str) -> LivemorphError:
    return LivemorphError(message, ErrorCode.INVALID_INPUT)


def decode_audio(audio: AudioInput, sample_rate: int | None = None) -> np.ndarray:
    """The clip as int16 mono samples at 48 kHz (blocking: run it off the event loop).

    `sample_rate` is required for arrays and refused for files, which carry their own.
    Channels are mixed down to mono.
    """
    if isinstance(audio, np.ndarray):
        return _decode_array(audio, sample_rate)
    if sample_rate is not None:
        raise _invalid("sample_rate is only for numpy arrays: audio files carry their own")
    if isinstance(audio, bytes | bytearray | memoryview):
        if not len(audio):
            raise _invalid("audio is empty")
        return _decode_file(io.BytesIO(bytes(audio)), "audio bytes")
    if isinstance(audio, str | os.PathLike):
        path = Path(audio)
        if not path.is_file():
            raise _invalid(f"no such audio file: {path}")
        return _decode_file(str(path), str(path))
    if isinstance(audio, Readable):
        data = audio.read()
        if not isinstance(data, bytes | bytearray):
            raise _invalid("file object must be opened in binary mode")
        return decode_audio(bytes(data))
    raise _invalid(
        f"unsupported audio type: {type(audio).__name__}; give bytes, a path, a binary file "
        "object or a numpy array"
    )


def _decode_file(source: str | io.BytesIO, name: str) -> np.ndarray:
    try:
        container = av.open(source, mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _invalid(f"cannot decode {name}: {exc}") from None
    try:
        if not container.streams.audio:
            raise _invalid(f"cannot decode {name}: it has no audio stream")
        resampler = AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        chunks: list[np.ndarray] = []
        for frame in container.decode(audio=0):
            chunks.extend(_planar(out) for out in resampler.resample(frame))
        chunks.extend(_planar(out) for out in resampler.resample(None))
    except av.FFmpegError as exc:
        raise _invalid(f"cannot decode {name}: {exc}") from None
    finally:
        container.close()
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


def _planar(frame: AudioFrame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1)[: frame.samples].astype(np.int16, copy=False)


def _decode_array(samples: np.ndarray, sample_rate: int | None) -> np.ndarray:
    if sample_rate is None:
        raise _invalid("sample_rate is required with a numpy array: play_audio(samples, 16000)")
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer):
        raise _invalid("sample_rate must be an integer number of samples per second")
    if not 1_000 <= sample_rate <= 384_000:
        raise _invalid(f"sample_rate {sample_rate} is out of range (1000 to 384000)")
    array = np.asarray(samples)
    if array.ndim == 2 and array.shape[1] > 16 >= array.shape[0]:
        raise _invalid(f"audio arrays are (n, channels), not (channels, n): got {array.shape}")
    if array.ndim not in (1, 2) or (array.ndim == 2 and array.shape[1] == 0):
        raise _invalid(f"audio arrays are (n,) or (n, channels), not {array.shape}")
    if array.dtype == np.int16:
        mono = array.astype(np.float32) / 32768.0
    elif np.issubdtype(array.dtype, np.floating):
        mono = array.astype(np.float32)
        if not np.isfinite(mono).all():
            raise _invalid("audio samples must be finite")
        mono = np.clip(mono, -1.0, 1.0)
    else:
        raise _invalid(f"audio arrays are float (-1..1) or int16, not {array.dtype}")
    if mono.ndim == 2:
        mono = mono.mean(axis=1)
    if mono.size == 0:
        return np.zeros(0, np.int16)
    if sample_rate == SAMPLE_RATE:
        return np.round(mono * 32767.0).astype(np.int16)
    frame = AudioFrame.from_ndarray(
        np.ascontiguousarray(mono.reshape(1, -1)), format="flt", layout="mono"
    )
    frame.sample_rate = int(sample_rate)
    resampler = AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    chunks = [_planar(out) for out in resampler.resample(frame)]
    chunks.extend(_planar(out) for out in resampler.resample(None))
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)


class ClipAudioTrack(MediaStreamTrack):
    """An audio track that sends silence, or the clip it was given to play.

    20 ms frames of s16 mono 48 kHz, paced on `clock`. One clip at a time: `claim()` stops
    the one under way (its future resolves False); `play()` queues the next and returns a
    future that resolves True when its last frame has been sent.
    """

    kind = "audio"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._start: float | None = None
        self._pts = 0
        self._clip: np.ndarray | None = None
        self._offset = 0
        self._done: asyncio.Future[bool] | None = None
        self._claims = 0
        self._silence = np.zeros(FRAME_SAMPLES, np.int16)

    @property
    def playing(self) -> bool:
        """True while a clip is being sent."""
        return self._clip is not None

    def claim(self) -> int:
        """Stop the clip under way (if any) and reserve the track for a new one."""
        self.stop_clip()
        self._claims += 1
        return self._claims

    def is_current(self, claim: int) -> bool:
        """True while no later `claim()` has overtaken this one."""
        return claim == self._claims

    def play(self, samples: np.ndarray, claim: int | None = None) -> asyncio.Future[bool]:
        """Send int16 mono 48 kHz `samples` next; the future says whether all were sent.

        With `claim` (from `claim()`), a clip whose claim was overtaken by a later one is not
        played: its future is False at once.
        """
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if claim is None:
            claim = self.claim()
        if claim != self._claims or self.readyState != "live":
            future.set_result(False)
            return future
        self.stop_clip()
        if samples.size == 0:
            future.set_result(True)
            return future
        self._clip = np.ascontiguousarray(samples, dtype=np.int16).reshape(-1)
        self._offset = 0
        self._done = future
        return future

    def stop_clip(self) -> None:
        """Stop the clip under way (its future resolves False); silence follows."""
        self._finish(False)

    def _finish(self, played: bool) -> None:
        done, self._done = self._done, None
        self._clip = None
        if done is not None and not done.done():
            done.set_result(played)

    async def recv(self) -> AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        due = self._start + self._pts / SAMPLE_RATE
        if due > now:
            await asyncio.sleep(due - now)
            if self.readyState != "live":
                raise MediaStreamError
        elif now - due > MAX_LAG:
            self._start = now - self._pts / SAMPLE_RATE
        samples = self._next_samples()
        frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        frame.pts = self._pts
        frame.time_base = TIME_BASE
        self._pts += FRAME_SAMPLES
        return frame

    def _next_samples(self) -> np.ndarray:
        clip = self._clip
        if clip is None:
            return self._silence
        chunk = clip[self._offset : self._offset + FRAME_SAMPLES]
        self._offset += FRAME_SAMPLES
        if self._offset >= len(clip):
            self._finish(True)
        if len(chunk) < FRAME_SAMPLES:
            chunk = np.concatenate([chunk, np.zeros(FRAME_SAMPLES - len(chunk), np.int16)])
        return chunk

    def stop(self) -> None:
        super().stop()
        self._finish(False)
