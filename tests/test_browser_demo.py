"""The demo app at / in a real Chromium, against a real server with its default engine.

The camera is Chromium's fake capture device playing scikit-image's astronaut photo at the
model's size. One page does what a person does: it connects, the output plays at the
model's size and looks unlike the camera, a new prompt changes it, usage grows, another
model restarts the camera at that model's size and rate, the share link shows the same
output in a second page, and Stop ends the server's session. The page is opened once; each
test finds it as a person first does (mirage, the prompt "anime", generating), whatever the
test before it left, so the tests pass in any order.
"""

from __future__ import annotations

import io
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from skimage import data

from livemorph.models import CATALOG
from livemorph.testing import LiveServer

from .browser import camera_file, chromium, read_video, video_frame
from .media import mean_abs_diff

pytestmark = pytest.mark.browser

MODEL = CATALOG["mirage"]
#: Set to a path (e.g. docs/demo.png) to keep the screenshot the tests take.
SCREENSHOT_ENV = "LIVEMORPH_DEMO_SCREENSHOT"


def wait_for(condition: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"still {value!r} after {timeout:g}s")
        time.sleep(interval)


def playing(page: Any, selector: str) -> tuple[np.ndarray, tuple[int, int], float] | None:
    """The video's sample once it has advanced past its first frames, else None."""
    found = read_video(page, selector)
    return found if found is not None and found[2] > 0.5 else None


def steady_output(page: Any, settle: float = 1.5) -> np.ndarray:
    """The output once the newest look has reached the screen (frames in flight have gone)."""
    time.sleep(settle)
    return video_frame(page, "#output")


def settled_look(page: Any) -> tuple[np.ndarray, float]:
    """The output and its frame-to-frame noise once two samples agree best: the least change
    of three half-second steps, so a look still settling (the engine's scaler choosing a
    size on a busy machine) does not pass for noise."""
    samples = [steady_output(page, settle=0.5) for _ in range(4)]
    changes = [mean_abs_diff(a, b) for a, b in itertools.pairwise(samples)]
    quietest = min(range(len(changes)), key=changes.__getitem__)
    return samples[quietest + 1], changes[quietest]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    camera = camera_file(tmp_path_factory.mktemp("camera"), MODEL.width, MODEL.height, MODEL.fps)
    with chromium(camera) as launched:
        yield launched


@pytest.fixture(scope="module")
def opened(browser: Any, server: LiveServer) -> Iterator[Any]:
    """The demo page, opened once for the module."""
    assert server.wait_sessions(0) == 0
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{server.base_url}/")
    yield page
    assert not errors, errors
    context.close()


@pytest.fixture
def demo(opened: Any, server: LiveServer) -> Any:
    """The demo page as a person first finds it: mirage, the prompt "anime", generating."""
    page = opened
    if page.input_value("#model") != MODEL.name:
        page.select_option("#model", MODEL.name)  # restarts the session with that model
    elif page.text_content("#start") == "Start":
        page.click("#start")
    page.wait_for_function(
        """(name) => {
          const session = livemorphDemo.session;
          return session && session.model === name
            && document.querySelector('#state').textContent === 'generating';
        }""",
        arg=MODEL.name,
        timeout=60_000,
    )
    if page.input_value("#prompt") != "anime" or "anime" not in (
        page.text_content("#enhanced") or ""
    ):
        page.fill("#prompt", "anime")
        page.click("#prompt-form button[type=submit]")
        page.wait_for_function(
            "() => document.querySelector('#enhanced').textContent.includes('anime')"
        )
    assert server.wait_sessions(1) == 1
    return page


def test_the_page_connects_and_plays_at_the_models_size(demo: Any, server: LiveServer) -> None:
    assert server.active_sessions() == 1
    assert demo.input_value("#model") == MODEL.name
    _, size, _ = wait_for(lambda: playing(demo, "#output"))
    assert size == (MODEL.width, MODEL.height)
    assert demo.text_content("#output-size") == f"{MODEL.width}×{MODEL.height}"
    _, camera_size, _ = wait_for(lambda: playing(demo, "#camera"))
    assert camera_size == (MODEL.width, MODEL.height)
    assert demo.is_hidden("#error")
    assert demo.text_content("#enhanced").startswith("The engine renders: anime")


def test_the_output_differs_from_the_camera_and_follows_the_prompt(demo: Any) -> None:
    camera = video_frame(demo, "#camera")
    before, noise = settled_look(demo)  # the same look, frame to frame
    assert mean_abs_diff(camera, before) > 20, "the output looks like the camera"

    demo.click("#examples button:has-text('pencil sketch')")
    demo.wait_for_function(
        "() => document.querySelector('#enhanced').textContent.includes('pencil')"
    )
    assert demo.input_value("#prompt") == "pencil sketch"
    after = steady_output(demo)
    changed = mean_abs_diff(before, after)
    assert changed > max(10.0, 4 * noise), (changed, noise)
    assert mean_abs_diff(camera, after) > 20
    assert demo.is_hidden("#error")


def test_usage_grows(demo: Any) -> None:
    first = wait_for(lambda: int(demo.text_content("#usage") or 0), timeout=15)
    wait_for(lambda: int(demo.text_content("#usage") or 0) >= first + 2, timeout=15)


