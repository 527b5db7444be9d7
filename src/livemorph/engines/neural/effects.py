"""Image operations that compose with the style networks: line art, cel shading, tone
curves, monochrome, paper grain, screentone and materials (stone, marble, metals, chalk).

The networks know only their 26 painted styles; these plain operations reach the looks
they cannot (a marble statue, a charcoal drawing, clean anime line art). A `Look` carries
an `Effects` value (all off by default) and each session owns an `EffectsRenderer`, which
the engine calls twice per frame:

- `small` on the stylised picture at the network's size (planar float RGB in 0..1), after
  the colour grade and the strength mix: materials, cel shading, the tone curve and
  monochrome, all cheap at a few ten thousand pixels;
- `full` on the output frame's yuv420p planes, for what must stay sharp: line art from the
  camera's own luma, relief lighting, material and paper textures, screentone.

Edges are found on the camera's luma at half the output's resolution (where the chroma
planes live), so lines follow the real picture, not the network's brushwork. Textures are
made once per output size from fixed seeds, so equal inputs give equal frames. OpenCV's
global settings (its thread count) are the engine's business; nothing here needs threads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import lru_cache
from types import ModuleType

import numpy as np

#: The materials `Effects.material` may name ("" for none).
MATERIALS = ("", "stone", "marble", "metal", "bronze", "gold", "chrome", "chalk")
#: Materials whose surface is lit from the camera's luma gradients (carved or cast).
_RELIEF = {"stone": 0.7, "marble": 0.55, "metal": 0.8, "bronze": 0.8, "gold": 0.7, "chrome": 0.9}
#: Rec. 601 luma weights, as in the colour grade.
_LUMA = (0.299, 0.587, 0.114)
#: Sizes in `Effects` are given for a frame of this many lines and scaled to the real one.
_REFERENCE_HEIGHT = 704.0
#: Seeds of the static textures (one per kind, so each looks the same at every size).
_SEEDS = {
    "veins": 11,
    "mottle": 12,
    "brushed": 13,
    "tooth": 14,
    "board": 15,
    "chalk": 16,
    "paper": 17,
}

Triple = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Effects:
    """What to do to a frame besides the networks' styles; every field off by default."""

    #: Line art from the camera's luma (extended difference of Gaussians): how dark the
    #: lines are, 0 (none) .. 1 (black ink); 0.5 draws grey pencil lines.
    line: float = 0.0
    #: Line width: the inner Gaussian's sigma, in pixels of a 704-line frame (0.25 .. 8).
    line_width: float = 1.0
    #: 0..1: higher keeps only the stronger edges.
    line_threshold: float = 0.5
    #: 0..1: dark areas fill in with ink too (XDoG's tone term), not only outlines.
    line_fill: float = 0.0
    #: Cel shading: the number of luma bands (0: off, else 2..8).
    cel: int = 0
    #: Width of the soft step between cel bands (0: hard, 1: hardly any steps).
    cel_softness: float = 0.25
    #: 0..1: how much the chroma is smoothed into flat areas first.
    cel_flatten: float = 0.5
    #: Tone curve at the network's size: an S-curve (positive: more contrast, -1..1) ...
    curve: float = 0.0
    #: ... then lift, gamma and gain per channel (R, G, B): out = (gain*x + lift*(1-x))^(1/gamma).
    lift: Triple = (0.0, 0.0, 0.0)
    gamma: Triple = (1.0, 1.0, 1.0)
    gain: Triple = (1.0, 1.0, 1.0)
    #: 0..1: how much colour is removed.
    monochrome: float = 0.0
    #: What white becomes once the effects ran (the paper's colour), RGB gains.
    paper_colour: Triple = (1.0, 1.0, 1.0)
    #: Paper tooth: strokes caught on the paper's grain, 0..1 (charcoal, pencil).
    grain: float = 0.0
    #: A paper's texture under paint (watercolour, gouache): soft bumps in the luma, 0..1.
    paper: float = 0.0
    #: Manga screentone: mid-tones as halftone dots, 0..1.
    screentone: float = 0.0
    #: A material look: one of `MATERIALS`.
    material: str = ""
    #: How much of the material shows, 0..1.
    material_strength: float = 1.0

    def __post_init__(self) -> None:
        if self.material not in MATERIALS:
            raise ValueError(
                f"unknown material {self.material!r} (known: {', '.join(MATERIALS[1:])})"
            )
        if self.cel != 0 and not 2 <= self.cel <= 8:
            raise ValueError(f"cel must be 0 (off) or 2..8 bands, got {self.cel}")
        if not 0.25 <= self.line_width <= 8.0:
            raise ValueError(f"line_width must be in 0.25..8, got {self.line_width}")
        if not -1.0 <= self.curve <= 1.0:
            raise ValueError(f"curve must be in -1..1, got {self.curve}")
        for name in (
            "line",
            "line_threshold",
            "line_fill",
            "cel_softness",
            "cel_flatten",
            "monochrome",
            "grain",
            "paper",
            "screentone",
            "material_strength",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in 0..1, got {value}")
        for name in ("lift", "gamma", "gain", "paper_colour"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ValueError(f"{name} needs three values (R, G, B), got {value}")
        if min(self.gamma) <= 0 or min(self.gain) <= 0 or min(self.paper_colour) <= 0:
            raise ValueError("gamma, gain and paper_colour must be positive")

    @property
    def active(self) -> bool:
        """Whether any effect is on (the engine skips both passes otherwise); settings
        that only shape an effect (line_width, cel_softness ...) turn nothing on."""
        return bool(
            self.line > 0
            or self.cel
            or self.tone
            or self.monochrome > 0
            or self.paper_colour != (1.0, 1.0, 1.0)
            or self.grain > 0
            or self.paper > 0
            or self.screentone > 0
            or (self.material and self.material_strength > 0)
        )

    @property
    def tone(self) -> bool:
        """Whether the tone curve changes anything."""
        return (
            self.curve != 0.0
            or self.lift != (0.0, 0.0, 0.0)
            or self.gamma != (1.0, 1.0, 1.0)
            or self.gain != (1.0, 1.0, 1.0)
        )


_OFF = Effects()
#: The fields that are amounts and blend linearly between recipes (the tone curve's per
#: channel too: a recipe without one counts as lift 0, gamma 1, gain 1).
AMOUNTS = ("line", "grain", "paper", "screentone", "curve")
TRIPLES = ("lift", "gamma", "gain")
#: What a blend takes whole from its leading recipe: what the picture is made of.
FROM_LEADER = ("material", "material_strength", "monochrome", "paper_colour")


def effects_from_table(table: dict[str, object], where: str = "effects") -> Effects:
    """An `Effects` from a TOML table, with errors that name the bad key.

    Per-channel settings (lift, gamma, gain, paper_colour) take one number or three."""
    known = [f.name for f in fields(Effects)]
    values: dict[str, object] = {}
    for key, raw in table.items():
        if key not in known:
            raise ValueError(f"{where}: unknown effect {key!r} (known: {', '.join(known)})")
        default = getattr(_OFF, key)
        value: object = None
        if isinstance(default, tuple):
            items = [raw] * 3 if _is_number(raw) else raw
            if isinstance(items, list) and all(_is_number(v) for v in items):
                value = tuple(float(v) for v in items)
        elif isinstance(default, str):
            value = raw if isinstance(raw, str) else None
        elif isinstance(default, int):
            value = raw if _is_number(raw) and isinstance(raw, int) else None
        elif _is_number(raw):
            value = float(raw)  # type: ignore[arg-type]
        if value is None:
            raise ValueError(f"{where}: {key} = {raw!r} is not a valid value")
        values[key] = value
    try:
        return Effects(**values)  # type: ignore[arg-type]
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def blend_effects(parts: list[tuple[Effects, float]]) -> Effects:
    """Effects for a blend of recipes (shares summing to 1).

    What the picture is made of (`FROM_LEADER`: the material, monochrome, the paper's
    colour) comes whole from the recipe with the largest share: half a marble statue or
    half a monochrome is no look anyone asked for. Amounts (`AMOUNTS`, `TRIPLES`) are
    share-weighted, so a look that is a third pencil sketch gets a third of its lines and
    of its lift; the settings that shape an effect (line width, cel bands) come from the
    recipe with the largest share among those that use it.
    """
    if not parts:
        return _OFF
    if len(parts) == 1:
        return parts[0][0]
    first = max(parts, key=lambda pair: pair[1])[0]
    values: dict[str, object] = {name: getattr(first, name) for name in FROM_LEADER}
    for name in AMOUNTS:
        values[name] = round(sum(share * getattr(e, name) for e, share in parts), 4)
    for name in TRIPLES:
        values[name] = tuple(
            round(sum(share * getattr(e, name)[c] for e, share in parts), 4) for c in range(3)
        )

    def leader(uses: Callable[[Effects], bool]) -> Effects | None:
        users = [(e, s) for e, s in parts if uses(e)]
        return max(users, key=lambda pair: pair[1])[0] if users else None

    if (lines := leader(lambda e: e.line > 0)) is not None:
        for name in ("line_width", "line_threshold", "line_fill"):
            values[name] = getattr(lines, name)
    if (cel := leader(lambda e: e.cel > 0)) is not None:
        values.update(cel=cel.cel, cel_softness=cel.cel_softness, cel_flatten=cel.cel_flatten)
    return Effects(**values)  # type: ignore[arg-type]


def describe_effects(effects: Effects) -> str:
    """The effects in a few words for the enhanced prompt ("" when none are on)."""
    parts = []
    if effects.material and effects.material_strength > 0:
        parts.append(f"{effects.material} material")
    if effects.line > 0:
        parts.append("ink line art" if effects.line >= 0.75 else "soft line art")
    if effects.cel:
        parts.append(f"{effects.cel}-band cel shading")
    if effects.screentone > 0:
        parts.append("screentone")
    if effects.monochrome >= 0.99:
        parts.append("monochrome")
    elif effects.monochrome > 0:
        parts.append("muted colour")
    if effects.grain > 0:
        parts.append("paper grain")
    if effects.paper > 0:
        parts.append("paper texture")
    if effects.tone:
        parts.append("tone curve")
    return "effects: " + ", ".join(parts) if parts else ""


# -- rendering ------------------------------------------------------------------------


def _cv2() -> ModuleType:
    import cv2

    return cv2


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - np.float32(lo)) / np.float32(max(hi - lo, 1e-6)), 0.0, 1.0)
    return t * t * (np.float32(3.0) - np.float32(2.0) * t)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """Luma of a planar (3, h, w) float RGB picture, as a new (h, w) array."""
    out = rgb[0] * np.float32(_LUMA[0])
    out += rgb[1] * np.float32(_LUMA[1])
    out += rgb[2] * np.float32(_LUMA[2])
    return out


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * np.float32(255.0) + np.float32(0.5), 0, 255).astype(np.uint8)


