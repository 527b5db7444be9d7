"""Driving Debian's Chromium for the browser tests: a real camera file, pixels from pages.

Chromium comes from Debian (scripts/install-system-deps.sh), never from `playwright install`.
Its fake capture device plays a .y4m file made from scikit-image's astronaut photo, at the
size the model asks for, so the page meets the same camera a person's laptop would give it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from av import VideoFrame

from .media import photo

#: Where Debian puts Chromium; LIVEMORPH_CHROMIUM names another.
CHROMIUM = os.environ.get("LIVEMORPH_CHROMIUM", "/usr/bin/chromium")

#: Frames are read back small: enough to tell looks apart, cheap to move out of the page.
SAMPLE_WIDTH = 160
SAMPLE_HEIGHT = 88


def require_chromium() -> str:
    """The Chromium binary; fails in CI and skips elsewhere when it is not installed."""
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found:
        return found
    message = f"no Chromium at {CHROMIUM}: run scripts/install-system-deps.sh"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
    raise AssertionError("unreachable")


def write_y4m(path: Path, frames: list[np.ndarray], fps: int) -> Path:
    """An uncompressed YUV 4:2:0 video of RGB frames, the format Chromium's fake camera plays."""
    height, width = frames[0].shape[:2]
    with path.open("wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            frame = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            out.write(b"FRAME\n")
            out.write(frame.reformat(format="yuv420p").to_ndarray().tobytes())
    return path


def camera_file(directory: Path, width: int, height: int, fps: int = 25) -> Path:
    """The astronaut photo at `width` x `height`, as a still camera."""
    return write_y4m(directory / f"astronaut-{width}x{height}.y4m", [photo(width, height)], fps)


def chromium_args(camera: Path | None = None) -> list[str]:
    args = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if camera is not None:
        args.append(f"--use-file-for-fake-video-capture={camera}")
    return args


@contextmanager
def chromium(camera: Path | None = None) -> Iterator[Any]:
    """A headless Chromium (Playwright's sync API) whose camera plays `camera`."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=chromium_args(camera))
        try:
            yield browser
        finally:
            browser.close()


#: Draws a <video> into a small canvas and returns its RGB bytes (row-major) and true size.
READ_VIDEO = """
([selector, width, height]) => {
  const video = document.querySelector(selector);
  if (!video || video.readyState < 2 || !video.videoWidth) return null;
  const canvas = document.createElement("canvas");
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  context.drawImage(video, 0, 0, width, height);
  const rgba = context.getImageData(0, 0, width, height).data;
  const rgb = new Array(width * height * 3);
  for (let i = 0, j = 0; i < rgba.length; i += 4) {
    rgb[j++] = rgba[i];
    rgb[j++] = rgba[i + 1];
    rgb[j++] = rgba[i + 2];
  }
  return { rgb, width: video.videoWidth, height: video.videoHeight, time: video.currentTime };
}
"""


def read_video(page: Any, selector: str) -> tuple[np.ndarray, tuple[int, int], float] | None:
    """A small RGB sample of what a <video> shows now, its intrinsic size and current time."""
    found = page.evaluate(READ_VIDEO, [selector, SAMPLE_WIDTH, SAMPLE_HEIGHT])
    if found is None:
        return None
    image = np.asarray(found["rgb"], dtype=np.uint8).reshape(SAMPLE_HEIGHT, SAMPLE_WIDTH, 3)
    return image, (int(found["width"]), int(found["height"])), float(found["time"])


def video_frame(page: Any, selector: str) -> np.ndarray:
    """What a playing <video> shows now; fails if it shows nothing."""
    found = read_video(page, selector)
    assert found is not None, f"{selector} has no frame to show"
    return found[0]
