"""What the neural engine costs and what it buys, in figures.

    python bench/engine.py                                  # every part
    python bench/engine.py --parts network transform        # some of them
    python bench/engine.py --parts e2e --engines neural neural:nice=0 neural:threads=2
    python bench/engine.py --parts step --client stock --seconds 45 --repeat 5
    python bench/engine.py --parts trace --prompt "oil painting" --seconds 30

Parts:
- `network`: multistyle26 alone at each size of the scaler's ladder, for each ONNX Runtime
  setting (variants interleaved round by round, so a neighbour's load hits them all alike:
  on a shared machine trust the ratios more than the milliseconds).
- `transform`: the whole `transform` at 1280x704 output (the astronaut, face kept) for each
  network size of the ladder (network vs the rest); then each step's cost at 224x124: the
  swscale down-conversion, the network, colour, the guided fit and apply for luma and for
  chroma, face tracking and detection, the stabiliser (wall ms of the engine's own calls,
  wrapped where it looks them up, its helper work run inline so every step is timed in one
  thread); then whole-transform variants: helpers inline, `faces=0`, `structure=0`,
  `stabilise=0`, no colour grade.
- `faces`: what face protection buys: the astronaut with her whole face under each of the 26
  styles (one-hot, strength 0.9, the 8th frame of a still camera), for the default engine,
  `faces=0` and `faces=0,structure=0`: whether a face detector the engine does not use
  (scikit-image's LBP cascade) finds the face in the output, the correlation of Sobel
  gradient magnitude between output and camera luma in the face, mean |output - camera|
  and mean |style a - style b| (the styles must stay distinct).
- `flicker`: a still photo with fresh sensor-like noise in every frame: mean absolute
  change between consecutive outputs of the default engine and of `stabilise=0`; and a
  moving square: the stabiliser must not leave a trail or soften its edge.
- `match`: photos rendered in built-in style i, used as reference images: how often the
  style embedding finds style i again; and what arbitrary_transform would cost per frame.
- `e2e`: through a real `livemorph serve` on this machine, one and two sessions at the
  model's size: delivered fps, p50/p95 glass-to-glass latency, CPU of server, client
  and of anything else running on the machine at the time (if that is not near 0, the
  run was disturbed: measure again).
- `step`: what a user's app sees. A real `livemorph serve` (a fresh one per client, the
  whole frame through the engine: no stamp) gets the astronaut photo at the model's size and
  fps, its brightness stepping between full and 55% every 2 s, from the published
  `decart==0.0.30` client (`--client stock`) and from our SDK (`--client sdk`). The step
  response is the time from the source handing out the first frame of a new level until the
  first output frame whose mean luma is past halfway between the output's steady levels
  before and after (learnt from the run: the median of the late half of each held period).
  Per run (`--repeat`, `--seconds` after `--warmup`): delivered fps, step-response p50 and
  p95, the p50 of the run's first, middle and last third and last / first (creep), time to
  first frame (run 1 includes loading the engine), CPU, and the network sizes the scaler
  went through; then the median over the runs.
- `trace`: where the CPU goes per frame in the whole server process, one session at
  1280x704, 25 fps, on one core (this process pinned to the idlest): receiving the camera's
  RTP (SRTP, parse, depayload), aiortc's VP8 decoder on frames our encoder made of the
  astronaut panning with noise, fit_frame, each engine step (as in `transform`, with the
  look of `--prompt`, effects included), our VP8 encoder, its packetisation and the RTP
  send (serialise, SRTP); each step's median ms and share of the 40 ms interval, the sum,
  and the sum as CPU per second of video. Then a real `livemorph serve` at the same network
  size with one SDK session fed the same frames and prompt (`--seconds`, default 20): the
  server process's CPU seconds per delivered frame next to the trace's sum, so what the
  trace leaves out (asyncio, RTCP, jitter buffers, sockets, DTLS) shows as the difference.

Engines are pinned to the scaler's start size (224x124) except in `e2e` and `step` and
the per-size comparison: `size=auto` climbs after 50 frames on an idle machine.

The e2e part's latency needs the stamp that bench/latency.py's source draws in the top-left
368x48 px; a restyling engine paints over it, so for e2e the server runs each engine
wrapped as `stamped:<engine>` (stamp.py, known to the bench's server, bench_server.py),
which copies that corner from the camera into the output unchanged. The whole frame still
goes through the engine: the cost measured is the full cost. `step` and `trace` run the
engines unwrapped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import itertools
import os
import re
import statistics
import time
import types
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import cv2
import numpy as np
import onnxruntime as ort
from av import VideoFrame
from av.video.reformatter import VideoReformatter

from cpu import CpuSampler, machine_busy_seconds, process_cpu_seconds
from latency import (
    VIDEO_TIME_BASE,
    ConnectFn,
    Link,
    LiveServer,
    MediaStreamTrack,
    StampedSource,
    livemorph_server,
    measure,
)
from livemorph import create_client
from livemorph.engines.base import Controls
from livemorph.engines.neural import engine as neural
from livemorph.engines.neural import faces as faces_module
from livemorph.engines.neural import guided
from livemorph.engines.neural.look import NUM_STYLES, Grade, Look
from livemorph.engines.neural.networks import available_cores, model_bytes, session_options
from livemorph.engines.neural.scaler import LADDER, START
from livemorph.engines.neural.styles import apply_grade
from livemorph.media.encoder import RealtimeVp8Encoder
from livemorph.models import CATALOG

SIZES = list(LADDER)
OUTPUT = CATALOG["mirage"]
#: This process's cores when it started (the trace pins it to one for a while).
_AFFINITY = os.sched_getaffinity(0)


def timed(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall milliseconds of `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each variant, run round-robin so background load hits all alike."""
    for fn in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name] += timed(fn, 1)
    return {name: statistics.median(t) for name, t in times.items()}


def report(medians: dict[str, float], base: str | None = None, indent: str = "    ") -> None:
    reference = medians[base] if base else None
    for name, ms in medians.items():
        ratio = f"  x{ms / reference:.2f}" if reference else ""
        print(f"{indent}{name:<44} {ms:7.2f} ms{ratio}", flush=True)


def one_hot(index: int) -> np.ndarray:
    weights = np.zeros(NUM_STYLES, np.float32)
    weights[index] = 1.0
    return weights


