"""The published Python client `decart==0.2.4`, whose sessions run over LiveKit, works
unchanged against a real `livemorph serve`.

The client lives in an environment of its own (tests/decart_current.py); these tests run
tests/data/decart-py/drive.py there, a scenario at a time, and check what it reports and
the frames it saved against the server's own view (its session count).
"""

from __future__ import annotations

import base64
import io
import json
import time
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

pytestmark = pytest.mark.slow

MODEL = CATALOG["mirage_v2"]
PROMPT = "anime"
NEW_PROMPT = "cyberpunk neon city"
#: Refused by the embedded blocklist (src/livemorph/policy/blocklist.txt); would turn the
#: output to sepia if it got through.
REFUSED_PROMPT = "sepia film, p0rn"
#: drive.py spends about a second starting up; the rest is the scenario's own.
SCENARIO_TIMEOUT = 60


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


def test_session_prompt_image_refusal_ticks_viewer_disconnect(server, tmp_path) -> None:
    camera = photo(MODEL.width, MODEL.height)
    with drive(
        server,
        tmp_path,
        "session",
        *("--prompt", PROMPT, "--image", str(reference_image(tmp_path / "cat.jpg"))),
        *("--new-prompt", NEW_PROMPT, "--refused-prompt", REFUSED_PROMPT),
        *("--pause-at", "disconnected"),
    ) as driver:
        connected = driver.until("connected", SCENARIO_TIMEOUT)
        assert connected["session_id"] and connected["is_connected"], driver.report()
        room = json.loads(base64.urlsafe_b64decode(connected["subscribe_token"]))["room_name"]
        assert room, "the subscribe token names the session's room"

        first = driver.until("first_frame")
        assert first["shape"] == [MODEL.height, MODEL.width, 3]
        assert first["sizes"] == [[MODEL.width, MODEL.height]], "every frame at the model's size"
        assert first["first_frame_s"] < 15

        changed = driver.until("set_prompt")
        before, after = driver.frame(changed["before"]), driver.frame(changed["after"])
        assert mean_abs_diff(before, camera) > 5, "the output is transformed"
        assert mean_abs_diff(after, before) > 5, "set() with a new prompt changes the picture"

        refused = driver.until("refused")
        for how in ("set_prompt", "set"):
            outcome = refused[how]
            assert outcome["raised"], f"{how}({REFUSED_PROMPT!r}) should raise"
            assert outcome["error"]["type"] == "DecartSDKError"
            assert "refused by moderation: not allowed" in outcome["error"]["message"]
        assert refused["frames_since"] > 0 and refused["is_connected"], "the session goes on"
        assert refused["steers_after"]
        kept = driver.frame(refused["frame"])
        assert mean_abs_diff(kept, after) < mean_abs_diff(after, before), "the look is kept"

        ticks = driver.until("ticks")["seconds_seen"]
        assert len(ticks) >= 2 and ticks == sorted(ticks) and ticks[-1] > ticks[0]

        viewer = driver.until("viewer")
        assert viewer["frames"] > 0 and viewer["sizes"] == [[MODEL.width, MODEL.height]]
        watched, published = driver.frame(viewer["frame"]), driver.frame(viewer["published"])
        assert mean_abs_diff(watched, published) * 2 < mean_abs_diff(watched, camera), (
            "the viewer sees the session's output, not the camera"
        )

        ended = driver.until("disconnected")
        assert ended["state"] == "disconnected"
        assert ended["output"]["fps"] > MODEL.fps / 3, ended["output"]
        assert ended["errors"] == [], "no error reached the app"
        driver.until("checkpoint")
        assert server.wait_sessions(0) == 0, "disconnect() ends the session on the server"
        driver.resume()
        driver.finish()


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
        drive(server, tmp_path / "driver", "queue", "--pause-at", "queued") as driver,
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
