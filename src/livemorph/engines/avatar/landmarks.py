"""Where the face's parts are in a portrait: found once per image, with models that ship
inside OpenCV.

1. OpenCV 4.x's Haar cascades (`haarcascade_frontalface_default.xml`, then `..._alt2.xml`
   on an equalised picture) find the face; `haarcascade_eye.xml` inside its upper part
   finds the eyes, each centred on its darkest spot (the iris). A missing eye is mirrored
   from the other across the face box, both missing ones come from the box.
2. The eyes fix a face frame: origin between them, x along them, unit the distance
   between them (`Landmarks.scale`). A template of the other points in that frame
   (anthropometric means, checked on the astronaut photo) is then moved by what the
   picture shows, in a crop of the face resampled to that frame:
   - the lips by colour: Lab a* (redness) above an Otsu threshold within the mouth's
     search box, kept where it is mouth-shaped; their extent gives the corners and the
     outer lip lines. Inside the lips at their middle, a band that is not red (teeth or
     an open mouth) puts the lip line at its bottom, the top of the lower lip, and is
     kept as `gap`; without one, the lip line is the darkest row between the lips;
   - without plausible lips (a grey or drawn picture): teeth, a bright band between two
     dark lines across the mouth's middle, put the lip line at the lower one; else the
     lip line is the darkest row below the nose;
   - each brow is the darkest row band above its eye; the chin the strongest step to
     darker below the mouth, near where the template expects it.

`haarcascade_smile.xml` was tried for the mouth and left out: on the astronaut it fires
on the hair and the suit as often as on the mouth. No `mcs_mouth` cascade ships with 4.x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import overload

import cv2
import cv2.data
import numpy as np

FACE_CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_frontalface_alt2.xml")
EYE_CASCADE = "haarcascade_eye.xml"
#: Detection runs on the portrait scaled to at most this many pixels on its longer side.
DETECT_SIDE = 1024
#: Eye centres in a frontalface_default box, as shares of its width and height.
EYE_IN_BOX = ((0.30, 0.385), (0.70, 0.385))
#: The face frame's template: (u, v) in eye distances from the point between the eyes,
#: u towards the picture's right, v down. Checked on the astronaut photo (a smile).
TEMPLATE: dict[str, tuple[float, float]] = {
    "left_brow": (-0.52, -0.30),
    "right_brow": (0.52, -0.30),
    "nose": (0.0, 0.60),
    "mouth": (0.0, 1.02),
    "mouth_left": (-0.45, 1.0),
    "mouth_right": (0.45, 1.0),
    "upper_lip": (0.0, 0.90),
    "lower_lip": (0.0, 1.20),
    "chin": (0.0, 1.78),
    "jaw_left": (-0.95, 1.35),
    "jaw_right": (0.95, 1.35),
}
#: A traced lip line ends this far out at most (eye distances from the middle).
MAX_MOUTH_HALF = 0.55
#: The face crop's resolution: pixels per eye distance.
CROP_UNIT = 64


class NoFaceFound(ValueError):
    """The portrait shows no face the detector can find."""


@dataclass(frozen=True, slots=True)
class Landmarks:
    """Face points in a picture's pixels, each an (x, y) pair; "left" is the picture's left.

    `mouth` is the lip line's middle: the top of the lower lip, where the mouth opens.
    `gap` is how far the lips are apart there at rest (teeth or an open mouth showing),
    in eye distances. `lips_found` says whether the lips were seen or only templated.
    """

    left_eye: tuple[float, float]
    right_eye: tuple[float, float]
    left_brow: tuple[float, float]
    right_brow: tuple[float, float]
    nose: tuple[float, float]
    mouth: tuple[float, float]
    mouth_left: tuple[float, float]
    mouth_right: tuple[float, float]
    upper_lip: tuple[float, float]
    lower_lip: tuple[float, float]
    chin: tuple[float, float]
    jaw_left: tuple[float, float]
    jaw_right: tuple[float, float]
    gap: float = 0.0
    lips_found: bool = False

    @property
    def scale(self) -> float:
        """The distance between the eye centres, in pixels."""
        return math.dist(self.left_eye, self.right_eye)

    @property
    def roll(self) -> float:
        """The eye line's angle in radians (positive: the right eye lower)."""
        (lx, ly), (rx, ry) = self.left_eye, self.right_eye
        return math.atan2(ry - ly, rx - lx)

    @property
    def points(self) -> dict[str, tuple[float, float]]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("gap", "lips_found")
        }

    def frame(self) -> FaceFrame:
        return FaceFrame.from_eyes(self.left_eye, self.right_eye)

    def face_coords(self) -> dict[str, tuple[float, float]]:
        """Every point in the face frame (eye distances from between the eyes)."""
        frame = self.frame()
        return {name: frame.to_face(*p) for name, p in self.points.items()}

    def transformed(self, matrix: np.ndarray) -> Landmarks:
        """The points under a 2x3 affine map (a uniform scale keeps `gap` as it is)."""
        moved = {}
        for name, (x, y) in self.points.items():
            nx, ny = matrix @ np.array([x, y, 1.0])
            moved[name] = (float(nx), float(ny))
        return Landmarks(**moved, gap=self.gap, lips_found=self.lips_found)