def photo(width: int, height: int) -> np.ndarray:
    """A real picture (skimage's astronaut, cropped to the aspect) as RGB uint8."""
    from skimage.data import astronaut

    image = astronaut()
    rows = 512 * height // width
    crop = np.ascontiguousarray(image[(512 - rows) // 2 :][:rows])
    frame = VideoFrame.from_ndarray(crop, format="rgb24")
    return frame.reformat(width, height).to_ndarray(format="rgb24")


def yuv_frame(rgb: np.ndarray) -> VideoFrame:
    return VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
        format="yuv420p"
    )


def luma(frame: VideoFrame) -> np.ndarray:
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return rows[:, : plane.width].astype(np.float32)


def test_look(index: int = 13, strength: float = 0.9, grade: Grade | None = None) -> Look:
    grade = grade or Grade(saturation=1.2, contrast=1.05, brightness=0.03)
    return Look(one_hot(index), strength=strength, grade=grade, name=f"style {index}")


def session_for(engine: neural.NeuralEngine, look: Look) -> neural.NeuralSession:
    """A session showing `look`, without the prompt catalog (the image side alone)."""
    session = engine.open_session(OUTPUT)
    session.look = session._prompt_look = look
    return session


class Inline:
    """An executor that runs work at once in the caller: the serial baseline."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


#: The network size every session starts at (scaler.py). The parts below pin it: with
#: `size=auto` a session may climb to larger sizes after 50 frames on an idle machine.
START_SIZE = LADDER[START]
PINNED = f"size={START_SIZE[0]}x{START_SIZE[1]}"


def engine_with(
    options: str = "", shared: neural.NeuralEngine | None = None, inline: bool = False
) -> neural.NeuralEngine:
    """An engine at the start size (unless `options` names one) with `options`, on
    `shared`'s loaded networks if given; `inline`: its helper work (face detection, the
    chroma planes) runs in the calling thread instead of beside the network."""
    engine = neural.NeuralEngine(",".join(filter(None, (PINNED, options))))
    if shared is not None:
        engine._networks = shared.networks
    if inline:
        engine._helpers = Inline()  # type: ignore[assignment]
    return engine


def face_photo(width: int, height: int) -> np.ndarray:
    """The astronaut photo cropped to keep her whole face (`astronaut()[:281]`, about the
    aspect of 1280x704) and scaled to `width` x `height` (cv2 INTER_AREA): RGB uint8."""
    from skimage.data import astronaut

    return cv2.resize(astronaut()[:281], (width, height), interpolation=cv2.INTER_AREA)


class StepTimes:
    """Wall ms of named steps, per frame, taken by wrappers around the calls.

    A step's time leaves out the wrapped steps it calls (exclusive time), so the steps of
    a frame add up to the outermost call. `frame()` closes a frame, `discard()` drops it.
    Not thread-safe: wrap only what runs in one thread.
    """

    def __init__(self) -> None:
        self.frames: list[dict[str, float]] = []
        self.order: list[str] = []
        self._current: dict[str, float] = {}
        self._children: list[float] = []

    def wrap(self, name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = (time.perf_counter() - start) * 1000
                own = elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed
                step = name if isinstance(name, str) else name(*args, **kwargs)
                if step not in self.order:
                    self.order.append(step)
                self._current[step] = self._current.get(step, 0.0) + own

        return timed

    def frame(self) -> None:
        self.frames.append(self._current)
        self._current = {}

    def discard(self) -> None:
        self._current = {}

    def per_frame(self) -> dict[str, tuple[float, str]]:
        """Each step's median ms per frame, in the order steps first finished, with a note.

        A step that ran in under half the frames (face detection) counts the median of its
        runs times the share of frames it ran in, rather than a median of mostly zeros.
        """
        count = len(self.frames)
        result = {}
        for step in self.order:
            runs = [frame[step] for frame in self.frames if step in frame]
            if 2 * len(runs) >= count:
                values = [frame.get(step, 0.0) for frame in self.frames]
                result[step] = (statistics.median(values), "")
            else:
                share = len(runs) / count
                result[step] = (statistics.median(runs) * share, f"ran in {len(runs)}/{count}")
        return result

    def frame_totals(self) -> list[float]:
        return [sum(frame.values()) for frame in self.frames]


@contextlib.contextmanager
def instrumented(
    session: neural.NeuralSession, steps: StepTimes
) -> Iterator[Callable[[VideoFrame], VideoFrame]]:
    """`session.transform`, with each of its steps timed into `steps` while inside.

    The engine's own calls are wrapped where they are looked up (module globals, the
    session's objects), so the real code runs in its real order. The engine should run its
    helper work inline (`engine_with(inline=True)`): the wrappers time one thread.
    """
    width, height = session.spec.width, session.spec.height

    def guided_plane(*args: Any, **kwargs: Any) -> str:
        # session._fit(guide, target, luma=...) or guided.apply(gain, offset, guide, full, out)
        if "luma" in kwargs:
            return "guided fit: luma" if kwargs["luma"] else "guided fit: chroma (U, V)"
        full = args[4].shape == (height, width)
        return "guided apply: luma" if full else "guided apply: chroma (U, V)"

    names: list[tuple[object, str, str | Callable[..., str]]] = [
        (neural, "fit_frame", "fit_frame (camera to the output size)"),
        (neural, "_half_luma", "chroma guide: camera luma at half size"),
        (guided, "planar_to_yuv", "planar RGB -> YUV at the network's size (x2)"),
        (neural, "colour", "colour (palette, grade) at the network's size"),
        (session.stabiliser, "denoise", "stabiliser: input denoise"),
        (session.stabiliser, "stabilise", "stabiliser: output blend"),
        (session.engine.networks, "stylize", "network {}x{}"),
        (session.effects, "small", "effects at the network's size"),
        (session.effects, "full", "effects at full size"),
        (session, "_fit", guided_plane),
        (guided, "apply", guided_plane),
    ]
    if session.faces is not None:
        names += [
            (session.faces, "update", "face tracking (FaceTracker.update)"),
            (faces_module, "detect", f"face detection (Haar, 1 frame in {faces_module.EVERY})"),
        ]
    down = session._down
    with contextlib.ExitStack() as stack:
        for target, attribute, name in names:
            if isinstance(name, str) and "{}" in name:
                name = name.format(*session.size)
            wrapped = steps.wrap(name, getattr(target, attribute))
            stack.enter_context(mock.patch.object(target, attribute, wrapped))
        reformat = steps.wrap("swscale down-conversion (yuv420p -> planar float)", down.reformat)
        stack.enter_context(
            mock.patch.object(session, "_down", types.SimpleNamespace(reformat=reformat))
        )
        yield steps.wrap("the rest of transform (mix, copies, frame, scaler)", session.transform)


def print_steps(steps: StepTimes, interval_ms: float | None = None, indent: str = "    ") -> float:
    """Each step's median ms (and its share of `interval_ms`), then their sum; returns it."""
    rows = steps.per_frame()
    total = sum(ms for ms, _ in rows.values())
    for name, (ms, note) in [*rows.items(), ("sum of the medians", (total, ""))]:
        share = f" {100 * ms / interval_ms:6.1f}%" if interval_ms else ""
        print(f"{indent}{name:<54} {ms:7.2f} ms{share}  {note}", flush=True)
    return total


# -- network ---------------------------------------------------------------------------


