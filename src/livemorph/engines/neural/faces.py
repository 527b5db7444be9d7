"""Where the faces are: found now and then by a Haar cascade, followed in between.

People point cameras at themselves, and a restyle that loses the eyes and the mouth loses
the person. The engine protects faces (guided.py: more camera structure, less invented
texture inside them); this module says where they are, as a soft mask at the network's
size.

- Detection: OpenCV's stock frontal-face Haar cascade (its weights ship inside
  `opencv-python-headless` 4.x), on the camera luma scaled to `DETECT_WIDTH` pixels wide.
  That finds faces from about 1/12 of the frame's width up and costs about 11 ms, too
  much for every frame, so it runs every `EVERY` frames on a helper thread, beside the
  network, and its answer is used when it is ready. Its input is the network's own input
  picture, scaled to that width: no extra pass over the full frame.
- Tracking: between detections each face is followed by normalised cross-correlation of
  its last detected patch in a window around where it was (`cv2.matchTemplate` at the
  detection scale, about 0.1 ms a face), so a moving head keeps its mask.
- Hysteresis: a face the detector misses (turned head, motion blur) is kept while the
  tracker still finds it well, for at most `HOLD` detections, so the mask does not blink.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import cv2
import cv2.data
import numpy as np

logger = logging.getLogger(__name__)

CASCADE = "haarcascade_frontalface_default.xml"
#: The camera luma is scaled to this width for detection and tracking.
DETECT_WIDTH = 256
#: Frames between two detections (25 fps: about three a second; tracking fills the gaps).
EVERY = 8
#: Detections a face may be missed before it is dropped (while tracking still holds it).
HOLD = 3
#: A track whose best correlation falls under this is lost.
MIN_CORRELATION = 0.45
#: The mask covers the detector's box widened to the whole head: forehead, chin, ears.
MASK_WIDTH, MASK_HEIGHT, MASK_LIFT = 1.25, 1.55, 0.08

Submit = Callable[..., "Future[Any]"]


@dataclass(slots=True)
class Face:
    """A face box in detection pixels, the patch it was found with, and its misses."""

    x: float
    y: float
    w: float
    h: float
    patch: np.ndarray
    missed: int = 0


def load_cascade() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + CASCADE
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV's face cascade {CASCADE} did not load (opencv 4.x needed)")
    return cascade


def detect(cascade: cv2.CascadeClassifier, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in `gray`'s pixels, largest first."""
    found = cascade.detectMultiScale(
        gray, scaleFactor=1.15, minNeighbors=4, minSize=(max(16, gray.shape[1] // 12),) * 2
    )
    boxes = [(int(x), int(y), int(w), int(h)) for x, y, w, h in found]
    return sorted(boxes, key=lambda b: -b[2] * b[3])


class FaceTracker:
    """Faces of one stream. `update` once per frame with the camera luma; `mask` after."""

    def __init__(self, submit: Submit, cascade: cv2.CascadeClassifier, every: int = EVERY) -> None:
        self._submit = submit
        self._cascade = cascade
        self.every = every
        self.faces: list[Face] = []
        self._frame = 0
        self._pending: Future[list[tuple[int, int, int, int]]] | None = None
        self._pending_gray: np.ndarray | None = None
        self._mask: np.ndarray | None = None
        self._mask_key: tuple[Any, ...] | None = None

    def reset(self) -> None:
        self.faces = []
        self._mask_key = None

    def update(self, luma: np.ndarray) -> None:
        """Take in one camera frame's luma, at any size (uint8, or float in 0..255): the
        engine passes the network's input, already small, so this costs no downscale."""
        height, width = luma.shape
        small_h = max(1, round(DETECT_WIDTH * height / width))
        shrink = cv2.INTER_AREA if width > DETECT_WIDTH else cv2.INTER_LINEAR
        gray = cv2.resize(luma, (DETECT_WIDTH, small_h), interpolation=shrink)
        if gray.dtype != np.uint8:
            gray = cv2.convertScaleAbs(gray)
        if self._pending is not None and self._pending.done():
            boxes = self._pending.result() if self._pending.exception() is None else []
            self._merge(boxes, self._pending_gray if self._pending_gray is not None else gray)
            self._pending = self._pending_gray = None
        else:
            self._track(gray)
        if self._pending is None and self._frame % self.every == 0:
            self._pending_gray = gray
            self._pending = self._submit(detect, self._cascade, gray)
        self._frame += 1

    def _merge(self, boxes: list[tuple[int, int, int, int]], gray: np.ndarray) -> None:
        """A detection's answer: matched faces move to it, others count a miss."""
        kept: list[Face] = []
        unmatched = list(boxes)
        for face in self.faces:
            best = max(unmatched, key=lambda b: _overlap(face, b), default=None)
            if best is not None and _overlap(face, best) > 0.2:
                unmatched.remove(best)
                kept.append(_face(gray, best))
            elif face.missed + 1 < HOLD:
                face.missed += 1
                kept.append(face)
        kept.extend(_face(gray, box) for box in unmatched)
        self.faces = kept

    def _track(self, gray: np.ndarray) -> None:
        kept = []
        for face in self.faces:
            ph, pw = face.patch.shape
            margin_x, margin_y = int(pw * 0.4) + 2, int(ph * 0.4) + 2
            x0, y0 = max(0, int(face.x) - margin_x), max(0, int(face.y) - margin_y)
            x1 = min(gray.shape[1], int(face.x) + pw + margin_x)
            y1 = min(gray.shape[0], int(face.y) + ph + margin_y)
            window = gray[y0:y1, x0:x1]
            if window.shape[0] < ph or window.shape[1] < pw:
                continue
            scores = cv2.matchTemplate(window, face.patch, cv2.TM_CCOEFF_NORMED)
            _, best, _, (bx, by) = cv2.minMaxLoc(scores)
            if best < MIN_CORRELATION:
                continue
            face.x, face.y = float(x0 + bx), float(y0 + by)
            kept.append(face)
        self.faces = kept

    def boxes(self, width: int, height: int) -> list[tuple[int, int, int, int]]:
        """The faces as (x, y, w, h) boxes in a `width` x `height` picture of the frame."""
        scale = width / DETECT_WIDTH
        return [
            (round(f.x * scale), round(f.y * scale), round(f.w * scale), round(f.h * scale))
            for f in self.faces
        ]

    def widest(self, width: int) -> float:
        """The widest face's width in a picture of the frame `width` pixels wide (0: none)."""
        return max((f.w for f in self.faces), default=0.0) * width / DETECT_WIDTH

    def mask(self, width: int, height: int) -> np.ndarray | None:
        """A soft mask (float32, height x width, 0..1) over the heads, or None without faces."""
        if not self.faces:
            return None
        scale = width / DETECT_WIDTH
        key = (width, height, *((round(f.x), round(f.y), round(f.w)) for f in self.faces))
        if key == self._mask_key and self._mask is not None:
            return self._mask
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        mask = np.zeros((height, width), np.float32)
        for face in self.faces:
            cx = (face.x + face.w / 2) * scale
            cy = (face.y + face.h / 2 - MASK_LIFT * face.h) * scale
            rx = face.w * scale * MASK_WIDTH / 2
            ry = face.h * scale * MASK_HEIGHT / 2
            r2 = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2
            # 1 inside 70% of the ellipse, falling smoothly to 0 at its edge
            np.maximum(mask, np.clip((1.0 - r2) / 0.51, 0.0, 1.0) ** 0.7, out=mask)
        self._mask, self._mask_key = mask, key
        return mask


def _face(gray: np.ndarray, box: tuple[int, int, int, int]) -> Face:
    x, y, w, h = box
    return Face(float(x), float(y), float(w), float(h), gray[y : y + h, x : x + w].copy())


def _overlap(face: Face, box: tuple[int, int, int, int]) -> float:
    """Intersection over union of a face and a box."""
    x, y, w, h = box
    ix = max(0.0, min(face.x + face.w, x + w) - max(face.x, x))
    iy = max(0.0, min(face.y + face.h, y + h) - max(face.y, y))
    inter = ix * iy
    return inter / (face.w * face.h + w * h - inter)