def _neutral_chroma(plane: np.ndarray, keep: np.ndarray) -> None:
    """Pull a chroma plane (uint8, 128 = grey) towards grey: keep is uint8, 255 = unchanged."""
    cv2 = _cv2()
    centred = cv2.subtract(plane, 128, dtype=cv2.CV_16S)
    centred = cv2.multiply(centred, keep, dtype=cv2.CV_16S, scale=1.0 / 255.0)
    cv2.add(centred, 128, dst=plane, dtype=cv2.CV_8U)


class EffectsRenderer:
    """One session's effects: buffers and textures for the current sizes.

    Static textures (marble veins, paper tooth, the halftone screen ...) are made from
    fixed seeds once per output size and shared by all sessions (`_texture`); what
    depends on a look's amounts is derived from them once per session and value. Any
    output and network size works, and both may change between frames.

    Cost per frame on one core of the 2-core development VM (timeit, best of 5 x 30 on
    the astronaut photo; 320x176 network, 1280x704 output), `small` / `full` in ms:
    line art 0.02 / 1.7 (the same with fill), cel shading 0.9 / 0, tone curve 0.5 / 0,
    monochrome and paper colour 0.1 / 0, grain 0 / 0.4, paper 0 / 0.2, screentone
    0 / 0.25, marble, stone and metals 0.7 / 2.1, chalk 0.7 / 2.8; whole recipes: anime
    0.9 / 1.8, studio ghibli 1.1 / 1.9, manga 0.9 / 2.0, comic book 0.9 / 2.2, charcoal
    0.3 / 2.4. `small` grows with the network's pixels (cel shading 1.5 ms at 448x248).
    Making a size's textures the first time costs up to ~70 ms (marble), once per process.
    """

    def __init__(self, output_size: tuple[int, int], network_size: tuple[int, int]) -> None:
        self.output_size = output_size
        self.network_size = network_size
        self._derived: dict[tuple[object, ...], np.ndarray] = {}

    # -- the network's size -----------------------------------------------------------

    def small(self, rgb: np.ndarray, camera: np.ndarray, effects: Effects) -> None:
        """In place on the stylised picture at the network's size: planar float32
        (3, h, w) RGB in 0..1; `camera` is the camera picture at the same size.

        Materials, cel shading, the tone curve, monochrome and the paper colour, in
        that order; the result is clipped to 0..1.
        """
        if not effects.active:
            return
        if rgb.ndim != 3 or rgb.shape[0] != 3 or camera.shape != rgb.shape:
            raise ValueError(f"expected two (3, h, w) pictures, got {rgb.shape}, {camera.shape}")
        self.network_size = (rgb.shape[2], rgb.shape[1])
        if effects.material and effects.material_strength > 0:
            self._material(rgb, camera, effects)
        if effects.cel:
            self._cel(rgb, effects)
        if effects.tone:
            self._tone(rgb, effects)
        if effects.monochrome > 0:
            grey = _luma(rgb)
            grey *= np.float32(effects.monochrome)
            keep = np.float32(1.0 - effects.monochrome)
            for c in range(3):
                rgb[c] *= keep
                rgb[c] += grey
        if effects.paper_colour != (1.0, 1.0, 1.0):
            for c in range(3):
                rgb[c] *= np.float32(effects.paper_colour[c])
        np.clip(rgb, 0.0, 1.0, out=rgb)

    def _material(self, rgb: np.ndarray, camera: np.ndarray, effects: Effects) -> None:
        """Recolour the picture as a material, shaded by the camera's luma (faces stay)."""
        cv2 = _cv2()
        material = effects.material
        shade = _luma(camera)
        shade *= np.float32(0.8)  # and a little of the network's brushwork as tooling marks
        shade += np.float32(0.2) * _luma(rgb)
        shade = cv2.bilateralFilter(shade, 5, 0.12, 3.0)  # smooth surfaces, kept edges
        if material in ("stone", "marble"):
            # light warm stone lit softly: the shading is compressed, shadows never black
            albedo, low = _STONE[material]
            lit = _smoothstep(shade, -0.1, 1.0)
            lit *= np.float32(1.0 - low)
            lit += np.float32(low)
            surface = [lit * np.float32(a) for a in albedo]
        elif material == "chalk":
            # a dark slate board; the light areas of the picture get a haze of chalk dust
            haze = _smoothstep(shade, 0.35, 0.95)
            haze *= np.float32(0.42)
            surface = [np.float32(b) + haze * np.float32(0.9 - b) for b in _BOARD]
        else:
            # metals: a hard S-curve into a gradient map with a specular top
            index = _to_u8(_smoothstep(shade, 0.05, 0.92))
            ramp = _ramp(material)
            surface = [cv2.LUT(index, ramp[c]) for c in range(3)]
        mix = np.float32(effects.material_strength)
        for c in range(3):
            rgb[c] *= np.float32(1.0) - mix
            rgb[c] += mix * surface[c]

    def _cel(self, rgb: np.ndarray, effects: Effects) -> None:
        """Flat colour areas: chroma smoothed, luma in `cel` bands with soft steps."""
        cv2 = _cv2()
        y = _luma(rgb)
        red, blue = rgb[0] - y, rgb[2] - y
        flatten = effects.cel_flatten
        if flatten > 0:
            sigma = 0.4 + 2.0 * flatten
            red = cv2.GaussianBlur(red, (0, 0), sigma)
            blue = cv2.GaussianBlur(blue, (0, 0), sigma)
            y = cv2.bilateralFilter(y, 5, 0.05 + 0.15 * flatten, 2.0)
        steps = effects.cel - 1
        x = y * np.float32(steps)
        floor = np.floor(x)
        x -= floor
        half = 0.5 * max(effects.cel_softness, 0.02)
        banded = _smoothstep(x, 0.5 - half, 0.5 + half)
        banded += floor
        # bands from _CEL_FLOOR up (the darkest is a deep shade, not black), and a little
        # of the original shading stays, so flat areas are not cardboard
        banded *= np.float32(0.85 * (1.0 - _CEL_FLOOR) / steps)
        banded += np.float32(0.85 * _CEL_FLOOR)
        banded += np.float32(0.15) * y
        red += banded
        blue += banded
        np.copyto(rgb[0], red)
        np.copyto(rgb[2], blue)
        # G from Y = 0.299 R + 0.587 G + 0.114 B
        banded -= np.float32(_LUMA[0]) * red
        banded -= np.float32(_LUMA[2]) * blue
        banded *= np.float32(1.0 / _LUMA[1])
        np.copyto(rgb[1], banded)

    def _tone(self, rgb: np.ndarray, effects: Effects) -> None:
        """S-curve, then lift / gain / gamma, per channel."""
        cv2 = _cv2()
        np.clip(rgb, 0.0, 1.0, out=rgb)
        for c in range(3):
            plane = rgb[c]
            if effects.curve:
                bend = plane * plane * (np.float32(3.0) - np.float32(2.0) * plane)
                bend -= plane
                bend *= np.float32(effects.curve)
                plane += bend
            lift, gamma, gain = effects.lift[c], effects.gamma[c], effects.gain[c]
            if lift or gain != 1.0:
                plane *= np.float32(gain - lift)
                plane += np.float32(lift)
            if gamma != 1.0:
                np.clip(plane, 0.0, None, out=plane)
                cv2.pow(plane, 1.0 / gamma, plane)

    # -- the output's size ------------------------------------------------------------

    def full(
        self,
        y: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        camera_y: np.ndarray,
        effects: Effects,
    ) -> None:
        """In place on the output frame's yuv420p planes: y (H, W), u and v
        (ceil(H/2), ceil(W/2)), uint8 and writable; `camera_y` is the camera's
        full-resolution luma (uint8, only read).

        Relief lighting and the material's texture, screentone, then line art (or chalk
        strokes) and paper tooth last, so lines lie on top and grain breaks them too.
        """
        if not effects.active:
            return
        if camera_y.shape != y.shape or u.shape != v.shape:
            raise ValueError(f"plane shapes disagree: y {y.shape}, camera {camera_y.shape}")
        if u.shape != ((y.shape[0] + 1) // 2, (y.shape[1] + 1) // 2):
            raise ValueError(f"chroma planes {u.shape} do not fit luma {y.shape}")
        cv2 = _cv2()
        height, width = y.shape
        self.output_size = (width, height)
        scale = height / _REFERENCE_HEIGHT
        material = effects.material if effects.material_strength > 0 else ""
        relief = _RELIEF.get(material, 0.0) * effects.material_strength
        half: np.ndarray | None = None
        if effects.line > 0 or relief > 0 or material == "chalk":
            half = cv2.resize(camera_y, (u.shape[1], u.shape[0]), interpolation=cv2.INTER_AREA)
            half = half.astype(np.float32)
            half *= np.float32(1.0 / 255.0)
        if relief > 0:
            assert half is not None
            self._relief(y, half, relief, scale)
        if material and material != "chalk":
            self._surface(y, material, effects.material_strength)
        if effects.screentone > 0:
            self._screentone(y, effects.screentone, scale)
        if material == "chalk":
            assert half is not None
            self._chalk(y, u, v, half, effects, scale)
        elif effects.line > 0:
            assert half is not None
            self._ink(y, u, v, half, effects, scale)
        if effects.grain > 0:
            self._tooth(y, effects.grain)
        if effects.paper > 0:
            shape = (height, width)
            keep = self._derive(
                ("paper", shape, effects.paper),
                lambda: _keep(_texture("paper", shape), effects.paper),
            )
            cv2.multiply(y, keep, dst=y, scale=1.0 / 255.0)

    def _derive(self, key: tuple[object, ...], make: Callable[[], np.ndarray]) -> np.ndarray:
        """A per-session array derived from a shared texture, made once per key."""
        array = self._derived.get(key)
        if array is None:
            if len(self._derived) >= 8:  # sizes or looks changed many times: start over
                self._derived.clear()
            array = self._derived[key] = make()
        return array

    def _lines(self, half: np.ndarray, effects: Effects, scale: float) -> np.ndarray:
        """XDoG line mask at half resolution, float32 0 (paper) .. 1 (ink).

        D = G(s) - tau * G(1.6 s) on the camera's luma; ink where D falls below epsilon,
        with a tanh ramp so lines are anti-aliased. tau < 1 (line_fill) adds a share of
        the luma itself to D, so dark areas fill in like brush ink."""
        cv2 = _cv2()
        sigma = max(0.35, 0.5 * effects.line_width * scale)
        inner = cv2.GaussianBlur(half, (0, 0), sigma)
        outer = cv2.GaussianBlur(half, (0, 0), 1.6 * sigma)
        outer *= np.float32(1.0 - 0.06 * effects.line_fill)
        inner -= outer
        epsilon = -0.003 - 0.016 * effects.line_threshold + 0.05 * effects.line_fill
        inner -= np.float32(epsilon)
        inner *= np.float32(-60.0)
        np.clip(inner, 0.0, 3.0, out=inner)
        return np.tanh(inner, out=inner)

    def _ink(
        self,
        y: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        half: np.ndarray,
        effects: Effects,
        scale: float,
    ) -> None:
        """Dark lines over the picture, their chroma pulled to grey (ink is neutral)."""
        cv2 = _cv2()
        lines = self._lines(half, effects, scale)
        lines *= np.float32(-effects.line)
        lines += np.float32(1.0)
        keep_half = cv2.convertScaleAbs(lines, alpha=255.0)  # lines >= 0 here
        keep = cv2.resize(keep_half, (y.shape[1], y.shape[0]), interpolation=cv2.INTER_LINEAR)
        cv2.multiply(y, keep, dst=y, scale=1.0 / 255.0)
        _neutral_chroma(u, keep_half)
        _neutral_chroma(v, keep_half)

    def _relief(self, y: np.ndarray, half: np.ndarray, amount: float, scale: float) -> None:
        """Light the picture as a carved or cast surface: the camera's luma, smoothed, is
        the height, lit from the top left."""
        cv2 = _cv2()
        height = cv2.GaussianBlur(half, (0, 0), max(0.6, 1.5 * scale))
        slope = cv2.Sobel(height, cv2.CV_32F, 1, 0, ksize=3)
        slope += cv2.Sobel(height, cv2.CV_32F, 0, 1, ksize=3)
        # a slope rising to the bottom right faces a light at the top left
        slope *= np.float32(-110.0 * amount)
        np.clip(slope, -60.0, 60.0, out=slope)
        slope += np.float32(128.5)
        shade = cv2.resize(
            slope.astype(np.uint8), (y.shape[1], y.shape[0]), interpolation=cv2.INTER_LINEAR
        )
        lit = cv2.add(y, shade, dtype=cv2.CV_16S)
        cv2.subtract(lit, 128, dst=lit, dtype=cv2.CV_16S)
        np.clip(lit, 0, 255, out=lit)
        y[...] = lit

    def _surface(self, y: np.ndarray, material: str, strength: float) -> None:
        """The material's static texture (veins, mottling, brushing) multiplies the luma."""
        cv2 = _cv2()
        shape = (y.shape[0], y.shape[1])
        keep = self._derive(
            ("surface", material, shape, strength),
            lambda: _keep(_texture(material, shape), strength),
        )
        cv2.multiply(y, keep, dst=y, scale=1.0 / 255.0)

    def _screentone(self, y: np.ndarray, amount: float, scale: float) -> None:
        """Mid-tones as halftone dots (whites stay white, blacks black)."""
        cv2 = _cv2()
        screen = _texture("screen", (y.shape[0], y.shape[1]))
        dots = cv2.addWeighted(y, 4.0, screen, -4.0, 128.0, dtype=cv2.CV_8U)
        if amount >= 1.0:
            y[...] = dots
        else:
            cv2.addWeighted(y, 1.0 - amount, dots, amount, 0.0, dst=y)

    def _tooth(self, y: np.ndarray, amount: float) -> None:
        """Graphite and charcoal catch on the paper's tooth: the picture dithered against
        the paper's height map (light tones become specks on the grains, dark ones fill
        all but the pits), mixed in by `amount`."""
        cv2 = _cv2()
        paper = _texture("tooth", (y.shape[0], y.shape[1]))
        caught = cv2.addWeighted(y, _TOOTH_GAIN, paper, -_TOOTH_GAIN, 140.0, dtype=cv2.CV_8U)
        share = _TOOTH_MIX * amount
        cv2.addWeighted(y, 1.0 - share, caught, share, 0.0, dst=y)

    def _chalk(
        self,
        y: np.ndarray,
        u: np.ndarray,
        v: np.ndarray,
        half: np.ndarray,
        effects: Effects,
        scale: float,
    ) -> None:
        """Chalk strokes along the camera's edges on a smudged board, broken by its grain."""
        cv2 = _cv2()
        shape = (y.shape[0], y.shape[1])
        cv2.multiply(y, _texture("board", shape), dst=y, scale=1.0 / 255.0)
        lines = self._lines(half, effects if effects.line > 0 else _CHALK_LINES, scale)
        lines *= np.float32(effects.material_strength * max(effects.line, 0.9))
        strokes_half = cv2.convertScaleAbs(lines, alpha=255.0)
        strokes = cv2.resize(strokes_half, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
        cv2.multiply(strokes, _texture("chalk", shape), dst=strokes, scale=1.0 / 255.0)
        # y += strokes * (chalk white - y)
        room = cv2.subtract(np.full_like(y, _CHALK_WHITE), y)
        cv2.multiply(room, strokes, dst=room, scale=1.0 / 255.0)
        cv2.add(y, room, dst=y)
        keep_half = cv2.bitwise_not(strokes_half)
        _neutral_chroma(u, keep_half)
        _neutral_chroma(v, keep_half)


#: Stone albedo (RGB) and the shading floor (how light the deepest shadow stays).
_STONE: dict[str, tuple[Triple, float]] = {
    "marble": ((0.96, 0.94, 0.90), 0.5),
    "stone": ((0.78, 0.76, 0.72), 0.25),
}
#: Paper tooth: the dither's contrast, and how much of it a grain of 1 mixes in.
_TOOTH_GAIN = 1.6
_TOOTH_MIX = 0.6
#: The darkest cel band's luma.
_CEL_FLOOR = 0.08
#: A slate blackboard, and the luma level chalk strokes reach.
_BOARD = (0.16, 0.20, 0.18)
_CHALK_WHITE = 236
#: The line settings chalk strokes use when the look sets none.
_CHALK_LINES = Effects(line=1.0, line_width=3.0, line_threshold=0.15)


def _keep(darkness: np.ndarray, amount: float) -> np.ndarray:
    """A uint8 multiplier (255: unchanged) from a shared darkness map, scaled by amount."""
    cv2 = _cv2()
    return cv2.addWeighted(darkness, -amount, darkness, 0.0, 255.0, dtype=cv2.CV_8U)


@lru_cache(maxsize=12)
def _texture(kind: str, shape: tuple[int, int]) -> np.ndarray:
    """A static texture, uint8 (H, W), the same for every session of an output size.

    Materials and "paper" are darkness maps (0: none), scaled per look by `_keep`; "board" and
    "chalk" are multipliers (255: unchanged); "screen" and "tooth" are threshold maps
    (a halftone screen, the paper's height). Read only.
    """
    height = shape[0]
    scale = height / _REFERENCE_HEIGHT
    makers: dict[str, Callable[..., np.ndarray]] = {
        "marble": _marble,
        "stone": _stone,
        "metal": _brushed,
        "bronze": _brushed,
        "gold": _brushed,
        "chrome": _brushed,
        "tooth": _paper_tooth,
        "paper": _paper,
        "board": _board,
        "chalk": _chalk_grain,
        "screen": _screen,
    }
    maker = makers[kind]
    texture = maker(shape, scale) if maker is not _brushed else _brushed(shape, scale, kind)
    texture.flags.writeable = False
    return texture


def _noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth noise with features about `scale` pixels across: zero mean, unit variance."""
    cv2 = _cv2()
    height, width = shape
    scale = max(scale, 1.0)
    grid = rng.standard_normal(
        (math.ceil(height / scale) + 3, math.ceil(width / scale) + 3)
    ).astype(np.float32)
    size = (round(grid.shape[1] * scale), round(grid.shape[0] * scale))
    out = np.ascontiguousarray(
        cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC)[:height, :width]
    )
    out -= out.mean()
    out /= max(float(out.std()), 1e-6)
    return out


def _fractal(shape: tuple[int, int], scale: float, octaves: int, seed: int) -> np.ndarray:
    """Octaves of `_noise`, each half the size and amplitude of the last; unit variance."""
    rng = np.random.default_rng(seed)
    total = np.zeros(shape, np.float32)
    amplitude = 1.0
    for _ in range(octaves):
        total += np.float32(amplitude) * _noise(shape, scale, rng)
        scale /= 2.0
        amplitude *= 0.5
    total /= max(float(total.std()), 1e-6)
    return total


def _marble(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Marble: grey veins that wander, fork, swell and fade, over faint clouding.

    The veins are the zero line of a smooth noise (few octaves: long curves, not the
    islands of a map) whose domain two finer noises warp, so the lines wiggle. The smooth
    fields are made at half resolution (a quarter of the time) and the veins drawn from
    them at full resolution, so they stay crisp: ~70 ms at 1280x704, once per size."""
    cv2 = _cv2()
    height, width = shape
    low = (max(2, (height + 1) // 2), max(2, (width + 1) // 2))
    s = scale / 2.0
    yy, xx = np.mgrid[0 : low[0], 0 : low[1]].astype(np.float32)
    field = _fractal(low, 300 * s, 3, _SEEDS["veins"])
    push = np.float32(120 * s)
    xx += push * _fractal(low, 200 * s, 6, _SEEDS["veins"] + 1)
    yy += push * _fractal(low, 140 * s, 6, _SEEDS["veins"] + 2)
    warped = cv2.remap(field, xx, yy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    fade = _smoothstep(_fractal(low, 350 * s, 3, _SEEDS["veins"] + 3), -0.5, 1.0)
    warped = cv2.resize(warped, (width, height), interpolation=cv2.INTER_CUBIC)
    fade = cv2.resize(fade, (width, height), interpolation=cv2.INTER_LINEAR)
    vein_width = np.float32(0.06) * (np.float32(0.4) + np.float32(1.2) * fade)
    thin = np.exp(-np.square(warped / vein_width))
    cloud = np.exp(-np.square(warped / np.float32(0.4)))
    darkness = thin * (np.float32(0.2) + np.float32(0.8) * fade) + np.float32(0.3) * cloud
    return _to_u8(np.float32(0.18) * darkness)


def _stone(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Sandstone / limestone: mottled patches and a fine speckle of darker grains."""
    mottle = _fractal(shape, 90 * scale, 4, _SEEDS["mottle"])
    fine = _noise(shape, 1.5 * scale + 0.5, np.random.default_rng(_SEEDS["mottle"] + 1))
    speck = np.clip(fine - np.float32(1.5), 0.0, None)
    darkness = 0.07 + 0.06 * mottle + 0.03 * fine + 0.05 * speck
    return _to_u8(darkness)


def _brushed(shape: tuple[int, int], scale: float, material: str) -> np.ndarray:
    """Metal: streaks of a brushed finish (steel), a cast's patina (bronze), faint for gold
    and none for polished chrome."""
    cv2 = _cv2()
    rng = np.random.default_rng(_SEEDS["brushed"])
    streaks = rng.standard_normal(shape).astype(np.float32)
    length = max(3, int(40 * scale) | 1)
    streaks = cv2.blur(streaks, (length, 1))
    streaks /= max(float(streaks.std()), 1e-6)
    amount = {"metal": 0.05, "chrome": 0.0, "bronze": 0.03, "gold": 0.02}[material]
    darkness = amount * (1.5 + streaks)
    if material == "bronze":
        patina = _fractal(shape, 70 * scale, 3, _SEEDS["mottle"])
        darkness += 0.06 * np.maximum(patina, 0.0)
    return _to_u8(darkness)


def _paper_tooth(shape: tuple[int, int], scale: float) -> np.ndarray:
    """The paper's height map for `_tooth`: fine grain, a little stretched along the
    sheet like cold-pressed paper; uint8 around 128."""
    cv2 = _cv2()
    rng = np.random.default_rng(_SEEDS["tooth"])
    fine = rng.standard_normal(shape).astype(np.float32)
    fine = cv2.GaussianBlur(fine, (0, 0), max(0.5, 0.8 * scale))
    fine /= max(float(fine.std()), 1e-6)
    fibres = cv2.GaussianBlur(fine, (0, 0), sigmaX=max(1.0, 4.0 * scale), sigmaY=max(0.5, scale))
    fibres /= max(float(fibres.std()), 1e-6)
    texture = fine + np.float32(0.6) * fibres
    texture /= max(float(texture.std()), 1e-6)
    return _to_u8(np.float32(0.5) + np.float32(0.2) * texture)


def _paper(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Cold-pressed watercolour paper: soft bumps a few pixels across and a fine grain,
    as a darkness map (0: none)."""
    rng = np.random.default_rng(_SEEDS["paper"])
    bumps = _noise(shape, 4.0 * scale, rng)
    fine = _noise(shape, 1.2 * scale, rng)
    cloud = _fractal(shape, 80 * scale, 3, _SEEDS["paper"] + 1)
    return _to_u8(np.float32(0.06) + 0.035 * bumps + 0.015 * fine + 0.02 * cloud)


def _board(shape: tuple[int, int], scale: float) -> np.ndarray:
    """Blackboard smudges, where old chalk was wiped: a luma multiplier (255: x1)."""
    smudge = _fractal(shape, 120 * scale, 4, _SEEDS["board"])
    return _to_u8(np.float32(0.9) + np.float32(0.07) * smudge)


def _chalk_grain(shape: tuple[int, int], scale: float) -> np.ndarray:
    """How much chalk a rough board takes: strokes break up (255: the full stroke)."""
    cv2 = _cv2()
    rng = np.random.default_rng(_SEEDS["chalk"])
    grain = rng.standard_normal(shape).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), max(0.5, 0.7 * scale))
    grain /= max(float(grain.std()), 1e-6)
    return _to_u8(_smoothstep(grain, -2.0, 0.3))


def _screen(shape: tuple[int, int], scale: float) -> np.ndarray:
    """A 45-degree round-dot halftone threshold map, uint8. Thresholds run from 16% to
    84%, so whites stay white, blacks black, and only the mid-tones turn to dots."""
    height, width = shape
    pitch = max(6.0 * scale, 3.0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    k = np.float32(2 * math.pi / pitch / math.sqrt(2.0))
    screen = np.cos((xx + yy) * k) + np.cos((xx - yy) * k)
    return _to_u8(np.float32(0.5) + np.float32(0.17) * screen)


def _ramp(material: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A metal's gradient map, luma -> R, G, B (256 float32 entries each)."""
    return _RAMPS[material]


def _make_ramp(points: list[tuple[float, Triple]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.linspace(0.0, 1.0, 256)
    stops = [p for p, _ in points]
    channels = [
        np.interp(x, stops, [colour[c] for _, colour in points]).astype(np.float32)
        for c in range(3)
    ]
    return channels[0], channels[1], channels[2]


#: Gradient maps: a dark body, the metal's colour in the mid-tones and a specular top;
#: chrome reflects in bands, like a polished mirror.
_RAMPS = {
    "metal": _make_ramp(
        [
            (0.0, (0.04, 0.05, 0.06)),
            (0.3, (0.24, 0.26, 0.29)),
            (0.6, (0.52, 0.55, 0.59)),
            (0.82, (0.80, 0.82, 0.85)),
            (0.92, (0.96, 0.97, 0.98)),
            (1.0, (1.0, 1.0, 1.0)),
        ]
    ),
    "bronze": _make_ramp(
        [
            (0.0, (0.05, 0.02, 0.01)),
            (0.3, (0.25, 0.12, 0.05)),
            (0.6, (0.60, 0.36, 0.15)),
            (0.8, (0.92, 0.68, 0.36)),
            (1.0, (1.0, 0.95, 0.82)),
        ]
    ),
    "gold": _make_ramp(
        [
            (0.0, (0.10, 0.05, 0.0)),
            (0.3, (0.45, 0.28, 0.04)),
            (0.6, (0.85, 0.62, 0.14)),
            (0.82, (1.0, 0.85, 0.36)),
            (1.0, (1.0, 0.98, 0.82)),
        ]
    ),
    "chrome": _make_ramp(
        [
            (0.0, (0.02, 0.02, 0.03)),
            (0.18, (0.55, 0.58, 0.62)),
            (0.32, (0.16, 0.17, 0.19)),
            (0.52, (0.92, 0.94, 0.97)),
            (0.68, (0.40, 0.42, 0.46)),
            (0.85, (0.80, 0.83, 0.87)),
            (1.0, (1.0, 1.0, 1.0)),
        ]
    ),
}