def part_network(args: argparse.Namespace) -> None:
    print("\n## multistyle26 alone: median ms per frame, ratio to 1 thread", flush=True)
    cores = available_cores()

    def open_variant(threads: int, spin: bool, parallel: bool = False, level: str = "all"):
        options = session_options(threads, spin)
        if parallel:
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
            options.inter_op_num_threads = cores
        if level == "extended":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        return ort.InferenceSession(
            model_bytes("multistyle26"), options, providers=["CPUExecutionProvider"]
        )

    variants = {
        "1 thread (chosen)": open_variant(1, False),
        f"{cores} threads, spinning": open_variant(cores, True),
        f"{cores} threads, no spinning": open_variant(cores, False),
        f"{cores} threads, parallel execution mode": open_variant(cores, False, parallel=True),
        "1 thread, 'extended' instead of 'all' opt.": open_variant(1, False, level="extended"),
    }
    weights = one_hot(3)
    for width, height in SIZES:
        image = np.random.default_rng(0).random((1, 3, height, width), np.float32)
        feeds = {"image": image, "style_weights": weights}
        print(f"  {width}x{height} ({width * height} px)")
        report(
            interleaved(
                {name: functools.partial(s.run, None, feeds) for name, s in variants.items()},
                args.rounds,
            ),
            base="1 thread (chosen)",
        )

    print("  buffers, 224x124, 1 thread: a fresh output array per run vs a reused one")
    session = variants["1 thread (chosen)"]
    image = np.random.default_rng(0).random((1, 3, 124, 224), np.float32)
    out = np.empty_like(image)

    def bound() -> None:
        binding = session.io_binding()
        binding.bind_cpu_input("image", image)
        binding.bind_cpu_input("style_weights", weights)
        binding.bind_output("stylized", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        session.run_with_iobinding(binding)

    report(
        interleaved(
            {
                "session.run (allocates the output)": lambda: session.run(
                    None, {"image": image, "style_weights": weights}
                ),
                "io_binding into a reused buffer (chosen)": bound,
            },
            args.rounds * 2,
        )
    )


# -- transform -------------------------------------------------------------------------


def part_transform(args: argparse.Namespace) -> None:
    print(
        f"\n## transform at {OUTPUT.width}x{OUTPUT.height} output (the astronaut, face kept; "
        "style 13, strength 0.9, a grade): median ms, interleaved",
        flush=True,
    )
    frame = yuv_frame(face_photo(OUTPUT.width, OUTPUT.height))
    print("  per network size (each its own engine and runtime):")
    variants: dict[str, Callable[[], object]] = {}
    network_ms: dict[str, list[float]] = {}
    engines = []
    for width, height in LADDER:
        name = f"{width}x{height}"
        engine = engine_with(f"size={name}")
        engines.append(engine)
        network_ms[name] = []
        stylize = engine.networks.stylize
        engine.networks.stylize = functools.partial(  # type: ignore[method-assign]
            _timed_call, stylize, network_ms[name]
        )
        variants[name] = functools.partial(session_for(engine, test_look()).transform, frame)
    medians = interleaved(variants, args.rounds)
    for name, total in medians.items():
        network = statistics.median(network_ms[name])
        print(
            f"    network {name:>7}: transform {total:6.1f} ms ({1000 / total:5.1f} fps), "
            f"network {network:6.1f} ms, the rest {total - network:5.1f} ms",
            flush=True,
        )
    for engine in engines:
        engine.close()

    main = engine_with()
    steps = StepTimes()
    session = session_for(engine_with(shared=main, inline=True), test_look())
    with instrumented(session, steps) as transform:
        for index in range(args.rounds + 2):
            transform(frame)
            if index >= 2:
                steps.frame()
            else:
                steps.discard()
    print(
        f"  each step at {START_SIZE[0]}x{START_SIZE[1]}, helper work inline (so each step's "
        f"time is its CPU time), {len(steps.frames)} frames:"
    )
    print_steps(steps)
    sums = statistics.median(steps.frame_totals())
    print(f"    {'median of the per-frame sums':<54} {sums:7.2f} ms")

    print("  variants (one runtime shared; interleaved):")
    report(
        interleaved(
            {
                "default": functools.partial(
                    session_for(engine_with(shared=main), test_look()).transform, frame
                ),
                "... helpers inline, not beside the network": functools.partial(
                    session_for(engine_with(shared=main, inline=True), test_look()).transform,
                    frame,
                ),
                "... faces=0 (no face protection)": functools.partial(
                    session_for(engine_with("faces=0", main), test_look()).transform, frame
                ),
                "... structure=0 (no structure floor)": functools.partial(
                    session_for(engine_with("structure=0", main), test_look()).transform, frame
                ),
                "... stabilise=0": functools.partial(
                    session_for(engine_with("stabilise=0", main), test_look()).transform, frame
                ),
                "... without a colour grade": functools.partial(
                    session_for(engine_with(shared=main), test_look(grade=Grade())).transform,
                    frame,
                ),
            },
            args.rounds,
        ),
        base="default",
    )

    print("  camera (1280x704 yuv420p) -> network input (224x124 planar float):")
    reuse = VideoReformatter()

    def swscale() -> object:
        return frame.reformat(224, 124, format="gbrpf32le", interpolation="AREA").to_ndarray()

    def swscale_reused() -> object:
        return reuse.reformat(
            frame, 224, 124, format="gbrpf32le", interpolation="AREA", threads=1
        ).to_ndarray()

    def numpy_path() -> object:
        rgb = frame.to_ndarray(format="rgb24")[:620, :1120].astype(np.float32) / 255.0
        return rgb.reshape(124, 5, 224, 5, 3).mean(axis=(1, 3)).transpose(2, 0, 1)

    report(
        interleaved(
            {
                "full-size RGB array, then numpy area mean": numpy_path,
                "one swscale pass, new context": swscale,
                "one swscale pass, reused context (chosen)": swscale_reused,
            },
            args.rounds,
        )
    )

    print("  the colour grade at the network's size vs at the output size:")
    grade = Grade(saturation=1.3, contrast=1.1, brightness=0.02, tint=(1.1, 1.0, 0.9))
    small = np.random.default_rng(0).random((124, 224, 3), np.float32)
    large = np.random.default_rng(0).random((704, 1280, 3), np.float32)
    report(
        interleaved(
            {
                "grade 1280x704 (styles.apply_grade)": lambda: apply_grade(large, grade),
                "grade 224x124, then scale up (chosen)": lambda: apply_grade(small, grade),
            },
            args.rounds,
        )
    )
    main.close()


def _timed_call(fn: Callable[..., Any], times: list[float], *args: Any, **kwargs: Any) -> Any:
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        times.append((time.perf_counter() - start) * 1000)


# -- faces -----------------------------------------------------------------------------

#: The astronaut's face in `face_photo` at 1280x704, (x0, y0, x1, y1): hairline to chin,
#: cheek to cheek, read off the camera picture (the hair above and the ears beside left out).
FACE_BOX = (440, 190, 700, 450)
#: The check detector's input size.
CHECK_SIZE = (640, 352)
FACE_VARIANTS = {"default": "", "faces=0": "faces=0", "faces=0,structure=0": "faces=0,structure=0"}


class FaceCheck:
    """A face detector the engine does not use: scikit-image's LBP frontal-face cascade on
    the picture's grey (its luma) at `CHECK_SIZE`; a face counts as found only when a
    detection's centre lies in `FACE_BOX`."""

    def __init__(self) -> None:
        from skimage import data, feature

        self._cascade = feature.Cascade(data.lbp_frontal_face_cascade_filename())

    def centres(self, y: np.ndarray) -> list[tuple[float, float]]:
        """Detections' centres, in the full picture's pixels, of a luma plane (float)."""
        grey = cv2.resize(y, CHECK_SIZE, interpolation=cv2.INTER_AREA)
        grey = np.clip((grey - 16.0) / 219.0, 0.0, 1.0)  # video range -> 0..1
        found = self._cascade.detect_multi_scale(
            img=grey, scale_factor=1.2, step_ratio=1, min_size=(60, 60), max_size=(300, 300)
        )
        sx, sy = y.shape[1] / CHECK_SIZE[0], y.shape[0] / CHECK_SIZE[1]
        return [((d["c"] + d["width"] / 2) * sx, (d["r"] + d["height"] / 2) * sy) for d in found]

    def finds_face(self, y: np.ndarray) -> bool:
        x0, y0, x1, y1 = FACE_BOX
        return any(x0 <= cx <= x1 and y0 <= cy <= y1 for cx, cy in self.centres(y))


def gradient_magnitude(y: np.ndarray) -> np.ndarray:
    return cv2.magnitude(cv2.Sobel(y, cv2.CV_32F, 1, 0), cv2.Sobel(y, cv2.CV_32F, 0, 1))


def part_faces(args: argparse.Namespace) -> None:
    x0, y0, x1, y1 = FACE_BOX
    print(
        f"\n## faces: the astronaut under each of the {NUM_STYLES} styles (one-hot, strength "
        f"0.9, the 8th frame of a still camera): does a face detector the engine does not use "
        f"(skimage LBP cascade, {CHECK_SIZE[0]}x{CHECK_SIZE[1]} grey) find the face; Sobel "
        f"gradient-magnitude correlation with the camera's luma in the face (x {x0}-{x1}, "
        f"y {y0}-{y1}); mean |RGB output - camera| over the frame",
        flush=True,
    )
    camera = yuv_frame(face_photo(OUTPUT.width, OUTPUT.height))
    camera_y = luma(camera)
    camera_rgb = camera.to_ndarray(format="rgb24").astype(np.int16)
    camera_gradient = gradient_magnitude(camera_y)[y0:y1, x0:x1].ravel()
    check = FaceCheck()
    centres = ", ".join(f"({cx:.0f}, {cy:.0f})" for cx, cy in check.centres(camera_y))
    print(
        f"  the camera picture: face found {check.finds_face(camera_y)} (detections centred "
        f"at {centres or 'nowhere'})"
    )
    shared = engine_with()
    rows: dict[str, list[tuple[bool, float, float]]] = {}
    between: dict[str, float] = {}
    for name, options in FACE_VARIANTS.items():
        engine = engine_with(options, shared)
        results, outputs = [], []
        for index in range(NUM_STYLES):
            session = session_for(engine, Look(one_hot(index), strength=0.9, name=f"{index}"))
            for _ in range(8):
                output = session.transform(camera)
            y = luma(output)
            rgb = output.to_ndarray(format="rgb24").astype(np.int16)
            correlation = np.corrcoef(gradient_magnitude(y)[y0:y1, x0:x1].ravel(), camera_gradient)
            results.append(
                (
                    check.finds_face(y),
                    float(correlation[0, 1]),
                    float(np.abs(rgb - camera_rgb).mean()),
                )
            )
            outputs.append(rgb)
        engine.close()
        rows[name] = results
        between[name] = float(
            np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(outputs, 2)])
        )
    print("  style " + "".join(f"{name:>22}" for name in rows))
    print("        " + "  found  grad r  |o-c|" * len(rows))
    for index in range(NUM_STYLES):
        cells = "".join(
            f"   {'yes' if found else ' - '}    {r:5.2f}  {mad:5.1f}"
            for found, r, mad in (rows[name][index] for name in rows)
        )
        print(f"  {index:5d} {cells}", flush=True)
    for name, results in rows.items():
        correlations = [r for _, r, _ in results]
        print(
            f"  {name:<20} face found in {sum(f for f, _, _ in results):2d} of {NUM_STYLES} "
            f"styles; gradient r in the face median {statistics.median(correlations):4.2f} "
            f"(min {min(correlations):4.2f}); |output - camera| mean "
            f"{np.mean([m for _, _, m in results]):5.1f}; between styles mean "
            f"{between[name]:5.1f}",
            flush=True,
        )
    shared.close()
    held_out_prompts(camera, check)


