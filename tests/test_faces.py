"""Faces stay faces: found, followed, and readable in the output of styles that lose them.

The judge is scikit-image's LBP face cascade: a different detector (features, training,
code) from the Haar cascade the engine uses, not tuned here. Styles 3, 7 and 13 lose the
face without protection (ribbons across it, heavy shading, strokes across the eyes).
Style 17 (a woven grid) is the one of the 26 where the judge still misses it: a dark
band of the weave crosses half the face (bench/engine.py --parts faces).
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import cv2
import numpy as np
import pytest
from av import VideoFrame
from skimage.data import astronaut, lbp_frontal_face_cascade_filename
from skimage.feature import Cascade

from livemorph.engines.neural.engine import NeuralEngine
from livemorph.engines.neural.faces import FaceTracker, load_cascade
from livemorph.engines.neural.look import NUM_STYLES, Look
from livemorph.models import CATALOG

SPEC = CATALOG["mirage"]  # 1280x704
#: Where the astronaut's face is at 1280x704 (x0, y0, x1, y1), checked on the photo below.
FACE = (440, 180, 720, 480)
HARD_STYLES = (3, 7, 13)


def camera_rgb(shift: int = 0) -> np.ndarray:
    """The astronaut at 1280x704, cropped from the top so the whole face is in view."""
    rgb = cv2.resize(astronaut()[:281], (SPEC.width, SPEC.height), interpolation=cv2.INTER_AREA)
    return np.roll(rgb, shift, axis=1) if shift else rgb


def yuv(rgb: np.ndarray) -> VideoFrame:
    return VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(
        format="yuv420p"
    )


def luma(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def judge_finds_face(rgb: np.ndarray) -> bool:
    """scikit-image's LBP detector finds a face centred inside FACE."""
    judge = Cascade(lbp_frontal_face_cascade_filename())
    small = cv2.resize(luma(rgb), (640, 352), interpolation=cv2.INTER_AREA)
    found = judge.detect_multi_scale(
        img=small, scale_factor=1.2, step_ratio=1, min_size=(60, 60), max_size=(300, 300)
    )
    x0, y0, x1, y1 = (v / 2 for v in FACE)
    return any(
        x0 < d["c"] + d["width"] / 2 < x1 and y0 < d["r"] + d["height"] / 2 < y1 for d in found
    )


def face_edge_correlation(output: np.ndarray, camera: np.ndarray) -> float:
    """How well the output's edges in the face follow the camera's: correlation of the
    Sobel gradient magnitudes of the two lumas inside FACE."""

    def gradient(rgb: np.ndarray) -> np.ndarray:
        y = luma(rgb).astype(np.float32)
        x0, y0, x1, y1 = FACE
        magnitude = np.hypot(cv2.Sobel(y, cv2.CV_32F, 1, 0), cv2.Sobel(y, cv2.CV_32F, 0, 1))
        return magnitude[y0:y1, x0:x1].ravel()

    return float(np.corrcoef(gradient(output), gradient(camera))[0, 1])


def render(engine: NeuralEngine, style: int, frames: int = 8) -> np.ndarray:
    session = engine.open_session(SPEC)
    weights = np.zeros(NUM_STYLES, np.float32)
    weights[style] = 1.0
    session.look = Look(weights, strength=0.9, name=f"style {style}")
    camera = yuv(camera_rgb())
    for _ in range(frames):
        output = session.transform(camera)
    session.close()
    return output.to_ndarray(format="rgb24")


class Inline:
    """Runs submitted work at once: detection answers are ready on the next frame."""

    def __call__(self, fn: Any, *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        future.set_result(fn(*args))
        return future


def test_the_judge_sees_the_face_in_the_camera_picture() -> None:
    assert judge_finds_face(camera_rgb())


def test_the_tracker_finds_the_face_and_follows_it_between_detections() -> None:
    tracker = FaceTracker(Inline(), load_cascade(), every=100)
    tracker.update(luma(camera_rgb()))  # detection submitted
    tracker.update(luma(camera_rgb()))  # its answer taken in
    ((x, y, w, h),) = tracker.boxes(SPEC.width, SPEC.height)
    x0, y0, x1, y1 = FACE
    assert x0 <= x + w / 2 <= x1 and y0 <= y + h / 2 <= y1
    mask = tracker.mask(224, 124)
    assert mask is not None and mask.shape == (124, 224)
    centre = mask[round((y + h / 2) * 124 / 704), round((x + w / 2) * 224 / 1280)]
    assert centre == pytest.approx(1.0) and mask[5, 5] == 0.0

    # the head moves 60 px right; no detection runs (every=100), the tracker follows it
    for shift in (20, 40, 60):
        tracker.update(luma(camera_rgb(shift)))
    ((moved_x, moved_y, _, _),) = tracker.boxes(SPEC.width, SPEC.height)
    assert abs(moved_x - (x + 60)) <= 8 and abs(moved_y - y) <= 8

    # a picture with no face: the track is lost, the mask goes away
    tracker.update(np.full((SPEC.height, SPEC.width), 90, np.uint8))
    assert tracker.boxes(SPEC.width, SPEC.height) == [] and tracker.mask(224, 124) is None


@pytest.fixture(scope="module")
def outputs() -> dict[str, dict[int, np.ndarray]]:
    variants = {"protected": "size=224x124", "plain": "size=224x124,faces=0,structure=0"}
    rendered = {}
    for name, options in variants.items():
        engine = NeuralEngine(options)
        rendered[name] = {style: render(engine, style) for style in HARD_STYLES}
        engine.close()
    return rendered


@pytest.mark.parametrize("style", HARD_STYLES)
def test_faces_stay_readable_in_styles_that_lose_them(
    outputs: dict[str, dict[int, np.ndarray]], style: int
) -> None:
    camera = camera_rgb()
    protected, plain = outputs["protected"][style], outputs["plain"][style]
    assert judge_finds_face(protected), "the face is found in the protected output"
    assert face_edge_correlation(protected, camera) > 0.7
    assert face_edge_correlation(protected, camera) > face_edge_correlation(plain, camera) + 0.1
    # ... and the style still shows: far from the camera picture
    assert np.abs(protected.astype(np.int16) - camera).mean() > 30


def test_protected_styles_stay_distinct(outputs: dict[str, dict[int, np.ndarray]]) -> None:
    renders = [outputs["protected"][style].astype(np.int16) for style in HARD_STYLES]
    for i, a in enumerate(renders):
        for b in renders[i + 1 :]:
            assert np.abs(a - b).mean() > 20
