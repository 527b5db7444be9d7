"""The published Python client `decart==0.2.4`, whose sessions run over LiveKit, works
unchanged against a real `livemorph serve`.

The client lives in an environment of its own (tests/decart_current.py); these tests run
tests/data/decart-py/drive.py there, a scenario at a time, and check what it reports and
the frames it saved against the server's own view (its session count).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from skimage import data

from livemorph.models import CATALOG
from livemorph.testing import LiveServer, serve
from tests.decart_current import Driver, driver_python
from tests.media import mean_abs_diff, photo

#: The session's scenario runs in the first of its tests (a cold engine, a viewer that
#: does not connect: over two minutes at worst).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: The newest realtime model the client lists: drive.py streams with the client's own
#: definition of it (`models.realtime`), whose size and rate the server's catalog shares.
MODEL = CATALOG["lucy-2.6"]
PROMPT = "anime"
NEW_PROMPT = "cyberpunk neon city"
#: Refused by the embedded blocklist (src/livemorph/policy/blocklist.txt); would turn the
#: output to sepia if it got through.
REFUSED_PROMPT = "sepia film, p0rn"
#: Output frames a second, on average over the session, that show video keeps flowing: the
#: 2-core machine runs the client's encoder and decoder beside the server's engine (about
#: 10 a second at 1280x720 there), so this is no measure of speed.
MIN_FPS = 5
#: drive.py spends about a second starting up; the rest is the scenario's own.
SCENARIO_TIMEOUT = 90
#: A node's first session loads its engine (the neural engine's style catalog: 8 s on a
#: quiet 2-core machine, over 25 s on a busy one) before it acks the initial state.
COLD_CONNECT = "60"


@pytest.fixture(scope="module", autouse=True)
def environment() -> Path:
    """The client's environment, built (once per lock file) before any server starts."""
    return driver_python()


def drive(server: LiveServer, out: Path, scenario: str, *args: str, api_key: str = "") -> Driver:
    """drive.py's `scenario` against `server`, with the astronaut at the model's size as
    its camera."""
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "camera.npy", photo(MODEL.width, MODEL.height))
    return Driver(
        out,
        *("--base-url", server.base_url, "--realtime-url", server.ws_url),
        *("--api-key", api_key or server.api_key, "--scenario", scenario),
        *("--model", MODEL.name, "--fps", str(MODEL.fps)),
        *("--width", str(MODEL.width), "--height", str(MODEL.height)),
        *("--photo", str(out / "camera.npy")),
        *args,
    )


def reference_image(path: Path) -> Path:
    """A JPEG for the session's initial state: scikit-image's cat."""
    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return path


@dataclass
class SessionRun:
    """One `session` scenario, shared by the tests below: each checks its part."""

    driver: Driver
    #: The server's session count right after `disconnect()` returned (None: not reached).
    sessions_after_disconnect: int | None


@pytest.fixture(scope="module")
def session_run(server, tmp_path_factory: pytest.TempPathFactory) -> SessionRun:
    out = tmp_path_factory.mktemp("decart-session")
    sessions = None
    driver = drive(
        server,
        out,
        "session",
        *("--prompt", PROMPT, "--image", str(reference_image(out / "cat.jpg"))),
        *("--new-prompt", NEW_PROMPT, "--refused-prompt", REFUSED_PROMPT),
        *("--pause-at", "disconnected", "--connect-timeout", COLD_CONNECT),
    )
    # A step that stops the scenario ends it here; the tests of the steps it did not reach
    # fail, each with the driver's report.
    with driver, contextlib.suppress(AssertionError):
        driver.until("checkpoint", 3 * SCENARIO_TIMEOUT)
        sessions = server.wait_sessions(0)
        driver.resume()
        driver.finish()
    return SessionRun(driver, sessions)


def test_connect_with_initial_prompt_and_image(session_run: SessionRun) -> None:
    driver = session_run.driver
    start = driver.event("start")
    assert start["model"] == MODEL.name and start["size"] == [MODEL.width, MODEL.height]
    assert start["fps"] == MODEL.fps and start["versions"]["decart"] == "0.2.4"
    connected = driver.step("connected")
    assert connected["session_id"] and connected["is_connected"], driver.report()
    room = json.loads(base64.urlsafe_b64decode(connected["subscribe_token"]))["room_name"]
    assert room, "the subscribe token names the session's room"
    first = driver.step("first_frame")
    assert first["shape"] == [MODEL.height, MODEL.width, 3]
    assert first["sizes"] == [[MODEL.width, MODEL.height]], "every frame at the model's size"
    assert first["seconds"] < 10, "the first frame soon after connect() returns"
    output = driver.frame(first["frame"])
    assert mean_abs_diff(output, photo(MODEL.width, MODEL.height)) > 5, "it is transformed"