def held_out() -> tuple[str, ...]:
    """The contact sheet's prompts in words of their own (scripts/contact_sheet.py's
    OWN_WORDS): never used to tune the face protection, which was set on the 26 one-hot
    styles above."""
    path = Path(__file__).resolve().parent.parent / "scripts" / "contact_sheet.py"
    spec = importlib.util.spec_from_file_location("contact_sheet", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.OWN_WORDS)


def held_out_prompts(camera: VideoFrame, check: FaceCheck) -> None:
    """The same check on the 12 held-out prompts, through the prompt catalog and effects."""
    x0, y0, x1, y1 = FACE_BOX
    camera_gradient = gradient_magnitude(luma(camera))[y0:y1, x0:x1].ravel()
    print("\n  held-out prompts (catalog, effects and all), default engine vs faces=0:")
    found = {"default": 0, "faces=0": 0}
    prompts = held_out()
    for prompt in prompts:
        cells = []
        for name, options in (("default", ""), ("faces=0", "faces=0")):
            engine = engine_with(options)
            session = engine.open_session(OUTPUT)
            session.configure(Controls(prompt=prompt))
            for _ in range(8):
                output = session.transform(camera)
            y = luma(output)
            hit = check.finds_face(y)
            found[name] += hit
            r = np.corrcoef(gradient_magnitude(y)[y0:y1, x0:x1].ravel(), camera_gradient)[0, 1]
            cells.append(f"{name} {'yes' if hit else ' - '} r {r:4.2f}")
            engine.close()
        print(f"    {prompt:<34} {'   '.join(cells)}", flush=True)
    print(
        f"  held-out prompts: face found in {found['default']} of {len(prompts)} with the "
        f"default engine, {found['faces=0']} with faces=0",
        flush=True,
    )


# -- flicker ---------------------------------------------------------------------------


def noisy_still(count: int, sigma: float, seed: int = 1) -> list[VideoFrame]:
    rgb = photo(OUTPUT.width, OUTPUT.height).astype(np.float32)
    rng = np.random.default_rng(seed)
    return [
        yuv_frame(np.clip(rgb + rng.normal(0, sigma, rgb.shape), 0, 255).astype(np.uint8))
        for _ in range(count)
    ]


def flicker(frames: list[np.ndarray]) -> float:
    """Mean absolute change between consecutive luma planes."""
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.pairwise(frames)]))


FLICKER_ENGINES = {"stabilise=0": "stabilise=0", "default (stabilised)": ""}


def part_flicker(args: argparse.Namespace) -> None:
    print("\n## flicker of a still scene: mean |change| of Y between consecutive outputs")
    shared = engine_with()
    engines = {name: engine_with(options, shared) for name, options in FLICKER_ENGINES.items()}
    for sigma in (2.0, 4.0):
        frames = noisy_still(24, sigma)
        print(
            f"  sensor noise sigma {sigma:g} (RGB levels); camera itself "
            f"{flicker([luma(f) for f in frames]):5.2f}"
        )
        results = {}
        for name, engine in engines.items():
            session = session_for(engine, test_look())
            outputs = [luma(session.transform(f)) for f in frames]
            results[name] = flicker(outputs[4:])  # once the running average settled
        base = results["stabilise=0"]
        for name, value in results.items():
            print(f"    {name:<22} {value:5.2f}  x{value / base:.2f}", flush=True)

    side, step, top = 96, 16, 300
    print(f"  a {side} px square moving {step} px a frame: |stabilised - not| (Y levels)")
    base_rgb = photo(OUTPUT.width, OUTPUT.height)
    outputs: dict[str, list[np.ndarray]] = {}
    for name, engine in engines.items():
        session = session_for(engine, test_look())
        outputs[name] = []
        for index in range(12):
            rgb = base_rgb.copy()
            rgb[top : top + side, 200 + index * step : 200 + index * step + side] = 250
            outputs[name].append(luma(session.transform(yuv_frame(rgb))))
    trail, lead, inside, edge_on, edge_off = [], [], [], [], []
    rows = slice(top + 8, top + side - 8)
    for index in range(2, 12):
        x = 200 + index * step
        on, off = outputs["default (stabilised)"][index], outputs["stabilise=0"][index]
        difference = np.abs(on - off)
        trail.append(difference[rows, x - step : x].mean())
        lead.append(difference[rows, x + side - step : x + side].mean())
        inside.append(difference[rows, x + 8 : x + side - 8].mean())
        edge_on.append(np.abs(on[rows, x + side + 2] - on[rows, x + side - 3]).mean())
        edge_off.append(np.abs(off[rows, x + side + 2] - off[rows, x + side - 3]).mean())
    print(
        f"    where it just left {np.mean(trail):5.2f}; its newest {step} px "
        f"{np.mean(lead):5.2f}; its inside {np.mean(inside):5.2f}; leading edge step "
        f"{np.mean(edge_on):5.1f} vs {np.mean(edge_off):5.1f} unstabilised"
    )
    for engine in engines.values():
        engine.close()
    shared.close()


