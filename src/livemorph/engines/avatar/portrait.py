"""A portrait of any size and shape fitted to the output frame, face first.

The face is put where a presenter's is in a 16:9 shot: eyes on a line `EYES_AT` of the
way down, centred across, and scaled so the eye distance is `EYE_DISTANCE` of the
frame's height (the head then takes about half of it), but never upscaled more than
`MAX_UPSCALE` (a small photo stays sharp rather than large) nor made smaller than
`MIN_CONTAIN` of a whole-picture fit. The picture is then moved as little as needed so it
covers the frame where it can. What it does not cover (the sides of a 3:4 photo, say)
shows the same photo scaled to cover, blurred and dimmed, and the photo's own edges fade
into it over `FEATHER` of the frame's height.
"""

from __future__ import annotations

import cv2
import numpy as np

from .landmarks import Landmarks

EYE_DISTANCE = 0.16
EYES_AT = 0.39
MAX_UPSCALE = 2.5
MIN_CONTAIN = 0.75
FEATHER = 0.03
#: The background's brightness, and the blur as a share of the frame's height.
BACKDROP_GAIN = 0.55
BACKDROP_BLUR = 0.08


def placement(
    image_size: tuple[int, int], landmarks: Landmarks, width: int, height: int
) -> np.ndarray:
    """The 2x3 affine map from the portrait's pixels to the frame's."""
    w, h = image_size
    contain = min(width / w, height / h)
    scale = EYE_DISTANCE * height / landmarks.scale
    scale = max(min(scale, max(MAX_UPSCALE, contain)), MIN_CONTAIN * contain)
    ex = 0.5 * (landmarks.left_eye[0] + landmarks.right_eye[0])
    ey = 0.5 * (landmarks.left_eye[1] + landmarks.right_eye[1])
    tx = _offset(width / 2 - scale * ex, scale * w, width)
    ty = _offset(EYES_AT * height - scale * ey, scale * h, height)
    return np.array([[scale, 0.0, tx], [0.0, scale, ty]])


def _offset(wanted: float, extent: float, frame: float) -> float:
    """The nearest offset to `wanted` that covers the frame (a larger picture) or keeps
    the whole picture inside it (a smaller one)."""
    if extent >= frame:
        return float(np.clip(wanted, frame - extent, 0.0))
    return float(np.clip(wanted, 0.0, frame - extent))


def compose(image: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """The portrait placed by `matrix` (a scale and a shift) on a `width` x `height` RGB
    frame. A picture made smaller is first shrunk by area averaging, so a large photo does
    not alias."""
    h, w = image.shape[:2]
    scale = float(matrix[0, 0])
    x0, y0 = float(matrix[0, 2]), float(matrix[1, 2])
    if scale < 1.0:
        source = cv2.resize(
            image,
            (max(1, round(w * scale)), max(1, round(h * scale))),
            interpolation=cv2.INTER_AREA,
        )
        shift = np.array([[1.0, 0.0, x0], [0.0, 1.0, y0]])
        placed = cv2.warpAffine(
            source, shift, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
    else:
        placed = cv2.warpAffine(
            image, matrix, (width, height), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
        )
    x1, y1 = x0 + scale * w, y0 + scale * h
    if x0 <= 0.5 and y0 <= 0.5 and x1 >= width - 0.5 and y1 >= height - 0.5:
        return placed
    # the uncovered part: the photo scaled to cover, blurred and dimmed (made at 1/16 size)
    cover = max(width / w, height / h) / 16
    small_w, small_h = max(8, width // 16), max(8, height // 16)
    shrunk = cv2.resize(
        image, (max(1, round(w * cover)), max(1, round(h * cover))), interpolation=cv2.INTER_AREA
    )
    cx = float(np.clip((small_w - shrunk.shape[1]) / 2, small_w - shrunk.shape[1], 0.0))
    cy = float(np.clip((small_h - shrunk.shape[0]) / 2, small_h - shrunk.shape[0], 0.0))
    backdrop = cv2.warpAffine(
        shrunk,
        np.array([[1.0, 0.0, cx], [0.0, 1.0, cy]]),
        (small_w, small_h),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REFLECT,
    )
    sigma = max(1.0, BACKDROP_BLUR * height / 16)
    backdrop = cv2.GaussianBlur(backdrop, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
    backdrop = cv2.resize(backdrop, (width, height), interpolation=cv2.INTER_CUBIC)
    feather = max(2.0, FEATHER * height)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    across = np.clip(np.minimum(xs - x0, x1 - xs) / feather, 0.0, 1.0)
    down = np.clip(np.minimum(ys - y0, y1 - ys) / feather, 0.0, 1.0)
    # edges that touch the frame's border need no fade
    if x0 <= 0.5:
        across = np.where(xs < width / 2, 1.0, across)
    if x1 >= width - 0.5:
        across = np.where(xs >= width / 2, 1.0, across)
    if y0 <= 0.5:
        down = np.where(ys < height / 2, 1.0, down)
    if y1 >= height - 0.5:
        down = np.where(ys >= height / 2, 1.0, down)
    alpha = (down[:, None] * across[None, :])[..., None]
    mixed = placed * alpha + backdrop * BACKDROP_GAIN * (1.0 - alpha)
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)