def png_bytes(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def test_reference_images_and_their_errors_are_shown(demo: Any) -> None:
    before, noise = settled_look(demo)

    # Refusals are shown plainly, and nothing of them is kept.
    demo.set_input_files(
        "#image", files=[{"name": "broken.png", "mimeType": "image/png", "buffer": b"no" * 500}]
    )
    demo.wait_for_selector("#error:not([hidden])")
    assert "INVALID_INPUT" in demo.text_content("#error")
    assert demo.is_disabled("#clear-image")
    huge = b"\x89PNG" + bytes(10 * 1024 * 1024)
    demo.set_input_files(
        "#image", files=[{"name": "huge.png", "mimeType": "image/png", "buffer": huge}]
    )
    demo.wait_for_function("() => document.querySelector('#error').textContent.includes('10 MB')")
    assert demo.is_disabled("#clear-image")

    # A real picture restyles the output, and Clear takes it away again.
    painting = png_bytes(data.coffee())
    demo.set_input_files(
        "#image", files=[{"name": "coffee.png", "mimeType": "image/png", "buffer": painting}]
    )
    demo.wait_for_selector("#clear-image:not([disabled])")
    assert demo.is_hidden("#error")
    assert demo.is_visible("#image-preview")
    styled = steady_output(demo)
    assert mean_abs_diff(before, styled) > max(5.0, 4 * noise)
    demo.click("#clear-image")
    demo.wait_for_selector("#clear-image[disabled]")
    assert demo.is_hidden("#image-preview")
    assert demo.is_hidden("#error")


def test_another_model_asks_the_camera_for_its_size_and_rate(demo: Any, server: LiveServer) -> None:
    other = CATALOG["mirage_v2"]
    old_session = demo.evaluate("() => livemorphDemo.session.sessionId")
    demo.select_option("#model", other.name)
    demo.wait_for_function(
        """([name, old]) => {
          const session = livemorphDemo.session;
          return session && session.model === name && session.sessionId !== old
            && document.querySelector('#state').textContent === 'generating';
        }""",
        arg=[other.name, old_session],
        timeout=60_000,
    )
    asked = demo.evaluate(
        "() => document.querySelector('#camera').srcObject.getVideoTracks()[0].getConstraints()"
    )
    assert asked == {"width": other.width, "height": other.height, "frameRate": other.fps}
    assert server.wait_sessions(1) == 1  # the old session ended when the new one began
    _, size, _ = wait_for(lambda: playing(demo, "#output"))
    assert size == (other.width, other.height)


def test_the_share_link_shows_the_same_output(
    demo: Any, server: LiveServer, tmp_path: Path
) -> None:
    with demo.context.expect_page() as opened:
        demo.click("#share")
    viewer = opened.value
    try:
        token = demo.evaluate("() => livemorphDemo.session.subscribeToken")
        assert "/watch?token=" in viewer.url
        assert demo.get_attribute("#share-link", "href") == viewer.url
        viewer.wait_for_function(
            "() => /^(connected|generating)$/.test(document.querySelector('#state').textContent)",
            timeout=30_000,
        )
        _, size, _ = wait_for(lambda: playing(viewer, "#output"))
        assert size == (MODEL.width, MODEL.height)
        assert viewer.evaluate("() => livemorphViewer.viewer.sessionId") == demo.evaluate(
            "() => livemorphDemo.session.sessionId"
        )
        assert token
        time.sleep(1.0)
        published = video_frame(demo, "#output")
        watched = video_frame(viewer, "#output")
        camera = video_frame(demo, "#camera")
        assert mean_abs_diff(published, watched) < mean_abs_diff(camera, published) / 3

        keep = os.environ.get(SCREENSHOT_ENV)
        shot = Path(keep) if keep else tmp_path / "demo.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        demo.screenshot(path=str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert shot.stat().st_size > 50_000  # two videos, not a blank page

        # Stop: the server's session ends, and the viewer hears it has.
        demo.click("#start")
        assert demo.text_content("#start") == "Start"
        assert server.wait_sessions(0) == 0
        assert demo.text_content("#state") == "disconnected"
        viewer.wait_for_function(
            "() => document.querySelector('#error').textContent.includes('ended')", timeout=20_000
        )
        assert (
            viewer.evaluate("() => livemorphViewer.viewer.getConnectionState()") == "disconnected"
        )
    finally:
        viewer.close()


def test_the_page_fits_a_phone(demo: Any) -> None:
    demo.set_viewport_size({"width": 390, "height": 844})
    try:
        overflow = demo.evaluate(
            "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0
        camera = demo.locator("#camera").bounding_box()
        output = demo.locator("#output").bounding_box()
        assert camera and output
        assert output["y"] >= camera["y"] + camera["height"] - 1  # stacked, not side by side
        assert output["width"] > 300
        for control in ("#prompt", "#model", "#start", "#share"):
            box = demo.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 390, control
    finally:
        demo.set_viewport_size({"width": 1280, "height": 860})


def test_start_again_after_stop(demo: Any, server: LiveServer) -> None:
    demo.click("#start")  # Stop
    assert server.wait_sessions(0) == 0
    assert demo.text_content("#start") == "Start"
    demo.click("#start")
    demo.wait_for_function(
        "() => document.querySelector('#state').textContent === 'generating'", timeout=60_000
    )
    assert server.wait_sessions(1) == 1
    _, size, _ = wait_for(lambda: playing(demo, "#output"))
    assert size == (MODEL.width, MODEL.height)
