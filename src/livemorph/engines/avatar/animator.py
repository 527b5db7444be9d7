"""The animator seam, and the built-in one: a portrait warped on a mesh around the face.

`Animator` is what turns a portrait and a moment's `Drive` (the mouth the voice asks
for, the expression, a blink, the head's pose, and the raw audio for a model that wants
it) into a frame. `WarpAnimator` is the built-in one; a learned lip-sync model would be
another (the engine's `model=DIR` option is reserved for loading one).

`WarpAnimator` works on the portrait's yuv420p planes, made once per image, and per
frame moves pixels only inside a box around the head (`Rig.box`): every pixel outside
it is a copy of the portrait. Inside, one backward map says where each output pixel
comes from. It is built on a coarse grid of nodes (`Rig.step` pixels apart, about 1/24
of the eye distance), as three warps composed from the output back to the portrait:

1. the head's pose (tilt, shift, nod) under a soft head mask, so the shoulders and
   background stay put;
2. the expression (smile: mouth corners up and out, cheeks up; brows raised or knitted;
   eyes widened or narrowed; mouth width and rounding) and the blink (the skin above each
   eye slides down over it to the lower lid's line), as smooth bumps around landmarks;
3. the mouth opening: under the lip line everything (lower lip, chin, jaw) moves down by
   the opening and the upper lip a little up; between them the lip line is stretched,
   and the mouth's inside is painted over it (`_paint_mouth`): dark, soft-edged,
   redder towards the tongue, with upper teeth when the portrait showed none. Beyond the
   mouth corners the cheeks stretch instead of parting, and under the chin the neck
   takes up the jaw's drop.

The grid's displacement is scaled up to the box's pixels (bilinear) and applied with
`cv2.remap` to the Y plane and, at half size, to U and V. The cost is one remap of the
head box whatever the audio says: the work per frame is the same in speech and silence.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, overload

import cv2
import numpy as np
from av import VideoFrame

from .landmarks import FaceFrame, Landmarks
from .speech import Mouth


@dataclass(frozen=True, slots=True)
class Expression:
    """How the face looks apart from speech. Values are about -1..1 (energy 0..2)."""

    #: mouth corners up (1) or down (-1), cheeks with them
    smile: float = 0.0
    #: brows raised (1) or knitted and lowered (-1)
    brow: float = 0.0
    #: eyes wide (1) or narrowed (-1)
    eyes: float = 0.0
    #: how often the head nods, 0 (never) to 1 (every two seconds or so)
    nod: float = 0.0
    #: head motion and mouth movement, 1 normal
    energy: float = 1.0
    #: the mouth open at rest (surprise), 0..1
    jaw: float = 0.0

    NAMES: ClassVar[tuple[str, ...]] = ("smile", "brow", "eyes", "nod", "energy", "jaw")
    LIMITS: ClassVar[dict[str, tuple[float, float]]] = {
        "smile": (-1.0, 1.0),
        "brow": (-1.0, 1.0),
        "eyes": (-1.0, 1.0),
        "nod": (0.0, 1.0),
        "energy": (0.0, 2.0),
        "jaw": (0.0, 1.0),
    }

    def values(self) -> np.ndarray:
        return np.array([getattr(self, n) for n in self.NAMES], np.float64)

    @classmethod
    def from_values(cls, values: np.ndarray) -> Expression:
        clipped = {
            name: float(np.clip(value, *cls.LIMITS[name]))
            for name, value in zip(cls.NAMES, values, strict=True)
        }
        return cls(**clipped)


@dataclass(frozen=True, slots=True)
class Pose:
    """The head's pose: tilt (radians, positive clockwise on screen), shift and nod, in
    eye distances (positive: right, down, chin down)."""

    roll: float = 0.0
    x: float = 0.0
    y: float = 0.0
    nod: float = 0.0


@dataclass(frozen=True, slots=True)
class Drive:
    """Everything one frame is drawn from."""

    time: float
    mouth: Mouth = field(default_factory=Mouth)
    expression: Expression = field(default_factory=Expression)
    #: 0 open .. 1 closed
    blink: float = 0.0
    pose: Pose = field(default_factory=Pose)
    #: the last half second of the client's audio (mono float32 at AUDIO_RATE), newest last
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


@dataclass(frozen=True, slots=True)
class Portrait:
    """A portrait fitted to the output: its RGB picture at the output size, and the
    face's landmarks in that picture's pixels."""

    rgb: np.ndarray
    landmarks: Landmarks

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


class Animator(ABC):
    """Portrait plus drive in, frame out. `load` runs once per portrait (slow is fine),
    `render` once per frame, on one thread at a time, and must return a yuv420p frame of
    the portrait's size."""

    @abstractmethod
    def load(self, portrait: Portrait) -> None: ...

    @abstractmethod
    def render(self, drive: Drive) -> VideoFrame: ...