# -- reference-image matching ----------------------------------------------------------


def part_match(args: argparse.Namespace) -> None:
    from skimage import data

    print("\n## reference image -> nearest built-in styles")
    engine = neural.NeuralEngine()
    start = time.perf_counter()
    bank = engine.style_bank()
    print(
        f"  style bank (26 renders + embeddings, once per process): "
        f"{time.perf_counter() - start:.2f} s"
    )
    hits = total = 0
    picture = data.coffee()
    for name in ("coffee", "chelsea"):
        picture = getattr(data, name)()
        small = VideoFrame.from_ndarray(picture).reformat(256, 256).to_ndarray(format="rgb24")
        content = (small.astype(np.float32) / 255.0).transpose(2, 0, 1)[None].copy()
        for index in range(NUM_STYLES):
            render = engine.networks.stylize(content, one_hot(index))[0].transpose(1, 2, 0)
            rgb = (np.clip(render, 0, 1) * 255 + 0.5).astype(np.uint8)
            distances = np.linalg.norm(bank - engine.networks.style_vector(rgb), axis=1)
            hits += int(np.argmin(distances) == index)
            total += 1
    ms = statistics.median(timed(lambda: engine.weights_for_image(picture), 5))
    print(f"  style found again for {hits} of {total} renders; a new reference image: {ms:.1f} ms")
    content = np.random.default_rng(0).random((384, 384, 3), np.float32)
    vector = engine.networks.style_vector(picture)
    ms = statistics.median(timed(lambda: engine.networks.arbitrary(content, vector), 3))
    print(f"  arbitrary_transform (fixed 384x384), per frame if it were used: {ms:.0f} ms")


# -- end to end ------------------------------------------------------------------------


def through_server(server: LiveServer, model: str, prompt: str) -> ConnectFn:
    """Camera -> server (neural engine, `prompt`) -> back, like latency.through_server."""

    async def connect(source: MediaStreamTrack) -> Link:
        client = create_client(api_key=server.api_key, base_url=server.base_url)
        session = await client.realtime.connect(
            source, model=model, initial_state={"prompt": {"text": prompt, "enhance": True}}
        )

        async def close() -> None:
            await session.disconnect()
            await client.aclose()

        assert session.video_track is not None
        return Link(track=session.video_track, close=close)

    return connect


async def _e2e_run(server: LiveServer, model: str, sessions: int, args: argparse.Namespace) -> None:
    spec = CATALOG[model]
    sampler = CpuSampler(server.process.pid)
    sampler.start()
    log_start = len(server.log)
    prompts = ("anime", "oil painting")
    results = await asyncio.gather(
        *(
            measure(
                functools.partial(StampedSource, spec.width, spec.height, spec.fps),
                through_server(server, model, prompts[i % 2]),
                args.seconds,
                args.warmup,
                label=f"{sessions} session(s), {model} {spec.width}x{spec.height}@{spec.fps}",
            )
            for i in range(sessions)
        )
    )
    end = time.monotonic() - 1.0  # leave out the teardown
    sampler.stop()
    server_cpu, client_cpu, machine = sampler.shares(end - args.seconds, end)
    for result in results:
        print("    " + result.line(), flush=True)
    others = machine - server_cpu - client_cpu
    print(
        f"      cpu, % of one core ({available_cores() * 100} in all): server {server_cpu:5.1f}, "
        f"client {client_cpu:5.1f}, anything else on the machine {others:5.1f}",
        flush=True,
    )
    for line in server.log[log_start:].splitlines():
        if "network size" in line:  # the sessions' sizes following the CPU (scaler.py)
            print("      " + line.split(": ", 1)[-1], flush=True)


def part_e2e(args: argparse.Namespace) -> None:
    args = argparse.Namespace(**{**vars(args), "seconds": args.seconds or 15.0})
    print("\n## end to end through livemorph serve (client and server on this machine)")
    for engine in args.engines:
        print(f"  engine {engine}", flush=True)
        # the stamp kept, for the latency reading: see the docstring; sizes are logged at info
        with livemorph_server(f"stamped:{engine}", fast=True, log_level="info") as server:
            for sessions in args.sessions:
                asyncio.run(_e2e_run(server, args.model, sessions, args))


# -- step response ---------------------------------------------------------------------

#: The source's two brightness levels (gain on the photo) and how long it holds each.
STEP_GAINS = (1.0, 0.55)
STEP_HOLD_S = 2.0


