"""The browser SDK's batch calls (`client.jobs`, `client.editImage`) in a real Chromium
against a real `livemorph serve` (the `grade` engine): a clip sent from the page comes back
an MP4 its length and size, a picture comes back edited, refusals are coded errors."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from livemorph.testing import LiveServer, serve
from tests.media import mean_abs_diff, photo
from tests.test_transform import Clip, make_clip

from .browser import chromium

pytestmark = pytest.mark.browser

SIZE = (160, 96)

#: The SDK, and bytes carried in and out of the page as base64.
PRELUDE = """
async () => {
  window.sdk = await import("/sdk/livemorph.js");
  window.bytesOf = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  window.base64Of = async (blob) => {
    const bytes = new Uint8Array(await blob.arrayBuffer());
    let binary = "";
    for (let i = 0; i < bytes.length; i += 0x8000)
      binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return { b64: btoa(binary), type: blob.type };
  };
  window.settle = (promise) =>
    promise.then(
      (value) => ({ ok: true, value: value ?? null }),
      (error) => ({ ok: false, code: error.code ?? null, message: String(error.message) }),
    );
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("jobs-browser"), "--engine", "grade") as live:
        yield live


@pytest.fixture
def page(server: LiveServer) -> Iterator[Any]:
    with chromium() as browser:
        page = browser.new_page()
        page.route(
            f"{server.base_url}/blank",
            lambda route: route.fulfill(body="<!doctype html><title>jobs</title>"),
        )
        page.goto(f"{server.base_url}/blank")
        page.evaluate(PRELUDE)
        yield page


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_a_clip_from_the_page_comes_back_an_mp4_its_length(
    page: Any, server: LiveServer, tmp_path: Path
) -> None:
    clip = make_clip(tmp_path / "clip.mp4", seconds=1.0, size=SIZE)
    found = page.evaluate(
        """async ([key, video]) => {
          const client = sdk.createClient({ apiKey: key });
          const seen = [];
          const mp4 = await client.jobs.submitAndWait(
            "lucy-restyle-2",
            new Blob([bytesOf(video)], { type: "video/mp4" }),
            { prompt: "anime", onProgress: (s) => seen.push(s), pollInterval: 100 },
          );
          const job = await client.jobs.submit("mirage", bytesOf(video).buffer, {
            prompt: "sketch",
            enhancePrompt: false,
          });
          const done = await client.jobs.wait(job.jobId, { pollInterval: 100 });
          const again = await client.jobs.result(job.jobId);
          return { video: await base64Of(mp4), seen, job, done, again: again.size };
        }""",
        [server.api_key, b64(clip.read_bytes())],
    )
    assert found["video"]["type"] == "video/mp4"
    assert found["seen"][-1]["status"] == "completed"
    assert all(0 <= s.get("progress", 0) <= 1 for s in found["seen"])
    assert found["job"]["status"] == "pending" and set(found["job"]) == {"jobId", "status"}
    assert found["done"] == {"jobId": found["job"]["jobId"], "status": "completed"}
    out = tmp_path / "out.mp4"
    out.write_bytes(base64.b64decode(found["video"]["b64"]))
    source, result = Clip(clip), Clip(out)
    assert result.size == SIZE and len(result.rgb) == len(source.rgb) == 25
    assert result.times[-1] == pytest.approx(source.times[-1], abs=0.05)
    assert result.sound == pytest.approx(1.0, abs=0.05)
    assert min(mean_abs_diff(a, b) for a, b in zip(source.rgb, result.rgb, strict=True)) > 8
    assert found["again"] > 1000


def test_an_image_edit_and_refusals(page: Any, server: LiveServer) -> None:
    astronaut = photo(96, 64)
    png = io.BytesIO()
    Image.fromarray(astronaut).save(png, format="PNG")
    found = page.evaluate(
        """async ([key, image]) => {
          const client = sdk.createClient({ apiKey: key });
          const stranger = sdk.createClient({ apiKey: "no-such-key" });
          const edited = await client.editImage("lucy-image-2", bytesOf(image), {
            prompt: "anime",
            referenceImage: "data:image/png;base64," + image,
          });
          const video = new Blob([new Uint8Array(20000).fill(7)]);
          return {
            edited: await base64Of(edited),
            badKey: await settle(stranger.jobs.submit("lucy-restyle-2", video, { prompt: "x" })),
            badModel: await settle(client.jobs.submit("lucy-9", video, { prompt: "x" })),
            notVideo: await settle(client.jobs.submit("lucy-restyle-2", video, { prompt: "x" })),
            noPrompt: await settle(client.jobs.submit("lucy-restyle-2", video, {})),
            missing: await settle(client.jobs.status("0000000000000000")),
            notImage: await settle(client.editImage("lucy-image-2", video, { prompt: "x" })),
          };
        }""",
        [server.api_key, b64(png.getvalue())],
    )
    assert found["edited"]["type"] == "image/png"
    edited = Image.open(io.BytesIO(base64.b64decode(found["edited"]["b64"])))
    picture = np.asarray(edited.convert("RGB"))
    assert picture.shape == astronaut.shape and mean_abs_diff(picture, astronaut) > 8
    assert found["badKey"]["code"] == "INVALID_API_KEY"
    assert found["badModel"]["code"] == "MODEL_NOT_FOUND"
    assert "model not found: 'lucy-9'" in found["badModel"]["message"]
    assert found["notVideo"]["code"] == "INVALID_INPUT"
    assert "invalid video" in found["notVideo"]["message"]
    assert found["noPrompt"]["code"] == "INVALID_INPUT"
    assert found["missing"]["ok"] is False and "job not found" in found["missing"]["message"]
    assert found["notImage"]["code"] == "INVALID_INPUT"
