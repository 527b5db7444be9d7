"""Video jobs through the published Python client `decart==0.2.4`: `client.queue` with a
video model, against a real server (`POST /v1/jobs/{model}`, then its status and content).

The client lives in an environment of its own (tests/decart_current.py); drive.py's `jobs`
scenario makes the calls as an app would.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from livemorph.testing import LiveServer, serve
from tests.decart_current import Driver, driver_python
from tests.media import mean_abs_diff
from tests.test_transform import Clip, make_clip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SIZE = (320, 240)
SCENARIO_TIMEOUT = 120


@pytest.fixture(scope="module", autouse=True)
def environment() -> Path:
    """The client's environment, built (once per lock file) before any server starts."""
    return driver_python()


@pytest.fixture(scope="module")
def grade_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with the fast `grade` engine: a job's clip is done in a second or two."""
    with serve(tmp_path_factory.mktemp("server"), "--engine", "grade") as live:
        yield live


@pytest.mark.parametrize("model", ["lucy-restyle-2", "lucy-2.1"])
def test_submit_and_poll_restyles_the_clip(
    grade_server: LiveServer, tmp_path: Path, model: str
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.5, size=SIZE)
    # drive.py's Scenario wants a realtime definition as well; these sizes only satisfy it
    with Driver(
        tmp_path / "out",
        *("--base-url", grade_server.base_url, "--realtime-url", grade_server.ws_url),
        *("--api-key", grade_server.api_key, "--scenario", "jobs"),
        *("--model", "lucy-restyle-2", "--fps", "30", "--width", "1280", "--height", "704"),
        *("--video", str(clip), "--job-model", model, "--prompt", "anime"),
    ) as driver:
        driver.finish(SCENARIO_TIMEOUT)
    finished = driver.event("job_finished")
    assert finished["ok"], driver.report()
    assert finished["url_path"] == f"/v1/jobs/{model}"
    assert finished["status"] == "completed", finished
    assert finished["statuses"][0] == "pending" and finished["statuses"][-1] == "completed"
    source, result = Clip(clip), Clip(Path(finished["file"]))
    assert result.size == SIZE and len(result.rgb) == len(source.rgb)
    assert result.audio == "aac" and result.sound == pytest.approx(1.5, abs=0.05)
    changed = [mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)]
    assert min(changed) > 8, "the clip was not restyled"

    refused = driver.event("job_refused")
    assert refused["ok"] and refused["raised"], driver.report()
    assert refused["error"]["type"] == "QueueSubmitError", refused
    assert "415" in refused["error"]["message"] and "invalid video" in refused["error"]["message"]