def test_set_with_a_new_prompt_changes_the_picture(session_run: SessionRun) -> None:
    driver = session_run.driver
    changed = driver.step("set_prompt")
    before, after = driver.frame(changed["before"]), driver.frame(changed["after"])
    assert mean_abs_diff(after, before) > 5, driver.report()


def test_refused_prompt_raises_and_the_session_goes_on(session_run: SessionRun) -> None:
    driver = session_run.driver
    refused = driver.step("refused")
    for how in ("set_prompt", "set"):
        outcome = refused[how]
        assert outcome["raised"], f"{how}({REFUSED_PROMPT!r}) should raise"
        assert outcome["error"]["type"] == "DecartSDKError", outcome
        assert "refused by moderation: not allowed" in outcome["error"]["message"], outcome
    assert refused["frames_since"] > 0 and refused["is_connected"], "the session goes on"
    assert refused["steers_after"]
    changed = driver.step("set_prompt")
    before, after = driver.frame(changed["before"]), driver.frame(changed["after"])
    kept = driver.frame(refused["frame"])
    assert mean_abs_diff(kept, after) < mean_abs_diff(after, before), "the look is kept"


def test_generation_ticks_count_up(session_run: SessionRun) -> None:
    ticks = session_run.driver.step("ticks")["seconds_seen"]
    assert len(ticks) >= 2 and ticks == sorted(ticks) and ticks[-1] > ticks[0], ticks


def test_viewer_subscribes_with_the_subscribe_token(session_run: SessionRun) -> None:
    driver = session_run.driver
    viewer = driver.step("viewer")
    assert viewer["frames"] > 0 and viewer["sizes"] == [[MODEL.width, MODEL.height]]
    watched, published = driver.frame(viewer["frame"]), driver.frame(viewer["published"])
    camera = photo(MODEL.width, MODEL.height)
    assert mean_abs_diff(watched, published) * 2 < mean_abs_diff(watched, camera), (
        "the viewer sees the session's output, not the camera"
    )


def test_disconnect_ends_the_session(session_run: SessionRun) -> None:
    driver = session_run.driver
    ended = driver.step("disconnected")
    assert ended["state"] == "disconnected"
    assert ended["output"]["fps"] > MIN_FPS, ended["output"]
    assert ended["errors"] == [], "no error reached the app"
    assert session_run.sessions_after_disconnect == 0, "the server still runs the session"
    assert driver.events[-1]["event"] == "done", driver.report()


@pytest.mark.parametrize("key", ["bad", "expired"])
def test_refused_key(server, tmp_path, key: str) -> None:
    if key == "bad":
        api_key = "lm_not_a_key"
    else:
        response = httpx.post(
            f"{server.base_url}/v1/client/tokens",
            headers={"X-API-KEY": server.api_key},
            json={"expiresIn": 1},
        )
        response.raise_for_status()
        api_key = response.json()["apiKey"]
        time.sleep(2.2)  # past its expiry, which is counted in whole seconds
    with drive(server, tmp_path, "refused", api_key=api_key) as driver:
        driver.finish(SCENARIO_TIMEOUT)
    refused = driver.event("refused")
    assert refused["raised"], driver.report()
    assert refused["error"]["type"] == "WebRTCError", refused
    assert refused["error"]["message"] == "invalid api key", refused
    assert refused["seconds"] < 5, "a permanent error: the client does not retry"
    assert server.active_sessions() == 0


def test_full_node_queues_the_second_client(tmp_path) -> None:
    with (
        serve(tmp_path / "server", "--engine", "passthrough", "--max-sessions", "1") as server,
        drive(
            server,
            tmp_path / "driver",
            "queue",
            "--pause-at",
            "queued",
            "--connect-timeout",
            COLD_CONNECT,
        ) as driver,
    ):
        driver.until("first_connected", SCENARIO_TIMEOUT)
        queued = driver.until("second_queued")
        assert queued["queue_position_messages"] >= 1 and queued["connect_pending"]
        driver.until("checkpoint")
        assert server.active_sessions() == 1, "the queued client holds no session yet"
        driver.resume()
        admitted = driver.until("second_admitted", SCENARIO_TIMEOUT)
        assert admitted["frames"] > 0 and admitted["sizes"] == [[MODEL.width, MODEL.height]]
        driver.finish()
        assert server.wait_sessions(0) == 0