# -- the built-in warp ------------------------------------------------------------------

#: The lower lip's drop at full openness, in eye distances; the share of it the jaw takes.
MAX_OPEN = 0.2
JAW_SHARE = 0.65
#: The upper lip's rise, as a share of the opening.
UPPER_LIFT = 0.12
#: How far towards the corners the lips part, as a share of the mouth's half width.
INNER_WIDTH = 0.86
#: Beyond the mouth corners the lower face stretches over at least this height.
CHEEK_SPAN = 0.45
#: Eye half-height and half-width, in eye distances.
EYE_HALF_HEIGHT, EYE_HALF_WIDTH = 0.085, 0.21
#: Head box around the face, in eye distances from between the eyes (u0, v0, u1, v1);
#: the part of it the expression and the mouth reach (the rest only moves with the head).
BOX = (-2.2, -2.5, 2.2, 3.3)
FACE_AREA = (-1.5, -1.0, 1.5, 2.7)


@overload
def _smoothstep(x: float) -> float: ...
@overload
def _smoothstep(x: np.ndarray) -> np.ndarray: ...
def _smoothstep(x: float | np.ndarray) -> float | np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _bump(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    """A smooth bump, 1 at (cu, cv), 0 beyond the ellipse of radii (ru, rv)."""
    r2 = ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2
    return np.square(np.clip(1.0 - r2, 0.0, 1.0))


@dataclass(slots=True)
class Rig:
    """What a portrait's warp needs, computed once: its planes, the head box, the grid
    nodes (pixels and face coordinates) and the mouth's geometry."""

    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
    frame: FaceFrame
    box: tuple[int, int, int, int]
    step: int
    nodes_x: np.ndarray
    nodes_y: np.ndarray
    head_mask: np.ndarray
    #: The nodes the expression and the mouth can move (rows, columns of the grid).
    face_area: tuple[slice, slice]
    base_x: np.ndarray
    base_y: np.ndarray
    base_cx: np.ndarray
    base_cy: np.ndarray
    mouth: dict[str, float]
    eyes: tuple[tuple[float, float], tuple[float, float]]
    brows: tuple[tuple[float, float], tuple[float, float]]
    teeth: bool
    skin_y: float
    mouth_box: tuple[int, int, int, int]
    eye_boxes: tuple[tuple[int, int, int, int], ...]


def _planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frame = VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    yuv = frame.reformat(format="yuv420p")
    out = []
    for plane in yuv.planes:
        rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
        out.append(np.ascontiguousarray(rows[:, : plane.width]))
    return out[0], out[1], out[2]


def build_rig(portrait: Portrait) -> Rig:
    """The per-portrait part of the warp."""
    width, height = portrait.width, portrait.height
    marks = portrait.landmarks
    frame = marks.frame()
    scale = frame.scale
    step = int(np.clip(round(scale / 24), 2, 8))
    align = 2 * step
    corners = [frame.to_image(u, v) for u in (BOX[0], BOX[2]) for v in (BOX[1], BOX[3])]
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    x0 = max(0, math.floor(min(xs) / align) * align)
    y0 = max(0, math.floor(min(ys) / align) * align)
    x1 = min(width // align * align, math.ceil(max(xs) / align) * align)
    y1 = min(height // align * align, math.ceil(max(ys) / align) * align)
    if x1 - x0 < 4 * align or y1 - y0 < 4 * align:
        raise ValueError("the face is too small or too far out of the picture to animate")
    nw, nh = (x1 - x0) // step, (y1 - y0) // step
    nodes_x = (x0 + (np.arange(nw) + 0.5) * step - 0.5).astype(np.float32)[None, :].repeat(nh, 0)
    nodes_y = (y0 + (np.arange(nh) + 0.5) * step - 0.5).astype(np.float32)[:, None].repeat(nw, 1)
    fu, fv = _to_face(frame, nodes_x, nodes_y)
    # the head moves as a whole inside this ellipse, fading out over the neck and hair
    radius = np.sqrt((fu / 1.55) ** 2 + ((fv - 0.35) / 2.05) ** 2)
    head_mask = (1.0 - _smoothstep((radius - 0.78) / 0.42)).astype(np.float32)
    reach = (fu > FACE_AREA[0]) & (fu < FACE_AREA[2]) & (fv > FACE_AREA[1]) & (fv < FACE_AREA[3])
    rows, cols = np.nonzero(reach)
    face_area = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    gx, gy = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
    cx, cy = np.meshgrid(
        np.arange(x0 // 2, x1 // 2, dtype=np.float32),
        np.arange(y0 // 2, y1 // 2, dtype=np.float32),
    )
    face = marks.face_coords()
    seam_c = face["mouth"][1]
    (ul, vl), (ur, vr) = face["mouth_left"], face["mouth_right"]
    centre = 0.5 * (ul + ur)
    half = 0.5 * (ur - ul)
    # the lip line through the corners and the middle: v = a (u - centre)^2 + b (u - centre) + c
    b = (vr - vl) / (2 * half)
    a = (0.5 * (vl + vr) - seam_c) / half**2
    mouth = {
        "centre": centre,
        "half": half,
        "a": a,
        "b": b,
        "c": seam_c,
        "nose": face["nose"][1],
        "chin": face["chin"][1],
    }
    y, u, v = _planes(portrait.rgb)
    skin = cv2.cvtColor(portrait.rgb, cv2.COLOR_RGB2GRAY)
    nose = [int(c) for c in marks.nose]
    patch = skin[
        max(0, nose[1] - int(0.3 * scale)) : nose[1] + 1,
        max(0, nose[0] - int(0.4 * scale)) : nose[0] + int(0.4 * scale),
    ]
    skin_y = float(np.median(patch)) if patch.size else 170.0
    # the box the mouth's inside is painted in: mouth and its travel, head motion included
    mx, my = marks.mouth
    reach_x, up, down = 1.05 * half + 0.35, 0.45, MAX_OPEN + 0.45
    mbox = (
        max(x0, int(mx - reach_x * scale) & ~1),
        max(y0, int(my - up * scale) & ~1),
        min(x1, int(mx + reach_x * scale + 2) & ~1),
        min(y1, int(my + down * scale + 2) & ~1),
    )
    eye_points = (marks.left_eye, marks.right_eye)
    return Rig(
        y=y,
        u=u,
        v=v,
        frame=frame,
        box=(x0, y0, x1, y1),
        step=step,
        nodes_x=nodes_x,
        nodes_y=nodes_y,
        head_mask=head_mask,
        face_area=face_area,
        base_x=gx,
        base_y=gy,
        base_cx=cx,
        base_cy=cy,
        mouth=mouth,
        eyes=(face["left_eye"], face["right_eye"]),
        brows=(face["left_brow"], face["right_brow"]),
        teeth=marks.gap < 0.04,
        skin_y=skin_y,
        mouth_box=mbox,
        eye_boxes=tuple(_box_around(marks, p, 0.42, 0.3, (x0, y0, x1, y1)) for p in eye_points),
    )


def _box_around(
    marks: Landmarks,
    point: tuple[float, float],
    reach_x: float,
    reach_y: float,
    within: tuple[int, int, int, int],
) -> tuple[int, int, int, int]:
    """An even-aligned pixel box around a point, `reach` eye distances each way."""
    d = marks.scale
    x, y = point
    return (
        max(within[0], int(x - reach_x * d) & ~1),
        max(within[1], int(y - reach_y * d) & ~1),
        min(within[2], int(x + reach_x * d + 2) & ~1),
        min(within[3], int(y + reach_y * d + 2) & ~1),
    )


def _to_face(frame: FaceFrame, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    px, py = x - frame.ox, y - frame.oy
    return (
        (px * frame.cos + py * frame.sin) / frame.scale,
        (-px * frame.sin + py * frame.cos) / frame.scale,
    )


def _to_image(frame: FaceFrame, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (
        frame.ox + frame.scale * (u * frame.cos - v * frame.sin),
        frame.oy + frame.scale * (u * frame.sin + v * frame.cos),
    )


@dataclass(slots=True)
class MouthShape:
    """The mouth in one frame, in face units: the opening's parts and the lip line."""

    drop: float  # lower lip's drop at the middle
    jaw: float  # the jaw's share of it (the whole lower face)
    lift: float  # upper lip's rise at the middle
    half: float  # half width of the mouth now
    power: float  # profile exponent of the opening across (0.5: an ellipse)


def mouth_shape(rig: Rig, mouth: Mouth, expression: Expression) -> MouthShape:
    gain = 0.75 + 0.25 * expression.energy
    openness = min(1.0, mouth.open * gain + 0.35 * expression.jaw)
    drop = openness * MAX_OPEN * (1.0 + 0.25 * mouth.round - 0.3 * mouth.wide)
    half = rig.mouth["half"] * (
        1.0 + 0.12 * mouth.wide - 0.22 * mouth.round + 0.06 * max(0.0, expression.smile)
    )
    return MouthShape(
        drop=drop,
        jaw=JAW_SHARE * drop,
        lift=UPPER_LIFT * drop,
        half=half,
        power=0.5 - 0.2 * mouth.wide + 0.1 * mouth.round,
    )


class WarpAnimator(Animator):
    """The built-in animator (see the module's docstring)."""

    def __init__(self) -> None:
        self.rig: Rig | None = None

    def load(self, portrait: Portrait) -> None:
        self.rig = build_rig(portrait)

    def render(self, drive: Drive) -> VideoFrame:
        rig = self.rig
        if rig is None:
            raise RuntimeError("the animator has no portrait")
        shape = mouth_shape(rig, drive.mouth, drive.expression)
        # 1. the head's pose: node -> where it was before the head moved
        qx, qy = self._head(rig, drive.pose)
        fu, fv = _to_face(rig.frame, qx, qy)
        # 2. the expression and blink, then 3. the opening, where the face is
        area = rig.face_area
        eu, ev = fu.copy(), fv.copy()
        eu[area], ev[area] = self._expression(rig, fu[area], fv[area], drive, shape)
        su, sv = fu.copy(), fv.copy()
        su[area], sv[area] = self._opening(rig, eu[area], ev[area], shape)
        sx, sy = _to_image(rig.frame, su, sv)
        dx = sx - rig.nodes_x
        dy = sy - rig.nodes_y
        out = VideoFrame(rig.y.shape[1], rig.y.shape[0], "yuv420p")
        planes = [_plane(out, i) for i in range(3)]
        for target, source in zip(planes, (rig.y, rig.u, rig.v), strict=True):
            np.copyto(target, source)
        x0, y0, x1, y1 = rig.box
        size = (x1 - x0, y1 - y0)
        map_x = cv2.resize(dx, size, interpolation=cv2.INTER_LINEAR)
        map_y = cv2.resize(dy, size, interpolation=cv2.INTER_LINEAR)
        map_x += rig.base_x
        map_y += rig.base_y
        cv2.remap(
            rig.y,
            map_x,
            map_y,
            cv2.INTER_LINEAR,
            dst=planes[0][y0:y1, x0:x1],
            borderMode=cv2.BORDER_REPLICATE,
        )
        half = (size[0] // 2, size[1] // 2)
        cmap_x = cv2.resize(dx, half, interpolation=cv2.INTER_LINEAR)
        cmap_y = cv2.resize(dy, half, interpolation=cv2.INTER_LINEAR)
        cmap_x *= 0.5
        cmap_y *= 0.5
        cmap_x += rig.base_cx
        cmap_y += rig.base_cy
        for index, source in ((1, rig.u), (2, rig.v)):
            cv2.remap(
                source,
                cmap_x,
                cmap_y,
                cv2.INTER_LINEAR,
                dst=planes[index][y0 // 2 : y1 // 2, x0 // 2 : x1 // 2],
                borderMode=cv2.BORDER_REPLICATE,
            )
        self._paint_mouth(rig, planes, eu, ev, shape)
        self._paint_lids(rig, planes[0], fu, fv, drive.blink)
        return out

    # -- the three warps, on the grid's nodes --------------------------------------------

    @staticmethod
    def _head(rig: Rig, pose: Pose) -> tuple[np.ndarray, np.ndarray]:
        """Each node's position before the head moved (inverse pose under the head mask)."""
        frame = rig.frame
        d = frame.scale
        # pivot at the neck, below the chin
        pivot = frame.to_image(0.0, 2.4)
        cos, sin = math.cos(pose.roll), math.sin(pose.roll)
        # forward: p' = pivot + S R (p - pivot) + t; a nod squashes the face towards the
        # neck a little and moves it down
        squash = 1.0 - 0.06 * pose.nod
        forward = np.array([[cos, -sin], [sin * squash, cos * squash]])
        shift = np.array([pose.x * d, pose.y * d + 0.10 * pose.nod * d])
        (i00, i01), (i10, i11) = np.linalg.inv(forward).tolist()
        px = rig.nodes_x - float(pivot[0] + shift[0])
        py = rig.nodes_y - float(pivot[1] + shift[1])
        bx = i00 * px + i01 * py + pivot[0]
        by = i10 * px + i11 * py + pivot[1]
        mask = rig.head_mask
        return rig.nodes_x + mask * (bx - rig.nodes_x), rig.nodes_y + mask * (by - rig.nodes_y)

    @staticmethod
    def _expression(
        rig: Rig, u: np.ndarray, v: np.ndarray, drive: Drive, shape: MouthShape
    ) -> tuple[np.ndarray, np.ndarray]:
        """Backward map of the expression and blink: face coords -> face coords."""
        ex = drive.expression
        m = rig.mouth
        du = np.zeros_like(u)
        dv = np.zeros_like(v)
        seam = m["c"]
        centre = m["centre"]
        # mouth width and rounding (the voice's: computed whatever it says, so the cost
        # stays the same): the corners move along the lip line
        stretch = shape.half / m["half"] - 1.0
        across = (u - centre) / (1.5 * m["half"])
        around = 1.0 / (1.0 + across**4) * np.exp(-0.5 * ((v - seam) / 0.3) ** 2)
        du += 1.2 * stretch * (u - centre) * around
        smile = ex.smile
        if abs(smile) > 1e-4:
            for side in (-1.0, 1.0):
                cu = centre + side * m["half"]
                cv = m["a"] * m["half"] ** 2 + m["b"] * side * m["half"] + m["c"]
                corner = _bump(u, v, cu, cv, 0.42, 0.32)
                lift = 0.075 if smile > 0 else 0.06
                dv -= smile * lift * corner
                du += max(smile, 0.0) * 0.035 * side * corner
                # cheeks rise with a smile, and push the lower lids up a touch
                cheek = _bump(u, v, side * 0.55, 0.62, 0.42, 0.38)
                dv -= max(smile, 0.0) * 0.04 * cheek
                lid = _bump(u, v, side * 0.5, 0.12, 0.28, 0.09)
                dv -= max(smile, 0.0) * 0.015 * lid
        brow = ex.brow
        for (bu, bv), (eu, ev) in zip(rig.brows, rig.eyes, strict=True):
            if abs(brow) > 1e-4:
                around = _bump(u, v, bu, bv, 0.55, 0.32)
                if brow > 0:
                    dv -= brow * 0.09 * around
                else:  # knitted: down, and the inner ends drawn together
                    inner = _bump(u, v, bu * 0.55, bv + 0.02, 0.38, 0.26)
                    dv -= brow * 0.05 * around
                    du += brow * 0.05 * math.copysign(1.0, bu) * inner
            open_eyes = ex.eyes
            if abs(open_eyes) > 1e-4:
                # widen (or narrow) the eye opening around its centre
                eye = _bump(u, v, eu, ev, 0.34, 0.2)
                dv += 0.13 * open_eyes * (v - ev) * eye
            dv += _blink(u, v, eu, ev, drive.blink)
        return u - du, v - dv

    @staticmethod
    def _opening(
        rig: Rig, u: np.ndarray, v: np.ndarray, shape: MouthShape
    ) -> tuple[np.ndarray, np.ndarray]:
        """Backward map of the mouth opening: face coords -> the portrait's face coords.
        Computed in full even for a closed mouth, so silence costs what speech does."""
        m = rig.mouth
        seam, gap, lift, rest = _mouth_geometry(rig, u, shape)
        # the lips part at the lip line: the rows between them all come from the line
        parted = np.clip(v - seam, 0.0, gap)
        w = v - parted
        # what the jaw drops beyond the parting stretches the skin under the line
        span = np.maximum(CHEEK_SPAN, 1.5 * rest)
        lower = parted + rest * np.clip((w - seam) / span, 0.0, 1.0)
        # under the chin the neck takes the jaw's drop up
        lower *= 1.0 - _smoothstep((v - m["chin"]) / 0.6)
        # the upper lip rises: in full at the lip line, fading out towards the nose
        reach = max(0.9 * (m["c"] - m["nose"]), 0.1)
        upper = np.where(v < seam, lift * np.clip(1.0 - (seam - v) / reach, 0.0, 1.0), 0.0)
        return u, v - lower + upper

    # -- lashes and the mouth's inside (painted every frame: the cost stays the same) ---

    @staticmethod
    def _paint_lids(
        rig: Rig, luma: np.ndarray, u: np.ndarray, v: np.ndarray, amount: float
    ) -> None:
        """Darken the line where a closing lid meets the lower lid (its lashes): it hides
        the last sliver of the eye that the coarse grid squeezes there. `u`, `v`: the
        nodes' face coordinates with the head's motion undone (the blink's own space)."""
        for box, (cu, cv) in zip(rig.eye_boxes, rig.eyes, strict=True):
            x0, y0, x1, y1 = box
            fu, fv = _pixels_in_face(rig, u, v, box)
            weight, dark = _lash_line(fu, fv, cu, cv, amount, rig.skin_y)
            part = luma[y0:y1, x0:x1]
            np.copyto(part, (part + weight * (dark - part)).astype(np.uint8))

    # -- the mouth's inside ----------------------------------------------------------------

    def _paint_mouth(
        self,
        rig: Rig,
        planes: list[np.ndarray],
        eu: np.ndarray,
        ev: np.ndarray,
        shape: MouthShape,
    ) -> None:
        """Fill the parted lips with the mouth's dark inside (soft-edged), and teeth.
        Painted even for a closed mouth (nothing shows), so silence costs what speech does."""
        x0, y0, x1, y1 = rig.mouth_box
        fu, fv = _pixels_in_face(rig, eu, ev, rig.mouth_box)
        seam, gap, lift, _ = _mouth_geometry(rig, fu, shape)
        top, bottom = seam - lift, seam + gap
        soft = 1.6 / rig.frame.scale  # a pixel and a half, in face units
        alpha = np.clip((fv - top) / soft, 0.0, 1.0) * np.clip((bottom - fv) / soft, 0.0, 1.0)
        opening = np.maximum(bottom - top, 1e-6)
        depth = np.clip((fv - top) / opening, 0.0, 1.0)
        skin = rig.skin_y
        # dark inside: darkest in the throat, lighter at the inner lips, shadowed under
        # the upper lip; the tongue rises from below once the mouth is well open
        edge = np.clip(np.minimum(fv - top, bottom - fv) / 0.035, 0.0, 1.0)
        luma = skin * (0.2 + 0.16 * (1.0 - edge) - 0.06 * np.clip(1.0 - depth / 0.3, 0, 1))
        tongue = _smoothstep((depth - 0.55) / 0.3) * np.clip((opening - 0.06) / 0.1, 0.0, 1.0)
        tongue *= np.clip(1.0 - (np.abs(fu - rig.mouth["centre"]) / shape.half) ** 2, 0, 1)
        luma = luma + tongue * (0.42 * skin - luma)
        # dark red-brown inside, a pinker tongue
        chroma_v = 139.0 + 10.0 * tongue
        chroma_u = 120.0 - 2.0 * tongue
        if rig.teeth:
            band = np.clip(opening / 0.25, 0.0, 1.0) * 0.07
            teeth = np.clip((top + band - fv) / soft, 0.0, 1.0)
            teeth *= np.clip(1.0 - (np.abs(fu - rig.mouth["centre"]) / shape.half) ** 2, 0, 1)
            teeth *= np.clip(opening / 0.06 - 0.3, 0.0, 1.0)
            luma = luma + teeth * (0.92 * skin - luma)
            chroma_v = chroma_v + teeth * (129.0 - chroma_v)
            chroma_u = chroma_u + teeth * (127.0 - chroma_u)
        target = planes[0][y0:y1, x0:x1]
        blended = target * (1.0 - alpha) + luma * alpha
        np.copyto(target, np.clip(blended, 0, 255).astype(np.uint8))
        half_alpha = cv2.resize(
            alpha, ((x1 - x0) // 2, (y1 - y0) // 2), interpolation=cv2.INTER_AREA
        )
        for index, value in ((1, chroma_u), (2, chroma_v)):
            chroma = cv2.resize(
                np.asarray(value, np.float32) * np.ones_like(alpha),
                ((x1 - x0) // 2, (y1 - y0) // 2),
                interpolation=cv2.INTER_AREA,
            )
            part = planes[index][y0 // 2 : y1 // 2, x0 // 2 : x1 // 2]
            mixed = part * (1.0 - half_alpha) + chroma * half_alpha
            np.copyto(part, np.clip(mixed, 0, 255).astype(np.uint8))


def _pixels_in_face(
    rig: Rig, eu: np.ndarray, ev: np.ndarray, box: tuple[int, int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Face coordinates (before the mouth opens) of every output pixel in `box`, from the
    grid's nodes: the same bilinear scaling the warp's maps get."""
    x0, y0, x1, y1 = box
    bx0, by0 = rig.box[0], rig.box[1]
    step = rig.step
    i0, i1 = (y0 - by0) // step, -(-(y1 - by0) // step)
    j0, j1 = (x0 - bx0) // step, -(-(x1 - bx0) // step)
    full = ((j1 - j0) * step, (i1 - i0) * step)
    fu = cv2.resize(eu[i0:i1, j0:j1], full, interpolation=cv2.INTER_LINEAR)
    fv = cv2.resize(ev[i0:i1, j0:j1], full, interpolation=cv2.INTER_LINEAR)
    oy, ox = y0 - (by0 + i0 * step), x0 - (bx0 + j0 * step)
    return (
        fu[oy : oy + (y1 - y0), ox : ox + (x1 - x0)],
        fv[oy : oy + (y1 - y0), ox : ox + (x1 - x0)],
    )


def _lash_line(
    fu: np.ndarray, fv: np.ndarray, eu: float, ev: float, amount: float, skin: float
) -> tuple[np.ndarray, np.ndarray]:
    """A closing lid's shading: weights 0..1 and the luma they pull towards. The lashes
    darken the line where the lids meet (and hide the sliver of eye squeezed under it);
    the lid itself is a shade darker than the brow bone it was stretched from."""
    across = np.clip(1.0 - ((fu - eu) / (0.95 * EYE_HALF_WIDTH)) ** 2, 0.0, 1.0)
    line = ev + 0.75 * EYE_HALF_HEIGHT
    lashes = np.clip(1.0 - np.abs(fv - (line + 0.015)) / 0.03, 0.0, 1.0) * np.sqrt(across)
    lashes *= _smoothstep((amount - 0.45) / 0.4)
    lid = _smoothstep((fv - (ev - EYE_HALF_HEIGHT - 0.1)) / 0.08) * (fv < line)
    shade = 0.22 * amount * across * lid
    weight = np.maximum(lashes, shade).astype(np.float32)
    dark = np.where(lashes >= shade, 0.42 * skin, 0.7 * skin).astype(np.float32)
    return weight, dark


def _mouth_geometry(
    rig: Rig, u: np.ndarray, shape: MouthShape
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Across the face at `u`: the lip line's v, how far the lips part there (a lens,
    widest in the middle, closed at the corners), how far the upper lip rises, and what
    the jaw drops beyond the parting (skin that stretches rather than parts)."""
    m = rig.mouth
    across = u - m["centre"]
    clipped = np.clip(across, -m["half"], m["half"])
    seam = m["a"] * clipped**2 + m["b"] * clipped + m["c"]
    # the opening stops short of the corners, where the lips stay together
    reach = INNER_WIDTH * shape.half
    lens = np.power(np.clip(1.0 - (across / reach) ** 2, 0.0, 1.0), shape.power)
    jaw = shape.jaw * (1.0 - _smoothstep((np.abs(u) - 0.55) / 0.6))
    gap = shape.drop * lens
    rest = np.maximum(jaw - gap, 0.0)
    return seam, gap, shape.lift * np.sqrt(lens), rest


def _blink(u: np.ndarray, v: np.ndarray, eu: float, ev: float, amount: float) -> np.ndarray:
    """The blink's backward vertical displacement around one eye (face units): the skin
    above the eye slides down over it, its lid margin reaching the lower lid's line."""
    across = 1.0 - _smoothstep((np.abs(u - eu) - 0.7 * EYE_HALF_WIDTH) / (0.75 * EYE_HALF_WIDTH))
    close_line = ev + 0.75 * EYE_HALF_HEIGHT
    lid = ev - EYE_HALF_HEIGHT
    skin = 0.16
    start = lid - skin
    travel = amount * (close_line - lid)
    rising = np.clip((v - start) / (close_line - start), 0.0, 1.0)
    falling = np.clip(1.0 - (v - close_line) / 0.015, 0.0, 1.0)
    return travel * np.where(v <= close_line, rising, falling) * across


def _plane(frame: VideoFrame, index: int) -> np.ndarray:
    """A writable (height, width) uint8 view of one plane, without its row padding."""
    plane = frame.planes[index]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]