class SteppedSource(MediaStreamTrack):
    """The astronaut photo at `fps`, its brightness stepping between STEP_GAINS every `hold` s.

    Frames are pre-rendered (a few variants of each level with sensor-like noise, cycled),
    so a frame costs one copy. Paced like latency.StampedSource: a consumer that falls
    behind gets the newest frame. `steps` gets (time recv() returned the first frame of a
    level, level index) for every change of level, the first level included.
    """

    kind = "video"

    def __init__(
        self, width: int, height: int, fps: float, hold: float = STEP_HOLD_S, variants: int = 4
    ) -> None:
        super().__init__()
        self.fps = fps
        self._hold_frames = max(1, round(hold * fps))
        rgb = photo(width, height).astype(np.float32)
        rng = np.random.default_rng(1)
        self._frames = [
            [
                yuv_frame(
                    np.clip(rgb * gain + rng.standard_normal(rgb.shape, np.float32) * 2.0, 0, 255)
                    .round()
                    .astype(np.uint8)
                ).to_ndarray()
                for _ in range(variants)
            ]
            for gain in STEP_GAINS
        ]
        self._start: float | None = None
        self._slot = -1
        self._level = -1
        self.steps: list[tuple[float, int]] = []

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        slot = max(self._slot + 1, int((now - self._start) * self.fps))
        due = self._start + slot / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        self._slot = slot
        level = (slot // self._hold_frames) % len(self._frames)
        variants = self._frames[level]
        frame = VideoFrame.from_ndarray(variants[slot % len(variants)], format="yuv420p")
        frame.pts, frame.time_base = round(slot * 90000 / self.fps), VIDEO_TIME_BASE
        if level != self._level:
            self._level = level
            self.steps.append((time.monotonic(), level))
        return frame


def mean_luma(frame: VideoFrame) -> float:
    """Mean of the Y plane over the whole frame, every 8th row and column."""
    if frame.format.name not in ("yuv420p", "yuvj420p"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return float(rows[::8, : plane.width : 8].mean())


@dataclass
class StepRun:
    fps: float
    first_frame_s: float
    p50: float
    p95: float
    thirds: tuple[float, float, float]
    creep: float  # last-third p50 / first-third p50
    measured: int  # steps with a response
    unseparable: int  # steps whose two output levels could not be told apart
    missed: int  # separable steps whose output never crossed halfway before the next step
    server_cpu: float
    client_cpu: float
    others_cpu: float
    sizes: str  # the network sizes the engine's scaler went through, from the server's log

    def line(self) -> str:
        first, middle, last = self.thirds
        return (
            f"fps {self.fps:5.1f}  step p50 {self.p50:5.0f} ms  p95 {self.p95:5.0f} ms  "
            f"thirds {first:4.0f}/{middle:4.0f}/{last:4.0f} ms  creep x{self.creep:4.2f}  "
            f"first frame {self.first_frame_s:5.2f} s  steps {self.measured} "
            f"(unseparable {self.unseparable}, missed {self.missed})  cpu % server "
            f"{self.server_cpu:5.1f} client {self.client_cpu:5.1f} else {self.others_cpu:5.1f}"
            + f"  net {self.sizes or 'no change logged'}"
        )


def step_responses(
    steps: list[tuple[float, int]], arrivals: list[tuple[float, float]], hold: float
) -> list[tuple[float, float | str]]:
    """For each step after the first level, (t0, response ms | "unseparable" | "missed").

    `arrivals` are (arrival time, mean output luma). The output's steady level for a held
    period is the median luma of the frames that arrived in its second half; a step is
    timed to the first frame past halfway between the steady level of the period before it
    and that of its own period, so the levels follow the run as it goes. A step is
    unseparable unless the two levels are over 1 luma level and over 3 times the spread
    (p90 - p10) of either period's late frames apart; missed if no frame crossed before
    the next step.
    """
    times = np.array([t for t, _ in arrivals])
    lumas = np.array([y for _, y in arrivals])
    ends = [t for t, _ in steps[1:]] + [steps[-1][0] + hold]
    steady: list[tuple[float, float] | None] = []
    for (t0, _), end in zip(steps, ends, strict=True):
        late = lumas[(times >= t0 + (end - t0) / 2) & (times < end)]
        spread = float(np.percentile(late, 90) - np.percentile(late, 10)) if len(late) else 0
        steady.append((float(np.median(late)), spread) if len(late) >= 5 else None)
    outcomes: list[tuple[float, float | str]] = []
    for index in range(1, len(steps)):
        before, after = steady[index - 1], steady[index]
        t0, end = steps[index][0], ends[index]
        gap = after[0] - before[0] if before and after else 0.0
        if not before or not after or abs(gap) <= max(1.0, 3 * before[1], 3 * after[1]):
            outcomes.append((t0, "unseparable"))
            continue
        halfway = (before[0] + after[0]) / 2
        crossed = (lumas >= halfway) if gap > 0 else (lumas <= halfway)
        hits = np.flatnonzero((times > t0) & (times < end) & crossed)
        outcomes.append((t0, float(times[hits[0]] - t0) * 1000 if len(hits) else "missed"))
    return outcomes


def stock_client(server: LiveServer, model: str, prompt: str) -> ConnectFn:
    """The published decart==0.0.30 client, connected as the seeds connect it."""

    async def connect(source: MediaStreamTrack) -> Link:
        from decart import DecartClient, models
        from decart.realtime import RealtimeClient, RealtimeConnectOptions
        from decart.types import ModelState, Prompt

        client = DecartClient(
            api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
        )
        video: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()

        def on_remote_stream(track: MediaStreamTrack) -> None:
            if track.kind == "video" and not video.done():
                video.set_result(track)

        session = await RealtimeClient.connect(
            base_url=client.realtime_base_url,
            api_key=client.api_key,
            local_track=source,
            options=RealtimeConnectOptions(
                model=models.realtime(model),
                on_remote_stream=on_remote_stream,
                initial_state=ModelState(prompt=Prompt(text=prompt, enhance=True)),
            ),
        )

        async def close() -> None:
            await session.disconnect()
            await client.close()

        try:
            track = await asyncio.wait_for(video, timeout=10)
        except BaseException:
            await close()
            raise
        return Link(track=track, close=close)

    return connect


STEP_CLIENTS: dict[str, Callable[[LiveServer, str, str], ConnectFn]] = {
    "stock": stock_client,
    "sdk": through_server,
}


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def _step_run(server: LiveServer, client: str, args: argparse.Namespace) -> StepRun:
    spec = CATALOG[args.model]
    seconds, warmup = args.seconds or 60.0, args.warmup
    source = SteppedSource(spec.width, spec.height, spec.fps)
    log_start = len(server.log)
    sampler = CpuSampler(server.process.pid)
    sampler.start()
    started = time.monotonic()
    arrivals: list[tuple[float, float]] = []
    try:
        link = await STEP_CLIENTS[client](server, args.model, args.prompt)(source)
    except BaseException:
        sampler.stop()
        raise
    try:
        frame = await asyncio.wait_for(link.track.recv(), timeout=30)
        first = time.monotonic()
        arrivals.append((first, mean_luma(frame)))
        window_start = first + warmup
        deadline = window_start + seconds
        while arrivals[-1][0] < deadline:
            frame = await asyncio.wait_for(link.track.recv(), timeout=10)
            arrivals.append((time.monotonic(), mean_luma(frame)))
    finally:
        sampler.stop()
        source.stop()
        await link.close()
    server_cpu, client_cpu, machine = sampler.shares(window_start, deadline)
    # Only the steps whose whole held period lies in the measured window; thirds of that span.
    outcomes = [
        (t0, outcome)
        for t0, outcome in step_responses(source.steps, arrivals, STEP_HOLD_S)
        if window_start <= t0 <= deadline - STEP_HOLD_S
    ]
    kept = [(t0, ms) for t0, ms in outcomes if isinstance(ms, float)]
    thirds: list[list[float]] = [[], [], []]
    for t0, ms in kept:
        thirds[min(2, int(3 * (t0 - window_start) / max(seconds - STEP_HOLD_S, 1e-3)))].append(ms)
    medians = [_percentile(third, 50) for third in thirds]
    all_ms = [ms for _, ms in kept]
    sizes = re.findall(r"network size (\d+x\d+) -> (\d+x\d+): ([^(]+?) \(", server.log[log_start:])
    return StepRun(
        fps=sum(window_start <= t < deadline for t, _ in arrivals) / seconds,
        first_frame_s=first - started,
        p50=_percentile(all_ms, 50),
        p95=_percentile(all_ms, 95),
        thirds=(medians[0], medians[1], medians[2]),
        creep=medians[2] / medians[0],
        measured=len(kept),
        unseparable=sum(outcome == "unseparable" for _, outcome in outcomes),
        missed=sum(outcome == "missed" for _, outcome in outcomes),
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        others_cpu=machine - server_cpu - client_cpu,
        sizes=" -> ".join([sizes[0][0], *(f"{b} ({why})" for _, b, why in sizes)]) if sizes else "",
    )


def part_step(args: argparse.Namespace) -> None:
    spec = CATALOG[args.model]
    print(
        f"\n## step response through livemorph serve: {args.model} {spec.width}x{spec.height}"
        f"@{spec.fps}, prompt {args.prompt!r}, brightness x{STEP_GAINS[0]:g}/x{STEP_GAINS[1]:g}"
        f" every {STEP_HOLD_S:g} s, {args.seconds or 60.0:g} s after {args.warmup:g} s warm-up",
        flush=True,
    )
    for engine in args.engines:
        for client in args.client:
            print(f"  engine {engine}, {client} client (a fresh server)", flush=True)
            runs = []
            with livemorph_server(engine, fast=True, log_level="info") as server:
                for index in range(args.repeat):
                    runs.append(asyncio.run(_step_run(server, client, args)))
                    print(f"    run {index + 1}: {runs[-1].line()}", flush=True)
            median = {
                field: statistics.median(getattr(run, field) for run in runs)
                for field in ("fps", "p50", "p95", "creep", "first_frame_s")
            }
            thirds = [statistics.median(run.thirds[i] for run in runs) for i in range(3)]
            print(
                f"    median of {len(runs)}: fps {median['fps']:5.1f}  step p50 "
                f"{median['p50']:5.0f} ms  p95 {median['p95']:5.0f} ms  thirds "
                f"{thirds[0]:4.0f}/{thirds[1]:4.0f}/{thirds[2]:4.0f} ms  creep "
                f"x{median['creep']:4.2f}  first frame {median['first_frame_s']:5.2f} s  "
                f"cpu % server {statistics.median(r.server_cpu for r in runs):5.1f} client "
                f"{statistics.median(r.client_cpu for r in runs):5.1f} else "
                f"{statistics.median(r.others_cpu for r in runs):5.1f}",
                flush=True,
            )


# -- trace -----------------------------------------------------------------------------


def moving_camera(count: int, width: int, height: int, seed: int = 5) -> list[np.ndarray]:
    """`count` yuv420p arrays of `face_photo` panning 1 px a frame (and half that down),
    back and forth, with fresh sensor-like noise (sigma 2) in each: a person in front of a
    hand-held camera, for as long as it is cycled without a jump."""
    scene = face_photo(width + count // 2, height + count // 4).astype(np.float32)
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(count):
        step = index if index < count // 2 else count - index
        crop = scene[step // 2 : step // 2 + height, step : step + width]
        noise = rng.standard_normal(crop.shape, np.float32) * 2.0
        frames.append(
            yuv_frame(np.clip(crop + noise, 0, 255).round().astype(np.uint8)).to_ndarray()
        )
    return frames


class CameraSource(MediaStreamTrack):
    """Pre-rendered yuv420p arrays, cycled at `fps` (paced like SteppedSource)."""

    kind = "video"

    def __init__(self, frames: list[np.ndarray], fps: float) -> None:
        super().__init__()
        self.fps = fps
        self._frames = frames
        self._start: float | None = None
        self._slot = -1
        self.sent = 0

    async def recv(self) -> VideoFrame:
        now = time.monotonic()
        if self._start is None:
            self._start = now
        slot = max(self._slot + 1, int((now - self._start) * self.fps))
        due = self._start + slot / self.fps
        if due > now:
            await asyncio.sleep(due - now)
        self._slot = slot
        frame = VideoFrame.from_ndarray(self._frames[slot % len(self._frames)], format="yuv420p")
        frame.pts, frame.time_base = round(slot * 90000 / self.fps), VIDEO_TIME_BASE
        self.sent += 1
        return frame


def idlest_core() -> int:
    """The core of this process's set that was idlest over the last half second."""

    def idle() -> dict[int, int]:
        lines = Path("/proc/stat").read_text().splitlines()
        return {
            int(fields[0][3:]): int(fields[4]) + int(fields[5])
            for fields in (line.split() for line in lines)
            if fields[0].startswith("cpu") and fields[0] != "cpu"
        }

    before = idle()
    time.sleep(0.5)
    after = idle()
    allowed = os.sched_getaffinity(0)
    return max(allowed, key=lambda core: after.get(core, 0) - before.get(core, 0))


def pin_process(cores: set[int]) -> None:
    """Every thread of this process (and those it starts later) onto `cores`."""
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cores)


class Srtp:
    """A pair of SRTP sessions with a fresh key, as aiortc sets them up after DTLS
    (its first profile, a replay window of 1024), and RTP packets of one stream."""

    def __init__(self, ssrc: int) -> None:
        import pylibsrtp
        from aiortc.rtcdtlstransport import SRTP_PROFILES

        profile = SRTP_PROFILES[0]
        key = os.urandom(profile.key_length + profile.salt_length)
        policies = []
        for kind in (pylibsrtp.Policy.SSRC_ANY_OUTBOUND, pylibsrtp.Policy.SSRC_ANY_INBOUND):
            policy = pylibsrtp.Policy(key=key, ssrc_type=kind, srtp_profile=profile.libsrtp_profile)
            policy.allow_repeat_tx = True
            policy.window_size = 1024
            policies.append(policy)
        self.profile = profile.openssl_profile.decode()
        self.tx, self.rx = (pylibsrtp.Session(policy) for policy in policies)
        self.ssrc = ssrc
        self.sequence = 0

    def send(self, payloads: list[bytes], timestamp: int) -> list[bytes]:
        """What an RTCRtpSender does per frame: RTP packets, serialised, SRTP-protected
        (without the header extensions, the history for retransmission and the socket)."""
        from aiortc.rtp import RtpPacket

        protected = []
        for index, payload in enumerate(payloads):
            packet = RtpPacket(
                payload_type=96,
                marker=int(index == len(payloads) - 1),
                sequence_number=self.sequence,
                timestamp=timestamp,
                ssrc=self.ssrc,
                payload=payload,
            )
            self.sequence = (self.sequence + 1) & 0xFFFF
            protected.append(self.tx.protect(packet.serialize()))
        return protected

    def receive(self, packets: list[bytes]) -> bytes:
        """What the receiving end does per frame, up to the decoder: SRTP unprotect, RTP
        parse, VP8 depayload, the frame's data joined (without the jitter buffer)."""
        from aiortc.codecs.vpx import vp8_depayload
        from aiortc.rtp import RtpPacket

        return b"".join(
            vp8_depayload(RtpPacket.parse(self.rx.unprotect(packet)).payload) for packet in packets
        )


def part_trace(args: argparse.Namespace) -> None:
    from aiortc.codecs import vpx
    from aiortc.jitterbuffer import JitterFrame

    cores = available_cores()
    spec = OUTPUT
    interval = 1000.0 / spec.fps
    warm = 24  # camera frames decoded before the trace starts (after the keyframe)
    settle = 25  # frames traced but not counted: buffers, the encoders' rate control settle
    frames = moving_camera(48, spec.width, spec.height)
    count = max(2 * len(frames), warm + settle + args.rounds)
    # the camera as the SDK sends it: our encoder at aiortc's top bitrate (a local link
    # reaches it); the server's output encoder is the same class at the same rate
    camera_encoder = RealtimeVp8Encoder()
    camera_encoder.target_bitrate = vpx.MAX_BITRATE
    encoded = []
    for index in range(count):
        frame = VideoFrame.from_ndarray(frames[index % len(frames)], format="yuv420p")
        frame.pts, frame.time_base = round(index * 90000 / spec.fps), VIDEO_TIME_BASE
        encoded.append(camera_encoder.encode(frame, force_keyframe=index == 0))
    sizes = [sum(len(p) for p in payloads) for payloads, _ in encoded[warm + settle :]]
    packets = [len(payloads) for payloads, _ in encoded[warm + settle :]]

    core = idlest_core()
    print(
        f"\n## trace: the whole server's work per frame for one session, {spec.width}x"
        f"{spec.height} at {spec.fps} fps, on one core (this process pinned to cpu {core}; "
        "helper work inline): median ms per frame, share of the "
        f"{interval:.0f} ms interval",
        flush=True,
    )
    engine = engine_with(inline=True)
    look = engine.look_for(args.prompt, True)
    session = engine.open_session(spec)
    session.look = session._prompt_look = look
    camera_link, output_link = Srtp(ssrc=1111), Srtp(ssrc=2222)
    print(
        f"  look {look.name!r} for the prompt {args.prompt!r} (effects "
        f"{'on' if look.effects.active else 'off'}), network {session.size[0]}x"
        f"{session.size[1]}; camera: {len(frames)} frames of the astronaut panning with noise, "
        f"VP8 at {vpx.MAX_BITRATE / 1e6:g} Mbit/s, median {statistics.median(sizes) / 1000:.1f}"
        f" kB and {statistics.median(packets):g} packets a frame; SRTP {camera_link.profile}",
        flush=True,
    )
    decoder = vpx.Vp8Decoder()
    for payloads, timestamp in encoded[:warm]:
        decoder.decode(JitterFrame(b"".join(vpx.vp8_depayload(p) for p in payloads), timestamp))
    encoder = RealtimeVp8Encoder()
    encoder.target_bitrate = vpx.MAX_BITRATE
    steps = StepTimes()
    receive = steps.wrap("RTP in: SRTP unprotect, RTP parse, VP8 depayload", camera_link.receive)
    decode = steps.wrap("VP8 decode (aiortc Vp8Decoder: libvpx)", decoder.decode)
    encode = steps.wrap("VP8 encode (RealtimeVp8Encoder: libvpx)", encoder.encode)
    send = steps.wrap("RTP out: RTP packets, serialise, SRTP protect", output_link.send)
    output_sizes = []
    pin_process({core})
    try:
        with (
            instrumented(session, steps) as transform,
            mock.patch.object(
                encoder, "_packetize", steps.wrap("VP8 packetise", encoder._packetize)
            ),
        ):
            for index in range(settle + args.rounds):
                payloads, timestamp = encoded[warm + index]
                wire = camera_link.send(payloads, timestamp)  # the client's side: not timed
                (frame,) = decode(JitterFrame(receive(wire), timestamp))
                output = transform(frame)
                output.pts, output.time_base = round(index * 90000 / spec.fps), VIDEO_TIME_BASE
                out_payloads, out_timestamp = encode(output)
                send(out_payloads, out_timestamp)
                output_sizes.append(sum(len(p) for p in out_payloads))
                if index >= settle:
                    steps.frame()
                else:
                    steps.discard()
    finally:
        pin_process(_AFFINITY)
        engine.close()
    total = print_steps(steps, interval, indent="    ")
    per_second = total * spec.fps / 1000
    print(
        f"    {'median of the per-frame sums':<54} {statistics.median(steps.frame_totals()):7.2f}"
        f" ms; output VP8 median {statistics.median(output_sizes[settle:]) / 1000:.1f} kB a frame"
    )
    print(
        f"  CPU per second of video at {spec.fps} fps: {per_second:.2f} core-seconds, "
        f"{100 * per_second / cores:.0f}% of the machine's {cores} cores",
        flush=True,
    )

    seconds = args.seconds or 20.0
    engine_spec = f"neural:{PINNED}"
    print(
        f"  the real server (livemorph serve --engine {engine_spec}), one session from our SDK "
        f"with the same camera frames and prompt, {seconds:g} s after {args.warmup:g} s warm-up:",
        flush=True,
    )
    with livemorph_server(engine_spec, fast=True, log_level="info") as server:
        run = asyncio.run(_server_run(server, frames, args.prompt, seconds, args.warmup))
    ms_per_frame = 1000 * run["server_cpu"] / run["delivered"]
    # the trace at the run's rates: every camera frame is received and decoded, the rest
    # runs once per delivered frame
    rows = steps.per_frame()
    inbound = sum(ms for name, (ms, _) in rows.items() if name.startswith(("RTP in", "VP8 dec")))
    predicted = (inbound * run["sent"] + (total - inbound) * run["delivered"]) / run["span"]
    used = run["server_cpu"] / run["span"]
    print(
        f"    delivered {run['delivered'] / run['span']:5.1f} fps (camera sent "
        f"{run['sent'] / run['span']:5.1f}); server process {ms_per_frame:6.1f} ms CPU per "
        f"delivered frame, {run['server_cpu'] / run['span']:.2f} cores ("
        f"{100 * run['server_cpu'] / run['span'] / cores:.0f}% of {cores}); client "
        f"{run['client_cpu'] / run['span']:.2f}, anything else "
        f"{run['others_cpu'] / run['span']:.2f} cores",
        flush=True,
    )
    print(
        f"    the trace's sum {total:6.1f} ms per frame = {100 * total / ms_per_frame:.0f}% of "
        f"the server's CPU per delivered frame; at the run's rates it predicts "
        f"{predicted / 1000:.2f} cores, {100 * predicted / 1000 / used:.0f}% of what the server "
        "used",
        flush=True,
    )


async def _server_run(
    server: LiveServer, frames: list[np.ndarray], prompt: str, seconds: float, warmup: float
) -> dict[str, float]:
    """One SDK session for `warmup` + `seconds` after its first frame: CPU seconds of the
    server, this process and everything else, frames delivered and sent, in the window."""
    source = CameraSource(frames, OUTPUT.fps)
    link = await through_server(server, OUTPUT.name, prompt)(source)

    def sample() -> tuple[float, float, float, float, int]:
        return (
            time.monotonic(),
            process_cpu_seconds(server.process.pid),
            process_cpu_seconds(os.getpid()),
            machine_busy_seconds(),
            source.sent,
        )

    try:
        await asyncio.wait_for(link.track.recv(), timeout=60)
        window_start = time.monotonic() + warmup
        while time.monotonic() < window_start:
            await asyncio.wait_for(link.track.recv(), timeout=10)
        start, delivered = sample(), 0
        while time.monotonic() < start[0] + seconds:
            await asyncio.wait_for(link.track.recv(), timeout=10)
            delivered += 1
        end = sample()
    finally:
        source.stop()
        await link.close()
    server_cpu, client_cpu, machine = (end[i] - start[i] for i in (1, 2, 3))
    return {
        "span": end[0] - start[0],
        "delivered": delivered,
        "sent": end[4] - start[4],
        "server_cpu": server_cpu,
        "client_cpu": client_cpu,
        "others_cpu": machine - server_cpu - client_cpu,
    }


PARTS = {
    "network": part_network,
    "transform": part_transform,
    "faces": part_faces,
    "flicker": part_flicker,
    "match": part_match,
    "e2e": part_e2e,
    "step": part_step,
    "trace": part_trace,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=15, help="timing repeats per variant")
    parser.add_argument("--model", default="mirage", choices=list(CATALOG))
    parser.add_argument("--engines", nargs="+", default=["neural"], help="e2e, step: engine specs")
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2], help="e2e: counts")
    parser.add_argument(
        "--seconds",
        type=float,
        help="e2e, step, trace: measured seconds (default 15, step 60, trace's server run 20)",
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="e2e, step, trace: seconds ignored first"
    )
    parser.add_argument(
        "--client",
        nargs="+",
        choices=list(STEP_CLIENTS),
        default=list(STEP_CLIENTS),
        help="step: the published decart==0.0.30 client, our SDK, or both in turn",
    )
    parser.add_argument("--prompt", default="anime", help="step, trace: the session's prompt")
    parser.add_argument("--repeat", type=int, default=3, help="step: runs per client")
    args = parser.parse_args()
    print(f"cores: {available_cores()}, onnxruntime {ort.__version__}", flush=True)
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
