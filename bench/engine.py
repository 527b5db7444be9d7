"""What the neural engine costs and what it buys, in figures.

    python bench/engine.py                                  # every part
    python bench/engine.py --parts network transform        # some of them
    python bench/engine.py --parts e2e --engines neural neural:nice=0 neural:threads=2
    python bench/engine.py --parts step --client stock --seconds 45 --repeat 5

Parts:
- `network`: multistyle26 alone at each internal size, for each ONNX Runtime setting
  (variants interleaved round by round, so a neighbour's load hits them all alike: on a
  shared machine trust the ratios more than the milliseconds).
- `transform`: the whole `transform` at 1280x704 output for each internal size (network
  vs the rest), then what each step costs and what each speed-up buys, interleaved.
- `detail`: how much of the camera's luma detail sharpens the output, and its cost.
- `flicker`: a still photo with fresh sensor-like noise in every frame: mean absolute
  change between consecutive outputs with and without stabilisation; and a moving square:
  the stabiliser must not leave a trail or soften its edge.
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

The e2e part's latency needs the stamp that bench/latency.py's source draws in the top-left
368x48 px; a restyling engine paints over it, so for e2e the server runs with
LIVEMORPH_BENCH_KEEP_STAMP=1, which makes the neural engine copy that corner from the camera
unchanged. The rest of the frame still goes through the network: the cost measured is the
full cost.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import os
import re
import statistics
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
from av import VideoFrame
from av.video.reformatter import VideoReformatter

from cpu import machine_busy_seconds, process_cpu_seconds
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
from livemorph.engines.neural import engine as neural
from livemorph.engines.neural.look import NUM_STYLES, Grade, Look
from livemorph.engines.neural.networks import available_cores, model_bytes, session_options
from livemorph.engines.neural.styles import apply_grade
from livemorph.engines.neural.temporal import Stabiliser
from livemorph.models import CATALOG

SIZES = [(224, 124), (256, 140), (320, 176), (384, 208), (384, 224), (448, 256)]
OUTPUT = CATALOG["mirage"]


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
    print(f"\n## transform at {OUTPUT.width}x{OUTPUT.height} output: median ms", flush=True)
    frame = yuv_frame(photo(OUTPUT.width, OUTPUT.height))
    for width, height in SIZES:
        engine = neural.NeuralEngine(f"size={width}x{height}")
        network_ms: list[float] = []
        stylize = engine.networks.stylize

        def timed_stylize(
            *a: Any, _stylize: Any = stylize, _ms: list[float] = network_ms, **kw: Any
        ) -> Any:
            start = time.perf_counter()
            result = _stylize(*a, **kw)
            _ms.append((time.perf_counter() - start) * 1000)
            return result

        engine.networks.stylize = timed_stylize  # type: ignore[method-assign]
        session = session_for(engine, test_look())
        session.transform(frame)
        network_ms.clear()
        total = statistics.median(timed(functools.partial(session.transform, frame), args.rounds))
        network = statistics.median(network_ms)
        engine.close()
        print(
            f"  network {width}x{height}: transform {total:6.1f} ms ({1000 / total:5.1f} fps), "
            f"network {network:6.1f} ms, the rest {total - network:5.1f} ms",
            flush=True,
        )

    print("  each step at the default size (all variants share one runtime; interleaved):")
    main = neural.NeuralEngine()

    def variant(options: str, look: Look, serial: bool = False) -> Callable[[], object]:
        engine = neural.NeuralEngine(options)
        engine._networks = main.networks
        if serial:
            engine._helpers = Inline()  # type: ignore[assignment]
        return functools.partial(session_for(engine, look).transform, frame)

    report(
        interleaved(
            {
                "full transform (chosen)": variant("", test_look()),
                "... detail layer serial, not beside the net": variant("", test_look(), True),
                "... without the detail layer": variant("detail=0", test_look(strength=1.0)),
                "... without the stabiliser": variant("stabilise=0", test_look()),
                "... without a colour grade": variant("", test_look(grade=Grade())),
            },
            args.rounds,
        ),
        base="full transform (chosen)",
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


# -- detail ----------------------------------------------------------------------------


def part_detail(args: argparse.Namespace) -> None:
    print("\n## camera detail over the stylised picture (default network size)", flush=True)
    frame = yuv_frame(photo(OUTPUT.width, OUTPUT.height))
    camera_y = luma(frame)

    def sharpness(y: np.ndarray) -> float:
        return float(np.abs(np.diff(y, axis=1)).mean() + np.abs(np.diff(y, axis=0)).mean())

    print(f"  camera sharpness (mean |gradient| of Y): {sharpness(camera_y):5.2f}")
    shared = neural.NeuralEngine()
    variants = {}
    outputs = {}
    for amount in (0.0, 0.15, 0.3, 0.5, 1.0):
        engine = neural.NeuralEngine(f"stabilise=0,detail={amount}")
        engine._networks = shared.networks
        session = session_for(engine, test_look(strength=1.0))
        outputs[amount] = luma(session.transform(frame))
        variants[f"detail {amount:4.2f}"] = functools.partial(session.transform, frame)
    medians = interleaved(variants, args.rounds)
    for amount, y in outputs.items():
        name = f"detail {amount:4.2f}"
        print(
            f"  {name}: sharpness {sharpness(y):5.2f}, mean |Y - camera Y| "
            f"{np.abs(y - camera_y).mean():5.1f}, transform {medians[name]:5.1f} ms",
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


STABILISERS: dict[str, Callable[[], Stabiliser]] = {
    "no stabilisation": lambda: Stabiliser(hold=0.0, denoise=0.0),
    "input denoise only": lambda: Stabiliser(hold=0.0),
    "output blend only": lambda: Stabiliser(denoise=0.0),
    "both (chosen)": Stabiliser,
}


def part_flicker(args: argparse.Namespace) -> None:
    print("\n## flicker of a still scene: mean |change| of Y between consecutive outputs")
    engine = neural.NeuralEngine()
    for sigma in (2.0, 4.0):
        frames = noisy_still(24, sigma)
        print(
            f"  sensor noise sigma {sigma:g} (RGB levels); camera itself "
            f"{flicker([luma(f) for f in frames]):5.2f}"
        )
        for detail in (0.0, engine.detail):
            engine.detail = detail
            results = {}
            for name, make in STABILISERS.items():
                session = session_for(engine, test_look())
                session.stabiliser = make()
                outputs = [luma(session.transform(f)) for f in frames]
                results[name] = flicker(outputs[4:])  # once the running average settled
            base = results["no stabilisation"]
            for name, value in results.items():
                print(
                    f"    detail {detail:.2f}, {name:<20} {value:5.2f}  x{value / base:.2f}",
                    flush=True,
                )
        engine.detail = neural.DEFAULT_DETAIL

    side, step, top = 96, 16, 300
    print(f"  a {side} px square moving {step} px a frame: |stabilised - not| (Y levels)")
    base_rgb = photo(OUTPUT.width, OUTPUT.height)
    outputs: dict[str, list[np.ndarray]] = {}
    for name in ("no stabilisation", "both (chosen)"):
        session = session_for(engine, test_look())
        session.stabiliser = STABILISERS[name]()
        outputs[name] = []
        for index in range(12):
            rgb = base_rgb.copy()
            rgb[top : top + side, 200 + index * step : 200 + index * step + side] = 250
            outputs[name].append(luma(session.transform(yuv_frame(rgb))))
    trail, lead, inside, edge_on, edge_off = [], [], [], [], []
    rows = slice(top + 8, top + side - 8)
    for index in range(2, 12):
        x = 200 + index * step
        on, off = outputs["both (chosen)"][index], outputs["no stabilisation"][index]
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
    samples: list[tuple[float, float, float, float]] = []

    async def sample() -> None:
        while True:
            samples.append(
                (
                    time.monotonic(),
                    process_cpu_seconds(server.process.pid),
                    process_cpu_seconds(os.getpid()),
                    machine_busy_seconds(),
                )
            )
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
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
    sampler.cancel()
    window = [s for s in samples if end - args.seconds <= s[0] <= end]
    span = window[-1][0] - window[0][0]
    server_cpu, client_cpu, machine = (
        (window[-1][i] - window[0][i]) / span * 100 for i in (1, 2, 3)
    )
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
    os.environ[neural.KEEP_STAMP_ENV] = "1"  # inherited by the server: see the docstring
    for engine in args.engines:
        print(f"  engine {engine}", flush=True)
        with livemorph_server(engine, fast=True, log_level="info") as server:  # sizes logged
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
    samples: list[tuple[float, float, float, float]] = []

    async def sample() -> None:
        while True:
            samples.append(
                (
                    time.monotonic(),
                    process_cpu_seconds(server.process.pid),
                    process_cpu_seconds(os.getpid()),
                    machine_busy_seconds(),
                )
            )
            await asyncio.sleep(0.25)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    arrivals: list[tuple[float, float]] = []
    try:
        link = await STEP_CLIENTS[client](server, args.model, args.prompt)(source)
    except BaseException:
        sampler.cancel()
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
        sampler.cancel()
        source.stop()
        await link.close()
    window = [s for s in samples if window_start <= s[0] <= deadline]
    span = window[-1][0] - window[0][0]
    server_cpu, client_cpu, machine = (
        (window[-1][i] - window[0][i]) / span * 100 for i in (1, 2, 3)
    )
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
    sizes = re.findall(r"network size (\S+) -> (\S+)", server.log[log_start:])
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
        sizes=" -> ".join([sizes[0][0], *(b for _, b in sizes)]) if sizes else "",
    )


def part_step(args: argparse.Namespace) -> None:
    spec = CATALOG[args.model]
    print(
        f"\n## step response through livemorph serve: {args.model} {spec.width}x{spec.height}"
        f"@{spec.fps}, prompt {args.prompt!r}, brightness x{STEP_GAINS[0]:g}/x{STEP_GAINS[1]:g}"
        f" every {STEP_HOLD_S:g} s, {args.seconds or 60.0:g} s after {args.warmup:g} s warm-up",
        flush=True,
    )
    os.environ.pop(neural.KEEP_STAMP_ENV, None)  # the whole frame goes through the engine
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


PARTS = {
    "network": part_network,
    "transform": part_transform,
    "detail": part_detail,
    "flicker": part_flicker,
    "match": part_match,
    "e2e": part_e2e,
    "step": part_step,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--rounds", type=int, default=15, help="timing repeats per variant")
    parser.add_argument("--model", default="mirage", choices=list(CATALOG))
    parser.add_argument("--engines", nargs="+", default=["neural"], help="e2e, step: engine specs")
    parser.add_argument("--sessions", nargs="+", type=int, default=[1, 2], help="e2e: counts")
    parser.add_argument(
        "--seconds", type=float, help="e2e, step: measured seconds (default 15, step 60)"
    )
    parser.add_argument(
        "--warmup", type=float, default=3.0, help="e2e, step: seconds ignored first"
    )
    parser.add_argument(
        "--client",
        nargs="+",
        choices=list(STEP_CLIENTS),
        default=list(STEP_CLIENTS),
        help="step: the published decart==0.0.30 client, our SDK, or both in turn",
    )
    parser.add_argument("--prompt", default="anime", help="step: the session's prompt")
    parser.add_argument("--repeat", type=int, default=3, help="step: runs per client")
    args = parser.parse_args()
    print(f"cores: {available_cores()}, onnxruntime {ort.__version__}", flush=True)
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
