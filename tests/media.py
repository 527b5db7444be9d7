"""Real media for tests: a camera-like track showing scikit-image's astronaut photo, and
speech from espeak-ng."""

from __future__ import annotations

import asyncio
import fractions
import functools
import io
import os
import shutil
import struct
import subprocess
import time
import wave

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from av import VideoFrame
from PIL import Image
from skimage import data

CLOCK_RATE = 90_000


def photo(width: int, height: int) -> np.ndarray:
    """The astronaut photo, cropped and scaled to `width` x `height` RGB."""
    image = Image.fromarray(data.astronaut())
    side = image.width
    crop_h = int(side * height / width)
    top = (image.height - crop_h) // 2
    return np.asarray(image.crop((0, top, side, top + crop_h)).resize((width, height)))


def require_espeak() -> str:
    """The espeak-ng binary, or skip (fail when CI=true) with what to install."""
    found = shutil.which("espeak-ng")
    if found is not None:
        return found
    message = "espeak-ng not found: run scripts/install-system-deps.sh (Debian package `espeak-ng`)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@functools.lru_cache(maxsize=32)
def speech_wav(text: str, *, voice: str = "en", speed: int = 175, amplitude: int = 100) -> bytes:
    """`text` spoken by espeak-ng, as a WAV file's bytes (mono s16, 22 050 Hz).

    `speed` is in words per minute, `amplitude` 0 to 200. The text goes in on stdin, so
    nothing in it is read as an option. espeak-ng writes a streaming header (it cannot seek
    back on stdout); its sizes are set right here, so every WAV reader sees the length.
    """
    result = subprocess.run(
        [
            require_espeak(),
            "--stdout",
            "--stdin",
            "-v",
            voice,
            "-s",
            str(speed),
            "-a",
            str(amplitude),
        ],
        input=text.encode(),
        capture_output=True,
        check=True,
        timeout=60,
    )
    wav = bytearray(result.stdout)
    data = wav.find(b"data", 12)
    if not wav.startswith(b"RIFF") or data < 0:
        raise RuntimeError(f"espeak-ng wrote no WAV: {result.stderr.decode(errors='replace')}")
    struct.pack_into("<I", wav, 4, len(wav) - 8)
    struct.pack_into("<I", wav, data + 4, len(wav) - data - 8)
    return bytes(wav)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


class SceneTrack(MediaStreamTrack):
    """A paced video track of a still photo with a slowly drifting patch (some motion)."""

    kind = "video"

    def __init__(self, width: int, height: int, fps: float = 25) -> None:
        super().__init__()
        self._base = photo(width, height)
        self._interval = 1.0 / fps
        self._start: float | None = None
        self._count = 0
        self.last_rgb = self._base

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        due = self._start + self._count * self._interval
        if due > now:
            await asyncio.sleep(due - now)
        rgb = self._base.copy()
        x = (self._count * 4) % (rgb.shape[1] - 32)
        rgb[8:40, x : x + 32] = 255
        self.last_rgb = rgb
        frame = VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = int(self._count * self._interval * CLOCK_RATE)
        frame.time_base = fractions.Fraction(1, CLOCK_RATE)
        self._count += 1
        return frame


class FrameSink:
    """Drains a remote track like a video element would, keeping only the newest frame.

    Reading a track only now and then would see frames queued long ago; tests ask for
    frames that arrived after a point in time instead.
    """

    def __init__(self, track: MediaStreamTrack) -> None:
        self.count = 0
        self.latest: np.ndarray | None = None
        self._frame: VideoFrame | None = None
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._drain(track))

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            self._frame = await track.recv()  # type: ignore[assignment]
            self.count += 1
            self._arrived.set()

    async def fresh(self, skip: int = 2) -> np.ndarray:
        """RGB of a frame that left the server after this call: `skip` frames from now."""
        target = self.count + skip + 1
        async with asyncio.timeout(10):
            while self.count < target:
                self._arrived.clear()
                await self._arrived.wait()
        assert self._frame is not None
        return self._frame.to_ndarray(format="rgb24")

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def tone_wav(seconds: float, amplitude: float, rate: int = 48_000) -> bytes:
    """A 220 Hz tone as a 16-bit mono WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()