@dataclass(frozen=True, slots=True)
class FaceFrame:
    """A face's own coordinates: origin between the eyes, unit the eye distance."""

    ox: float
    oy: float
    scale: float
    cos: float
    sin: float

    @classmethod
    def from_eyes(cls, left: tuple[float, float], right: tuple[float, float]) -> FaceFrame:
        dx, dy = right[0] - left[0], right[1] - left[1]
        scale = math.hypot(dx, dy)
        return cls(
            (left[0] + right[0]) / 2, (left[1] + right[1]) / 2, scale, dx / scale, dy / scale
        )

    def to_face(self, x: float, y: float) -> tuple[float, float]:
        px, py = x - self.ox, y - self.oy
        return (
            (px * self.cos + py * self.sin) / self.scale,
            (-px * self.sin + py * self.cos) / self.scale,
        )

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        return (
            self.ox + self.scale * (u * self.cos - v * self.sin),
            self.oy + self.scale * (u * self.sin + v * self.cos),
        )

    def crop_matrix(self, unit: int, u0: float, v0: float) -> np.ndarray:
        """The 2x3 map from a crop's pixels (`unit` per eye distance, its corner at face
        point (u0, v0)) to the picture's pixels: for `cv2.warpAffine` with WARP_INVERSE_MAP."""
        k = self.scale / unit
        matrix = np.array([[k * self.cos, -k * self.sin, 0.0], [k * self.sin, k * self.cos, 0.0]])
        matrix[:, 2] = np.array(self.to_image(u0, v0))
        return matrix


_cascades: dict[str, cv2.CascadeClassifier] = {}


def _cascade(name: str) -> cv2.CascadeClassifier:
    if name not in _cascades:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + name)
        if cascade.empty():
            raise RuntimeError(f"OpenCV's cascade {name} did not load (opencv 4.x needed)")
        _cascades[name] = cascade
    return _cascades[name]


