"""Edge-aware upsampling: the style comes from the network's small picture, the structure
from the camera at full resolution.

The network paints at a sixteenth of the output's pixels or less, so a plain bilinear
upscale blurs every edge it drew, and eyes and mouths with them. A guided filter (He et
al., "Guided Image Filtering"; the fast variant and its learned cousins in HDRNet and Deep
Guided Filter) fits the stylised picture, window by window at the small size, as a linear
function of the camera's luma: `styled ~ a * camera + b`. The coefficients are smooth,
so they upsample without harm, and applied to the full-resolution camera luma they draw
the camera's own edges, at full sharpness, in the style's local colours and contrast.
What the fit cannot explain (the brush strokes and textures the network invented) is
kept as a residual and added back at the network's resolution, so the style's texture
survives; at the small size, output equals the network's picture.

Two knobs protect structure where it matters:
- `floor`: a lower bound on |a| (a map, so it can be raised inside faces): where a style
  flattened the picture (|a| near 0), the camera's features come back at that contrast
  around the style's local mean;
- `texture`: how much of the residual (invented texture) shows (a map too: lowered in
  faces, where brush strokes across an eye read as damage).

Chroma gets the same treatment at half resolution (yuv420p), guided by the camera luma at
that size, with no floor: colour edges land on the camera's edges instead of bleeding.

Everything is in video-range YUV, float32, on OpenCV: at 1280x704 output from 224x124 the
fits cost about 2.5 ms and the full-size passes 6 ms (4.4 of them for luma) on one core of
the 2-core bench machine (bench/engine.py --parts trace), against 13 ms for the network.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Window radius, in network pixels (1: 3x3, about 17 output pixels at 224 wide).
RADIUS = 1
#: Regularisation of the fit, in squared luma levels: windows whose camera luma varies
#: less than about sqrt(EPS) levels are treated as flat (a -> 0, the style's mean shows).
EPS = 60.0
#: Camera detail within this many luma levels of the small picture is taken for sensor
#: noise and left out (soft threshold).
CORING = 4.0
#: |a| is capped here, so a style that stretches contrast cannot amplify camera noise.
MAX_GAIN = 2.5

#: BT.601 video range, as swscale's rgb24 -> yuv420p: rows give Y, U, V from RGB in 0..1.
RGB_TO_YUV = np.array(
    [[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]],
    np.float32,
)
YUV_OFFSET = np.array([16.0, 128.0, 128.0], np.float32)


def planar_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """Planar RGB (3, h, w) in 0..1 to planar video-range YUV (3, h, w), float32."""
    yuv = np.tensordot(RGB_TO_YUV, rgb, axes=1)
    yuv += YUV_OFFSET[:, None, None]
    return yuv


def _box(image: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    return cv2.boxFilter(image, -1, (size, size), borderType=cv2.BORDER_REFLECT)


def fit(
    guide: np.ndarray,
    target: np.ndarray,
    *,
    radius: int = RADIUS,
    eps: float = EPS,
    floor: np.ndarray | float = 0.0,
    texture: np.ndarray | float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (gain, offset) at the small size, such that `gain * guide + offset`
    reproduces `target` there, with structure floored and texture scaled as asked.

    `guide` and `target` are float32 (h, w); `floor` and `texture` scalars or (h, w) maps.
    """
    mean_g = _box(guide, radius)
    mean_t = _box(target, radius)
    var_g = _box(guide * guide, radius) - mean_g * mean_g
    cov = _box(guide * target, radius) - mean_g * mean_t
    gain = cov / (np.maximum(var_g, 0.0) + np.float32(eps))
    if np.any(floor):
        magnitude = np.clip(np.abs(gain), floor, MAX_GAIN)
        gain = np.where(gain < 0, -magnitude, magnitude).astype(np.float32)
    else:
        np.clip(gain, -MAX_GAIN, MAX_GAIN, out=gain)
    offset = mean_t - gain * mean_g
    gain = _box(gain, radius)
    offset = _box(offset, radius)
    # what the linear fit does not explain: the network's own strokes and texture
    residual = target - (gain * guide + offset)
    if isinstance(texture, np.ndarray):
        offset += texture * residual
    else:
        offset += np.float32(texture) * residual
    return gain, offset


def apply(
    gain: np.ndarray,
    offset: np.ndarray,
    guide: np.ndarray,
    full: np.ndarray,
    out: np.ndarray,
    coring: float = CORING,
    keep: np.ndarray | None = None,
) -> None:
    """Write the full-size plane: `out` (uint8, H x W) = up(gain * guide + offset) +
    up(gain) * cored(full - up(guide)), rounded and saturated.

    `guide` is the small float32 luma the coefficients were fitted on, `full` the camera
    luma at `out`'s size (uint8). The fine detail the small guide lacks is shrunk towards
    zero by `coring` levels first: differences within the noise level are sensor noise,
    and bringing them back would make a still picture shimmer. Where `keep` (a small
    float32 mask like `guide`, 0..1) is set, that fine detail is kept instead: in faces,
    the eyes' and lips' faint lines matter more than a little noise.
    """
    height, width = out.shape
    size = (width, height)
    fitted = cv2.resize(gain * guide + offset, size, interpolation=cv2.INTER_LINEAR)
    gain_up = cv2.resize(gain, size, interpolation=cv2.INTER_LINEAR)
    detail: np.ndarray = cv2.subtract(
        full, cv2.resize(guide, size, interpolation=cv2.INTER_LINEAR), dtype=cv2.CV_32F
    )
    if coring > 0:
        shrunk = np.clip(detail, -coring, coring)
        detail -= shrunk
        if keep is not None:
            _keep_detail(detail, shrunk, keep)
    cv2.multiply(detail, gain_up, dst=detail)
    out[...] = cv2.add(fitted, detail, dtype=cv2.CV_8U)


def _keep_detail(detail: np.ndarray, shrunk: np.ndarray, keep: np.ndarray) -> None:
    """Add back `keep` (upsampled) times the cored part, inside `keep`'s bounding box only."""
    rows, cols = np.nonzero(keep)
    if rows.size == 0:
        return
    height, width = detail.shape
    sy, sx = height / keep.shape[0], width / keep.shape[1]
    y0, y1 = int(rows.min() * sy), min(height, int((rows.max() + 1) * sy))
    x0, x1 = int(cols.min() * sx), min(width, int((cols.max() + 1) * sx))
    crop = keep[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    weight = cv2.resize(crop, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    detail[y0:y1, x0:x1] += weight * shrunk[y0:y1, x0:x1]
