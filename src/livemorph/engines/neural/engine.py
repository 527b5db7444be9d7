"""The neural engine: real style-transfer networks restyle the camera in real time on a CPU.

Per frame (1280x704 output, 224x124 network; figures in bench/engine.py):

1. one swscale pass takes the decoded yuv420p frame straight to planar float RGB at the
   network's size (area filter: it also averages away most camera noise);
2. the stabiliser blends that input with the previous one where the camera is still;
3. multistyle26 renders it in the prompt's blend of its 26 learned styles (the heaviest
   step by far);
4. at that low resolution: the reference image's palette, the prompt's grade, the mix with
   the camera picture by the look's strength, the look's image effects (effects.py) and
   the temporal blend;
5. guided upsampling (guided.py) back to the output size: the stylised picture is fitted,
   window by window, as a linear function of the camera's luma, and that fit is applied to
   the camera's full-resolution luma, so every edge in the output is the camera's own,
   drawn in the style's colours; the network's invented texture is added back on top.
   Inside faces (faces.py: a Haar cascade every few frames, tracked in between) the fit
   keeps more of the camera's structure and less invented texture, so eyes and mouths
   stay readable in every style;
6. the look's full-resolution effects (line art, grain) on the output planes.

Options (`--engine neural:size=384x208,threads=1,stabilise=0,structure=0.2,faces=0`): the
network size for 16:9 output (other aspects keep its width), `auto` by default: each
session starts at the smallest and steps up while the whole process has time to spare
(scaler.py); the intra-op threads, whether to stabilise, the least share of the camera's
structure kept everywhere, and whether to protect faces.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import cv2
import numpy as np
from av import VideoFrame
from av.video.reformatter import VideoReformatter

from ...media.frames import fit_frame
from ...models import ModelSpec
from ..base import Controls, Engine, EngineSession
from . import guided
from .effects import EffectsRenderer
from .faces import FaceTracker, load_cascade
from .look import NUM_STYLES, Grade, Look
from .networks import StyleNetworks, available_cores
from .scaler import LADDER, START, CpuMeter, NetworkScaler, Size
from .temporal import Stabiliser

logger = logging.getLogger(__name__)

#: The network's starting input size for 16:9-ish output (1280x704); see `network_size`.
#: The network runs on one core, so its size sets the frame rate whatever the core count:
#: on a slow 2-core machine, end to end with the client beside the server, 224x124 gave
#: 18 fps at 141 ms p50 and 256x140 14-15 fps at 165 ms (bench/engine.py --parts e2e),
#: while a core three times as fast runs 320x176 at 46 fps. Hence `size=auto`.
DEFAULT_SIZE = LADDER[START]
#: The least share of the camera's luma contrast the output keeps everywhere (guided.py's
#: floor): enough that a style which flattens a region still shows what is there.
DEFAULT_STRUCTURE = 0.15
#: Inside faces: the camera's luma contrast kept at least, and the share of the network's
#: invented texture shown. Chosen on the astronaut photo under the 26 built-in styles: a
#: face detector the engine does not use (scikit-image's LBP cascade) finds the face in the
#: output of 25 of them, against 9 with a plain upscale and 12 with the guided fit alone
#: (bench/engine.py --parts faces), while the face keeps the style's colours.
FACE_STRUCTURE = 0.8
FACE_TEXTURE = 0.2
#: The guided fit's window radius inside faces, as a share of the face's width: wide
#: enough that the style's strokes do not cross eyes and mouth (0.18: 8 network pixels
#: for the astronaut's face at 224x124).
FACE_RADIUS = 0.18
#: Reference image -> style blend: how many of the nearest styles, and how sharply.
NEAREST_STYLES = 3
STYLE_TEMPERATURE = 0.25
#: The palette a reference image lends is capped at this gain per channel.
MAX_PALETTE_GAIN = 3.0
#: How much of the stylised picture shows when a reference image comes without a prompt.
IMAGE_STRENGTH = 0.9

#: What `--engine neural:key=value,...` may set.
OPTIONS = ("size", "threads", "spin", "runs", "stabilise", "structure", "faces", "nice")

_RGB_TO_YUV = np.array(
    [[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], np.float32
)
_YUV_TO_RGB = np.linalg.inv(_RGB_TO_YUV).astype(np.float32)


class LookSource(Protocol):
    """What turns a prompt into a `Look`: `styles.StyleCatalog`, or a stand-in in tests."""

    def look_for(self, prompt: str, enhance: bool = True) -> Look: ...


def network_size(width: int, height: int, base: tuple[int, int] = DEFAULT_SIZE) -> tuple[int, int]:
    """The network's input size for a `width` x `height` output: `base` when the aspects
    agree, else `base`'s width and the output's aspect (multiples of 4 either way)."""
    if abs(base[0] * height / (base[1] * width) - 1.0) < 0.02:
        return base
    return base[0], max(4, round(base[0] * height / width / 4) * 4)


def _sizes(option: str) -> tuple[Size, ...]:
    """The network sizes a session may use: the whole ladder for `auto`, else the one given."""
    if option == "auto":
        return LADDER
    width, _, height = option.partition("x")
    size = (int(width), int(height))
    if size[0] % 4 or size[1] % 4 or min(size) < 16:
        raise ValueError("the network size must be auto, or multiples of 4, at least 16")
    return (size,)


def parse_options(text: str) -> dict[str, str]:
    """`size=384x208,threads=1` -> {"size": "384x208", "threads": "1"}."""
    options = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in OPTIONS:
            raise ValueError(f"bad neural engine option {part!r} (known: {', '.join(OPTIONS)})")
        options[key] = value
    return options


def _flag(value: str) -> bool:
    return value.strip().lower() not in ("0", "off", "false", "no")


def _synthetic_content(size: int = 128, seed: int = 7) -> np.ndarray:
    """A photo-like test card (1/f colour noise): content for rendering the 26 styles."""
    rng = np.random.default_rng(seed)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    falloff = np.maximum(fx**2 + fy**2, 1.0 / size**2) ** -0.9
    planes = []
    for _ in range(3):
        spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) * falloff
        plane = np.real(np.fft.ifft2(spectrum))
        planes.append(0.5 + 0.18 * (plane - plane.mean()) / plane.std())
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)[None]


class NeuralEngine(Engine):
    """multistyle26 for every frame, arbitrary_predict for reference images.

    Heavy state (ONNX sessions, the prompt catalog) loads on first use in a worker thread,
    so starting the first session does not stall the event loop, and once per process.
    """

    name = "neural"

    def __init__(self, options: str = "", catalog: LookSource | None = None) -> None:
        parsed = parse_options(options)
        self.sizes = _sizes(parsed.get("size", "auto"))
        self.threads = int(parsed.get("threads", "1"))
        self.permits = int(parsed["runs"]) if "runs" in parsed else None
        nice = parsed.get("nice", "0")
        self.nice: int | None = None if nice == "idle" else int(nice)
        self.spinning = _flag(parsed.get("spin", "0"))
        self.stabilise = _flag(parsed.get("stabilise", "1"))
        self.structure = float(parsed.get("structure", DEFAULT_STRUCTURE))
        if not 0.0 <= self.structure <= 1.0:
            raise ValueError("structure must be between 0 and 1")
        self.protect_faces = _flag(parsed.get("faces", "1"))
        self._cascade: cv2.CascadeClassifier | None = None
        self._lock = threading.Lock()
        self._networks: StyleNetworks | None = None
        self._helpers: ThreadPoolExecutor | None = None
        self._catalog = catalog
        self._style_bank: np.ndarray | None = None
        self.cpu = CpuMeter()

    @property
    def helpers(self) -> ThreadPoolExecutor:
        """Threads for work that runs beside the network (face detection, the chroma planes)."""
        with self._lock:
            if self._helpers is None:
                self._helpers = ThreadPoolExecutor(
                    max_workers=available_cores(), thread_name_prefix="neural-helper"
                )
            return self._helpers

    def lower_priority(self) -> None:
        """Give the calling thread the engine's priority (see `nice`), once per thread."""
        if self.nice != 0:
            _lower_priority(self.nice)

    def face_tracker(self) -> FaceTracker | None:
        """A face tracker for a new session (None with faces=0); the cascade loads once."""
        if not self.protect_faces:
            return None
        with self._lock:
            if self._cascade is None:
                self._cascade = load_cascade()
            cascade = self._cascade
        return FaceTracker(self.helpers.submit, cascade)

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False, cancel_futures=True)

    @property
    def networks(self) -> StyleNetworks:
        with self._lock:
            if self._networks is None:
                self._networks = StyleNetworks(self.threads, self.spinning, self.permits)
            return self._networks

    def look_for(self, prompt: str, enhance: bool) -> Look:
        """The prompt's look from the style catalog (loaded on first use)."""
        with self._lock:
            if self._catalog is None:
                from .styles import StyleCatalog

                self._catalog = StyleCatalog.load()
            catalog = self._catalog
        return catalog.look_for(prompt, enhance)

    def style_bank(self) -> np.ndarray:
        """Style embeddings (26 x 100) of the built-in styles, computed once, on first use.

        Each style renders the same test card and arbitrary_predict embeds the render: a
        reference picture is then matched against these. Recovers the right style from a
        photo rendered in it for 50 of 52 style/photo pairs (bench/engine.py).
        """
        networks = self.networks
        with self._lock:
            if self._style_bank is not None:
                return self._style_bank
        content = _synthetic_content()
        rows = []
        for index in range(NUM_STYLES):
            weights = np.zeros(NUM_STYLES, np.float32)
            weights[index] = 1.0
            render = networks.stylize(content, weights)[0]
            rgb = (np.clip(render.transpose(1, 2, 0), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            rows.append(networks.style_vector(rgb))
        bank = np.stack(rows)
        with self._lock:
            self._style_bank = bank
        return bank

    def weights_for_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The blend of built-in styles nearest a picture's style, and the picture's palette.

        Weights go to the `NEAREST_STYLES` styles whose embedding is closest to the
        picture's, softmax-weighted by distance. The palette is the mean and spread of the
        picture's Y, U, V (0..1), shape (3, 2).
        """
        bank = self.style_bank()
        distances = np.linalg.norm(bank - self.networks.style_vector(image), axis=1)
        nearest = np.argsort(distances)[:NEAREST_STYLES]
        scores = np.exp(-(distances[nearest] - distances[nearest[0]]) / STYLE_TEMPERATURE)
        weights = np.zeros(NUM_STYLES, np.float32)
        weights[nearest] = scores / scores.sum()
        return weights, palette_of(image)

    def open_session(self, spec: ModelSpec) -> NeuralSession:
        return NeuralSession(spec, self)


def palette_of(image: np.ndarray) -> np.ndarray:
    """Mean and standard deviation of Y, U, V over an RGB uint8 picture: shape (3, 2)."""
    step = max(1, min(image.shape[:2]) // 128)
    rgb = image[::step, ::step, :3].reshape(-1, 3).astype(np.float32) / 255.0
    yuv = rgb @ _RGB_TO_YUV.T
    return np.stack([yuv.mean(axis=0), yuv.std(axis=0) + 1e-3], axis=1)


def palette_affine(planar: np.ndarray, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The affine map (matrix, offset) on RGB that gives a planar image (3, h, w) the
    palette's Y/U/V mean and spread."""
    sample = planar[:, ::2, ::2].reshape(3, -1)
    yuv = _RGB_TO_YUV @ sample
    mean, std = yuv.mean(axis=1), yuv.std(axis=1) + 1e-3
    gain = np.clip(palette[:, 1] / std, 1.0 / MAX_PALETTE_GAIN, MAX_PALETTE_GAIN)
    matrix = _YUV_TO_RGB @ (gain[:, None] * _RGB_TO_YUV)
    offset = _YUV_TO_RGB @ (palette[:, 0] - gain * mean)
    return matrix.astype(np.float32), offset.astype(np.float32)


def colour(planar: np.ndarray, palette: np.ndarray | None, grade: Grade) -> np.ndarray:
    """Palette transfer, then the grade, as one affine map over a planar RGB image (3, h, w),
    clipped to 0..1. Both are linear in RGB, so at low resolution this is one small pass."""
    from .styles import grade_matrix

    matrix, offset = np.eye(3, dtype=np.float32), np.zeros(3, np.float32)
    if palette is not None:
        matrix, offset = palette_affine(planar, palette)
    if grade != Grade():
        grade_m, grade_o = grade_matrix(grade)
        matrix, offset = grade_m @ matrix, grade_m @ offset + grade_o
    out = np.tensordot(matrix.astype(np.float32), planar, axes=1)
    out += offset.astype(np.float32)[:, None, None]
    return np.clip(out, 0.0, 1.0, out=out)


class NeuralSession(EngineSession):
    """One stream's look, buffers and temporal state.

    The prompt picks a `Look` from the catalog: a blend of the 26 styles, a strength and a
    colour grade. A reference image replaces the look's style blend with the built-in
    styles nearest the picture's own style (by arbitrary_predict's style embedding) and
    lends its palette (colour mean and spread); the prompt, if any, still sets the strength
    and the colour grade on top. Clearing the image restores the prompt's look exactly.

    For `lucy_2_rt` the reference image is meant as "a character or object to bring into
    the scene". These networks cannot do that: they change how a picture is painted, never
    what is in it, and cannot insert, replace or track an object. What the image does here
    is the same as for the restyle models: its style and palette restyle the whole scene.
    A person or object shown in the reference does not appear in the output.

    `look` is the look last applied (None in passthrough); `description` its fuller text.
    """

    def __init__(self, spec: ModelSpec, engine: NeuralEngine) -> None:
        super().__init__(spec)
        self.engine = engine
        self.scaler = NetworkScaler(
            [network_size(spec.width, spec.height, size) for size in engine.sizes],
            interval=1.0 / spec.fps,
            start=network_size(spec.width, spec.height, DEFAULT_SIZE),
            cores=available_cores(),
        )
        #: The machine's idle CPU, shared by the engine's sessions (replaceable in tests).
        self.cpu: CpuMeter = engine.cpu
        self._last_time: float | None = None
        self.look: Look | None = None
        self._prompt_look: Look | None = None
        #: The reference image last embedded (held, so identity means "same picture"),
        #: the style blend it chose and its palette.
        self._image: np.ndarray | None = None
        self._image_weights: np.ndarray | None = None
        self._palette: np.ndarray | None = None
        self.stabiliser = Stabiliser() if engine.stabilise else Stabiliser(hold=0.0, denoise=0.0)
        self._resize(self.scaler.size)
        # keeps its swscale context between frames
        self._down = VideoReformatter()
        self.faces = engine.face_tracker()
        self.effects = EffectsRenderer((spec.width, spec.height), self.size)

    def _resize(self, size: Size) -> None:
        """Run the network at `size` from the next frame on (buffers, temporal state)."""
        self.size = size
        width, height = size
        self._input = np.empty((1, 3, height, width), np.float32)
        self._styled = np.empty((1, 3, height, width), np.float32)
        self.stabiliser.reset()

    @property
    def description(self) -> str | None:
        if self.look is None or not self.look.description:
            return None
        return self.look.description

    @property
    def network_size(self) -> Size:
        """The size the scaler chose last (`_resize` sets it)."""
        return self.size

    def configure(self, controls: Controls) -> None:
        self.engine.lower_priority()
        self.stabiliser.reset()  # the next frame shows the new look alone, whatever it is
        if controls.passthrough:
            self.look = self._prompt_look = None
            self._image = self._image_weights = self._palette = None
            return
        prompt_look = (
            self.engine.look_for(controls.prompt, controls.enhance)
            if controls.prompt is not None
            else None
        )
        if controls.image is None:
            self._image = self._image_weights = self._palette = None
        elif controls.image is not self._image:  # a prompt change keeps the same array
            self._image_weights, self._palette = self.engine.weights_for_image(controls.image)
            self._image = controls.image
        self._prompt_look = prompt_look
        self.look = self._effective_look()
        logger.debug("look: %s", self.look.name)

    def _effective_look(self) -> Look:
        base = self._prompt_look
        if self._image_weights is None:
            assert base is not None
            return base
        if base is None:
            return Look(self._image_weights, strength=IMAGE_STRENGTH, name="reference image")
        return dataclasses.replace(
            base, weights=self._image_weights, name=f"{base.name} + reference image"
        )

    def transform(self, frame: VideoFrame) -> VideoFrame:
        self.engine.lower_priority()
        started = time.perf_counter()
        camera = fit_frame(frame, self.spec.width, self.spec.height)
        look = self.look
        if look is None:
            return camera
        output = self._restyle(camera, look)
        seconds = time.perf_counter() - started
        if (size := self.scaler.record(seconds, self.cpu.spare(), self._missed(frame))) is not None:
            logger.info(
                "network size %dx%d -> %dx%d: %s (frames took %.1f ms of every %.0f ms, "
                "%.0f%% of the CPU idle, %.2f frames missed per frame)",
                *self.size,
                *size,
                self.scaler.reason,
                1000 * (self.scaler.left_at or 0.0),
                1000 * self.scaler.interval,
                100 * self.scaler.spare,
                self.scaler.drops,
            )
            self._resize(size)
        return output

    def _missed(self, frame: VideoFrame) -> int:
        """Camera frames missed since the previous one, from the gap in their timestamps:
        frames the pipeline dropped because the engine was still busy (a 30 fps camera
        into a 25 fps model leaves gaps under two intervals, which do not count)."""
        when = frame.time
        previous, self._last_time = self._last_time, when
        if when is None or previous is None or when <= previous:
            return 0
        return max(0, int((when - previous) * self.spec.fps + 0.25) - 1)

    def _restyle(self, camera: VideoFrame, look: Look) -> VideoFrame:
        width, height = self.spec.width, self.spec.height
        strength = float(np.clip(look.strength, 0.0, 1.0))
        y_camera = _plane(camera, 0)

        small_w, small_h = self.size
        planar = self._down.reformat(
            camera, small_w, small_h, format="gbrpf32le", interpolation="AREA", threads=1
        )
        net_input = self._input[0]
        for channel, plane in zip((1, 2, 0), planar.planes, strict=True):  # G, B, R planes
            rows = np.frombuffer(memoryview(plane), np.float32).reshape(
                small_h, plane.line_size // 4
            )
            net_input[channel] = rows[:, :small_w]
        self.stabiliser.denoise(net_input)
        guide = guided.planar_to_yuv(net_input)[0]
        if self.faces is not None:
            self.faces.update(guide)

        styled = self.engine.networks.stylize(self._input, look.weights, out=self._styled)[0]
        mixed = colour(styled, self._palette, look.grade)
        if strength < 1.0:
            mixed *= strength
            mixed += (1.0 - strength) * net_input
        if look.effects.active:
            self.effects.small(mixed, net_input, look.effects)
        self.stabiliser.stabilise(mixed)

        yuv = guided.planar_to_yuv(mixed)
        output = VideoFrame(width, height, "yuv420p")
        mask = self.faces.mask(small_w, small_h) if self.faces is not None else None
        # the camera's share of the mix keeps all of its detail, the stylised share is cored
        coring = guided.CORING * strength
        # the chroma planes on a helper, beside the luma plane here: 3 ms less per frame
        chroma = self.engine.helpers.submit(
            self._chroma, guide, yuv, mask, y_camera, output, coring
        )
        gain, offset = self._fit(guide, yuv[0], mask, luma=True)
        guided.apply(gain, offset, guide, y_camera, _plane(output, 0), coring, keep=mask)
        chroma.result()
        if look.effects.active:
            self.effects.full(
                _plane(output, 0), _plane(output, 1), _plane(output, 2), y_camera, look.effects
            )
        return output

    def _chroma(
        self,
        guide: np.ndarray,
        yuv: np.ndarray,
        mask: np.ndarray | None,
        y_camera: np.ndarray,
        output: VideoFrame,
        coring: float,
    ) -> None:
        """The U and V planes of `output`, guided by the camera luma at their size."""
        self.engine.lower_priority()
        y_half = _half_luma(y_camera)
        for index in (1, 2):
            gain, offset = self._fit(guide, yuv[index], mask, luma=False)
            guided.apply(gain, offset, guide, y_half, _plane(output, index), coring)

    def _fit(
        self, guide: np.ndarray, target: np.ndarray, mask: np.ndarray | None, luma: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Guided-upsampling coefficients for one plane, with faces (`mask`) protected.

        Outside faces: a small window and the engine's structure floor (luma only). Inside
        (blended by the soft face mask): a window as wide as an eye-to-eye distance, so
        the face takes the style's colours but not its strokes across eyes and mouth, at
        least `FACE_STRUCTURE` of the camera's contrast, and `FACE_TEXTURE` of the
        network's invented texture.
        """
        floor = self.engine.structure if luma else 0.0
        gain, offset = guided.fit(guide, target, floor=floor)
        if mask is None or self.faces is None:
            return gain, offset
        face_gain, face_offset = guided.fit(
            guide,
            target,
            radius=max(2, round(FACE_RADIUS * self.faces.widest(guide.shape[1]))),
            floor=max(floor, FACE_STRUCTURE) if luma else 0.0,
            texture=FACE_TEXTURE,
        )
        gain += mask * (face_gain - gain)
        offset += mask * (face_offset - offset)
        return gain, offset


def _half_luma(y: np.ndarray) -> np.ndarray:
    """The luma at the chroma planes' size (yuv420p: half each way)."""
    return cv2.resize(y, (y.shape[1] // 2, y.shape[0] // 2), interpolation=cv2.INTER_AREA)


_niced: set[int] = set()


def _lower_priority(nice: int | None) -> None:
    """Make the calling worker thread `nice` steps nicer (None: SCHED_IDLE), once per thread."""
    tid = threading.get_native_id()
    if tid not in _niced:
        _niced.add(tid)
        try:
            if nice is None:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            else:
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)
        except OSError:
            logger.warning("could not lower the engine thread's priority")


def _plane(frame: VideoFrame, index: int) -> np.ndarray:
    """A writable (height, width) uint8 view of one plane, without its row padding."""
    plane = frame.planes[index]
    rows = np.frombuffer(memoryview(plane), np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width]