def as_rgb(image: np.ndarray) -> np.ndarray:
    """Any uint8 picture (grey, RGB, RGBA) as a contiguous H x W x 3 RGB array."""
    if image.dtype != np.uint8:
        raise ValueError(f"the portrait must be 8-bit, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"the portrait must be H x W x 3 RGB, got shape {image.shape}")
    if image.shape[2] == 1:
        return cv2.cvtColor(image[..., 0], cv2.COLOR_GRAY2RGB)
    return np.ascontiguousarray(image[..., :3])


def find_face(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """The main face box (x, y, w, h) in a grey picture, or None: the detection with the
    most overlapping hits, weighed a little by size (on the whole astronaut photo the
    largest box is a fold of the suit, with 11 hits to the face's 80)."""
    min_side = max(24, min(gray.shape) // 12)
    for name, picture in zip(FACE_CASCADES, (gray, cv2.equalizeHist(gray)), strict=True):
        boxes, hits = _cascade(name).detectMultiScale2(
            picture, scaleFactor=1.05, minNeighbors=5, minSize=(min_side, min_side)
        )
        if len(boxes):
            best = max(range(len(boxes)), key=lambda i: int(hits[i]) * math.sqrt(boxes[i][2]))
            x, y, w, h = (int(v) for v in boxes[best])
            return x, y, w, h
    return None


def find_eyes(
    gray: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[tuple[float, float], tuple[float, float]]:
    """The eye centres in a face box: the eye cascade's, else mirrored or templated."""
    x, y, w, h = box
    expected = [(x + ex * w, y + ey * h) for ex, ey in EYE_IN_BOX]
    top, bottom = max(0, y), min(gray.shape[0], y + int(0.62 * h))
    region = gray[top:bottom, x : x + w]
    found = _cascade(EYE_CASCADE).detectMultiScale(
        region,
        scaleFactor=1.05,
        minNeighbors=3,
        minSize=(max(8, w // 9),) * 2,
        maxSize=(max(9, int(w / 2.4)),) * 2,
    )
    centres = [(x + ex + ew / 2, top + ey + eh / 2) for ex, ey, ew, eh in found]
    chosen: list[tuple[float, float] | None] = []
    for want in expected:
        near = [c for c in centres if math.dist(c, want) < 0.16 * w]
        chosen.append(min(near, key=lambda c: math.dist(c, want)) if near else None)
    left, right = chosen
    if left is not None and right is not None and not 0.28 * w < right[0] - left[0] < 0.62 * w:
        left = right = None
    centre_x = x + w / 2
    if left is None and right is not None:
        left = (2 * centre_x - right[0], right[1])
    elif right is None and left is not None:
        right = (2 * centre_x - left[0], left[1])
    elif left is None or right is None:
        left, right = expected
    return _iris(gray, left, w), _iris(gray, right, w)


def _iris(gray: np.ndarray, centre: tuple[float, float], face_width: int) -> tuple[float, float]:
    """An eye centre moved to the darkest blob near it (the iris), if there is one."""
    rx, ry = max(2, int(0.07 * face_width)), max(2, int(0.045 * face_width))
    cx, cy = round(centre[0]), round(centre[1])
    x0, y0 = max(0, cx - rx), max(0, cy - ry)
    window = gray[y0 : cy + ry + 1, x0 : cx + rx + 1]
    if window.size < 9:
        return centre
    sigma = max(1.0, face_width / 60)
    blurred = cv2.GaussianBlur(window.astype(np.float32), (0, 0), sigma)
    # weigh towards the detected centre, so a brow or lash shadow at the edge does not win
    ys, xs = np.mgrid[0 : window.shape[0], 0 : window.shape[1]]
    falloff = ((xs + x0 - centre[0]) / rx) ** 2 + ((ys + y0 - centre[1]) / ry) ** 2
    spread = float(blurred.max() - blurred.min()) + 1.0
    _, _, (bx, by), _ = cv2.minMaxLoc(blurred + 0.35 * spread * falloff.astype(np.float32))
    return float(x0 + bx), float(y0 + by)


def _smooth(profile: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    padded = np.pad(profile.astype(np.float64), radius, mode="edge")
    return np.convolve(padded, kernel / kernel.sum(), mode="valid")


@dataclass(slots=True)
class _Crop:
    """The face resampled to its own frame: `unit` pixels per eye distance, from (u0, v0)."""

    rgb: np.ndarray
    lab: np.ndarray
    unit: int
    u0: float
    v0: float

    def row(self, v: float) -> int:
        return round((v - self.v0) * self.unit)

    def col(self, u: float) -> int:
        return round((u - self.u0) * self.unit)

    @overload
    def v(self, row: float) -> float: ...
    @overload
    def v(self, row: np.ndarray) -> np.ndarray: ...
    def v(self, row: float | np.ndarray) -> float | np.ndarray:
        return self.v0 + row / self.unit

    def u(self, col: float) -> float:
        return self.u0 + col / self.unit


def _mean_point(points: list[tuple[float, float]]) -> tuple[float, float]:
    return float(np.mean([p[0] for p in points])), float(np.mean([p[1] for p in points]))


def _lips(crop: _Crop) -> dict[str, tuple[float, float]] | None:
    """The lips by colour, in face coordinates, or None when nothing lip-like is there."""
    r0, r1 = crop.row(0.68), crop.row(1.45)
    c0, c1 = crop.col(-0.8), crop.col(0.8)
    red: np.ndarray = crop.lab[r0:r1, c0:c1, 1].astype(np.uint8)
    red = cv2.GaussianBlur(red, (3, 3), 0)
    _, mask = cv2.threshold(red, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    spread = float(np.percentile(red, 95)) - float(np.percentile(red, 20))
    if spread < 6:  # a grey picture or colourless lips: no colour evidence
        return None
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    count, labels, stats, centroids = cv2.connectedComponentsWithStats(mask)
    unit = crop.unit
    keep = np.zeros(count, bool)
    for index in range(1, count):
        cu = crop.u(c0 + centroids[index][0])
        cv_ = crop.v(r0 + centroids[index][1])
        width = stats[index, cv2.CC_STAT_WIDTH] / unit
        if abs(cu) < 0.35 and 0.78 < cv_ < 1.35 and width > 0.15:
            keep[index] = True
    if not keep.any():
        return None
    lips = keep[labels]
    rows, cols = np.nonzero(lips)
    left, right = crop.u(c0 + cols.min()), crop.u(c0 + cols.max())
    top_row, bottom_row = rows.min(), rows.max()
    width = right - left
    height = (bottom_row - top_row) / unit
    if not (0.45 < width < 1.5 and 0.1 < height < 0.75 and abs(left + right) < 0.5 * width):
        return None
    # the middle columns: lip rows, and the band between the lips that is not lip
    mid = slice(crop.col(-0.12) - c0, crop.col(0.12) - c0 + 1)
    share = lips[:, mid].mean(axis=1)
    luma = crop.lab[r0:r1, c0:c1, 0][:, mid].mean(axis=1)
    span = np.nonzero(share > 0.5)[0]
    if len(span) < 3:
        return None
    top, bottom = int(span[0]), int(span[-1])
    inside = share[top : bottom + 1] < 0.3
    gap = 0.0
    if inside.any():
        holes = np.nonzero(inside)[0] + top
        seam = int(holes[-1]) + 1
        gap = (int(holes[-1]) - int(holes[0]) + 1) / unit
    else:
        lo, hi = top + (bottom - top) // 4, bottom - (bottom - top) // 4
        profile = _smooth(luma, 1.0)
        seam = lo + int(np.argmin(profile[lo : hi + 1]))
    seam_v = crop.v(r0 + seam)

    def corner(column: int) -> tuple[float, float]:
        ys = np.nonzero(lips[:, column])[0]
        return crop.u(c0 + column), crop.v(r0 + float(ys.mean()))

    band = max(1, int(0.04 * unit))
    left_pts = [corner(c) for c in range(cols.min(), cols.min() + band) if lips[:, c].any()]
    right_pts = [
        corner(c) for c in range(cols.max() - band + 1, cols.max() + 1) if lips[:, c].any()
    ]
    return {
        "mouth": (0.0, seam_v),
        "mouth_left": _mean_point(left_pts),
        "mouth_right": _mean_point(right_pts),
        "upper_lip": (0.0, crop.v(r0 + top)),
        "lower_lip": (0.0, crop.v(r0 + bottom)),
        "gap": (gap, 0.0),
    }


def _dark_band(crop: _Crop, u0: float, u1: float, v0: float, v1: float, prior: float) -> float:
    """The face v of the darkest band between v0 and v1 over columns u0..u1: the local
    minimum of the row means that is deepest against the rows around it, weighed by
    nearness to `prior` (so the hairline above a brow does not win); `prior` if none."""
    r0, r1 = crop.row(v0), crop.row(v1)
    rows = _smooth(crop.lab[r0:r1, crop.col(u0) : crop.col(u1), 0].mean(axis=1), crop.unit / 40)
    reach = max(2, int(0.12 * crop.unit))
    best, best_score = prior, 0.0
    for r in range(1, len(rows) - 1):
        if not rows[r] <= rows[r - 1] or not rows[r] <= rows[r + 1]:
            continue
        depth = min(rows[max(0, r - reach) : r].max(), rows[r + 1 : r + reach + 1].max()) - rows[r]
        v = crop.v(r0 + r)
        score = depth * math.exp(-0.5 * ((v - prior) / 0.12) ** 2)
        if score > best_score:
            best, best_score = v, score
    return best if best_score > 3.0 else prior


def _teeth(crop: _Crop) -> tuple[float, float] | None:
    """Without colour: teeth between the lips, seen as a bright band between two dark
    lines across the middle of the mouth (as bright as the brighter skin above it, and
    30 levels brighter than both lines). The lower line is the lip line: its v and the
    band's height, or None."""
    r0, r1 = crop.row(0.55), crop.row(1.3)
    rows = _smooth(crop.lab[r0:r1, crop.col(-0.15) : crop.col(0.15), 0].mean(axis=1), 1.0)
    v = crop.v(r0 + np.arange(len(rows)))
    skin = float(np.percentile(rows[v < 0.9], 75))
    lows = [
        r
        for r in range(1, len(rows) - 1)
        if v[r] > 0.85 and rows[r] <= rows[r - 1] and rows[r] <= rows[r + 1]
    ]
    # the first dark line under a bright band, from the top: the lip line under the
    # upper teeth (a line further down is the lower lip's shadow)
    for lower_index, lower in enumerate(lows):
        for upper in reversed(lows[:lower_index]):
            if not 0.06 <= v[lower] - v[upper] <= 0.3:
                continue
            peak = float(rows[upper:lower].max())
            if peak >= skin - 5.0 and peak - max(rows[upper], rows[lower]) > 30.0:
                return float(v[lower]), float(v[lower] - v[upper])
    return None


def _follow_line(crop: _Crop, seam: float, side: int) -> tuple[float, float] | None:
    """Follow the dark lip line from the middle of the mouth towards one side, a column at
    a time, each step to the darkest of the three rows nearest; the corner is where it is
    no longer darker than the skin around it, and at most `MAX_MOUTH_HALF` out (a drawn
    smile's crease carries on from the corner). None if it ends before a quarter of an
    eye distance (the template's corner stays)."""
    luma = cv2.GaussianBlur(crop.lab[..., 0].astype(np.float32), (0, 0), 1.0)
    row = crop.row(seam)
    reach = max(3, int(0.15 * crop.unit))
    corner = None
    misses = 0
    for col in range(crop.col(0.0), crop.col(MAX_MOUTH_HALF * side), side):
        column = luma[row - reach : row + reach + 1, col]
        if column.size < 2 * reach + 1:
            break
        row += int(np.argmin(luma[row - 1 : row + 2, col])) - 1
        if float(np.median(column)) - float(luma[row, col]) > 8.0:
            corner, misses = (crop.u(col), crop.v(row)), 0
        else:
            misses += 1
            if misses > max(2, crop.unit // 20):
                break
    if corner is None or abs(corner[0]) < 0.25:
        return None
    return corner


def _chin(crop: _Crop, below: float) -> float:
    """The first strong step to darker going down the middle, near the template's chin:
    the shadow under the chin, not the collar further down."""
    r0, r1 = crop.row(below), crop.row(2.3)
    rows = _smooth(crop.lab[r0:r1, crop.col(-0.2) : crop.col(0.2), 0].mean(axis=1), 1.5)
    step = 3
    drop = np.zeros_like(rows)
    drop[step:-step] = rows[: -2 * step] - rows[2 * step :]
    v = crop.v(r0 + np.arange(len(rows)))
    score = np.maximum(drop, 0.0) * np.exp(-0.5 * ((v - TEMPLATE["chin"][1]) / 0.22) ** 2)
    if score.max() <= 8.0:  # no clear edge: the template's chin
        return TEMPLATE["chin"][1]
    strong = 0.35 * score.max()
    for r in range(1, len(score) - 1):
        if score[r] >= strong and score[r] >= score[r - 1] and score[r] >= score[r + 1]:
            return float(v[r])
    return float(v[int(np.argmax(score))])


def find_landmarks(image: np.ndarray) -> Landmarks:
    """The face's landmarks in `image` (RGB uint8, any size); raises `NoFaceFound`."""
    rgb = as_rgb(image)
    shrink = min(1.0, DETECT_SIDE / max(rgb.shape[:2]))
    small = (
        cv2.resize(rgb, None, fx=shrink, fy=shrink, interpolation=cv2.INTER_AREA)
        if shrink < 1.0
        else rgb
    )
    gray = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    box = find_face(gray)
    if box is None:
        raise NoFaceFound("no face found in the portrait image")
    left_eye, right_eye = find_eyes(gray, box)
    frame = FaceFrame.from_eyes(left_eye, right_eye)
    u0, v0, u1, v1 = -2.0, -1.2, 2.0, 2.6
    unit = CROP_UNIT
    size = (round((u1 - u0) * unit), round((v1 - v0) * unit))
    crop_rgb = cv2.warpAffine(
        small,
        frame.crop_matrix(unit, u0, v0),
        size,
        flags=cv2.WARP_INVERSE_MAP | cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_REPLICATE,
    )
    crop = _Crop(crop_rgb, cv2.cvtColor(crop_rgb, cv2.COLOR_RGB2LAB), unit, u0, v0)

    points = dict(TEMPLATE)
    lips = _lips(crop)
    gap = 0.0
    if lips is not None:
        gap = lips.pop("gap")[0]
        points.update(lips)
    else:
        teeth = _teeth(crop)
        if teeth is not None:
            seam, gap = teeth
        else:
            seam = _dark_band(crop, -0.25, 0.25, 0.8, 1.3, TEMPLATE["mouth"][1])
        shift = seam - TEMPLATE["mouth"][1]
        for name in ("mouth", "mouth_left", "mouth_right", "upper_lip", "lower_lip"):
            u, v = TEMPLATE[name]
            points[name] = (u, v + shift)
        # the corners where the lip line, followed outwards, fades
        for name, side in (("mouth_left", -1), ("mouth_right", 1)):
            if (corner := _follow_line(crop, seam, side)) is not None:
                points[name] = corner
    for brow, (eu, _) in (("left_brow", (-0.5, 0.0)), ("right_brow", (0.5, 0.0))):
        points[brow] = (eu, _dark_band(crop, eu - 0.2, eu + 0.2, -0.6, -0.1, -0.28))
    chin_v = _chin(crop, points["lower_lip"][1] + 0.25)
    points["chin"] = (0.0, chin_v)
    jaw_v = 0.5 * (points["mouth"][1] + chin_v) + 0.05
    points["jaw_left"] = (TEMPLATE["jaw_left"][0], jaw_v)
    points["jaw_right"] = (TEMPLATE["jaw_right"][0], jaw_v)

    back = 1.0 / shrink
    placed = {name: frame.to_image(u, v) for name, (u, v) in points.items()}
    placed["left_eye"], placed["right_eye"] = left_eye, right_eye
    return Landmarks(
        **{name: (x * back, y * back) for name, (x, y) in placed.items()},
        gap=float(gap),
        lips_found=lips is not None,
    )
