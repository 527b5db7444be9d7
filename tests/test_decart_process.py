"""Image edits through the published Python client `decart==0.2.4`: `client.process` with an
image model, against a real server (`POST /v1/generate/{model}`).

The client lives in an environment of its own (tests/decart_current.py); drive.py's
`process` scenario makes the calls as an app would.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from livemorph.testing import LiveServer
from tests.decart_current import Driver, driver_python
from tests.media import mean_abs_diff, photo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

#: The picture's size: not a model's, since an edit keeps the input's size.
WIDTH, HEIGHT = 400, 300
SCENARIO_TIMEOUT = 90


@pytest.fixture(scope="module", autouse=True)
def environment() -> Path:
    """The client's environment, built (once per lock file) before any server starts."""
    return driver_python()


def drive_process(server: LiveServer, out: Path, picture: Path, model: str) -> Driver:
    # drive.py's Scenario wants a realtime definition as well; these sizes only satisfy it
    return Driver(
        out,
        *("--base-url", server.base_url, "--realtime-url", server.ws_url),
        *("--api-key", server.api_key, "--scenario", "process"),
        *("--model", "lucy-restyle-2", "--fps", "30", "--width", "1280", "--height", "704"),
        *("--image", str(picture), "--process-model", model, "--prompt", "anime"),
    )


@pytest.mark.parametrize("model", ["lucy-image-2", "lucy-pro-i2i"])
def test_process_edits_the_image(server: LiveServer, tmp_path: Path, model: str) -> None:
    original = photo(WIDTH, HEIGHT)
    picture = tmp_path / "astronaut.png"
    Image.fromarray(original).save(picture)
    with drive_process(server, tmp_path / "out", picture, model) as driver:
        driver.finish(SCENARIO_TIMEOUT)
    processed = driver.event("processed")
    assert processed["ok"], driver.report()
    assert processed["url_path"] == f"/v1/generate/{model}"
    with Image.open(io.BytesIO(Path(processed["file"]).read_bytes())) as image:
        assert (image.format, image.size) == ("PNG", (WIDTH, HEIGHT))
        edited = np.asarray(image.convert("RGB"))
    assert mean_abs_diff(edited, original) > 10, "the picture is not visibly edited"

    refused = driver.event("process_refused")
    assert refused["ok"] and refused["raised"], driver.report()
    assert refused["error"]["type"] == "ProcessingError", refused
    assert "400" in refused["error"]["message"], refused
    assert "refused by moderation" in refused["error"]["message"], refused
