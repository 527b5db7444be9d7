"""Easy sources for `client.realtime.connect()`: a camera, a microphone, a file, or numpy
frames."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import platform
import time
from collections.abc import Callable, Sequence

import numpy as np
from aiortc import MediaStreamTrack
from aiortc.contrib.media import MediaPlayer
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from ..errors import ErrorCode, LivemorphError

CLOCK_RATE = 90_000
TIME_BASE = fractions.Fraction(1, CLOCK_RATE)

FrameSource = Sequence[np.ndarray] | Callable[[int], np.ndarray | VideoFrame | None]


def camera(
    device: str | None = None, *, width: int = 1280, height: int = 704, fps: int = 25
) -> MediaPlayer:
    """Open a webcam (v4l2 on Linux, AVFoundation on macOS, DirectShow on Windows).

    Pass the result to `connect()`; its `.video` is sent. Size the camera from the model:
    `camera(width=spec.width, height=spec.height, fps=spec.fps)`.
    """
    options = {"video_size": f"{width}x{height}", "framerate": str(fps)}
    system = platform.system()
    if system == "Darwin":
        source, fmt = device or "default:none", "avfoundation"
    elif system == "Windows":
        if not device:
            raise LivemorphError(
                "on Windows, name the camera: camera('Integrated Camera')", ErrorCode.INVALID_INPUT
            )
        source, fmt = f"video={device}", "dshow"
    else:
        source, fmt = device or "/dev/video0", "v4l2"
    try:
        return MediaPlayer(source, format=fmt, options=options)
    except Exception as exc:
        raise LivemorphError(
            f"cannot open camera {source}: {exc}", ErrorCode.INVALID_INPUT
        ) from None


def microphone(device: str | None = None) -> MediaPlayer:
    """Open a microphone, for `live_avatar`: its `.audio` is sent and drives the avatar.

    The default device is PulseAudio's (or PipeWire's) `default`, else ALSA's, on Linux;
    AVFoundation's default input on macOS. On Windows name the device:
    `microphone('Microphone (Realtek Audio)')`. `device` is passed to FFmpeg as is
    (`hw:1` with ALSA, say, or `:1` for AVFoundation's second input).
    """
    system = platform.system()
    if system == "Darwin":
        attempts = [(device or ":default", "avfoundation")]
    elif system == "Windows":
        if not device:
            raise LivemorphError(
                "on Windows, name the microphone: microphone('Microphone (Realtek Audio)')",
                ErrorCode.INVALID_INPUT,
            )
        attempts = [(f"audio={device}", "dshow")]
    elif device:
        attempts = [(device, "pulse"), (device, "alsa")]
    else:
        attempts = [("default", "pulse"), ("default", "alsa")]
    failures: list[str] = []
    for source, fmt in attempts:
        try:
            player = MediaPlayer(source, format=fmt)
        except Exception as exc:
            failures.append(f"{fmt} {source}: {exc}")
            continue
        if player.audio is not None:
            return player
        failures.append(f"{fmt} {source}: no audio stream")
    raise LivemorphError(
        f"cannot open a microphone ({'; '.join(failures)})", ErrorCode.INVALID_INPUT
    )


def file(path: str, *, loop: bool = False) -> MediaPlayer:
    """Play a media file (anything FFmpeg reads) as if it were a camera or a microphone.

    A video model sends its `.video`; `live_avatar` sends its `.audio`.
    """
    try:
        return MediaPlayer(str(path), loop=loop)
    except Exception as exc:
        raise LivemorphError(f"cannot open {path}: {exc}", ErrorCode.INVALID_INPUT) from None


def to_video_frame(image: np.ndarray | VideoFrame) -> VideoFrame:
    """An av VideoFrame from an RGB (h, w, 3), RGBA (h, w, 4) or gray (h, w) uint8 array."""
    if isinstance(image, VideoFrame):
        return image
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise LivemorphError("frames must be uint8 arrays", ErrorCode.INVALID_INPUT)
    formats = {2: "gray", 3: "rgb24", 4: "rgba"}
    channels = 2 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels not in formats:
        raise LivemorphError(
            f"frames must be (h, w), (h, w, 3) or (h, w, 4), not {array.shape}",
            ErrorCode.INVALID_INPUT,
        )
    return VideoFrame.from_ndarray(np.ascontiguousarray(array), format=formats[channels])


class ArrayVideoTrack(MediaStreamTrack):
    """A video track made of numpy frames, pushed live or played at a fixed rate.

    Without `frames`, call `push(array)` for each new frame: it goes out as soon as the peer
    connection asks, stamped with wall-clock time, so latency measurements see no pacing
    delay. With `frames` (a list, or a function of the frame index that returns None at
    the end), frames are played at `fps`, looping a list when `loop` is set.
    """

    kind = "video"

    def __init__(
        self,
        frames: FrameSource | None = None,
        *,
        fps: float = 25.0,
        loop: bool = True,
        queue_size: int = 2,
    ) -> None:
        super().__init__()
        if fps <= 0:
            raise LivemorphError("fps must be positive", ErrorCode.INVALID_INPUT)
        self.fps = fps
        self._frames = frames
        self._repeat = loop
        self._queue: asyncio.Queue[VideoFrame | None] = asyncio.Queue(maxsize=max(1, queue_size))
        self._index = 0
        self._start: float | None = None
        self._last_pts = -1

    def push(self, image: np.ndarray | VideoFrame) -> None:
        """Queue a frame to send (call from the event loop's thread); drops the oldest if full."""
        if self._frames is not None:
            raise LivemorphError("this track plays its own frames", ErrorCode.INVALID_INPUT)
        frame = to_video_frame(image)
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(frame)

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._frames is None:
            frame = await self._queue.get()
            if frame is None:
                raise MediaStreamError
            if self._start is None:
                self._start = time.monotonic()
            pts = max(int((time.monotonic() - self._start) * CLOCK_RATE), self._last_pts + 1)
        else:
            frame = await self._next_played()
            pts = int(self._index * CLOCK_RATE / self.fps)
            self._index += 1
        self._last_pts = pts
        frame.pts = pts
        frame.time_base = TIME_BASE
        return frame

    async def _next_played(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        wait = self._start + self._index / self.fps - now
        if wait > 0:
            await asyncio.sleep(wait)
        source = self._frames
        image: np.ndarray | VideoFrame | None
        if callable(source):
            image = source(self._index)
        else:
            assert source is not None
            if not source or (self._index >= len(source) and not self._repeat):
                image = None
            else:
                image = source[self._index % len(source)]
        if image is None:
            self.stop()
            raise MediaStreamError
        return to_video_frame(image)

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)  # wakes a recv() waiting for a push
