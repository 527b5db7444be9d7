"""Batch video jobs and image edits through the published `@decartai/sdk@0.1.20`, unchanged,
in Chromium, against a real `livemorph serve`.

The SDK is bundled as published (tests/decart_js.py) and loaded by a small app page
(tests/data/decart-jobs-app) served from its own origin, so its calls are cross-origin as an
app's are and the server is told that origin (`--cors-origins`). The app makes the calls a
user makes, with the SDK's own model definitions (`models.video(...)`, `models.image(...)`)
and files given as `File`s: `client.queue.submitAndPoll`, `submit` / `status` / `result`,
and `client.process`.

What is checked is what the app gets back: a restyled MP4 (PyAV: the clip's size, length
and sound, a picture that differs from the clip's), an edited picture (PIL: the input's
size, other pixels), and a file that is not a video refused with the server's reason while
the next job still runs. Every request the page makes goes to the app or the server.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from livemorph.models import IMAGE_MODELS, VIDEO_MODELS
from livemorph.testing import LiveServer, serve

from .browser import chromium
from .decart_js import LIVEKIT_VERSION, published_livekit_sdk
from .media import mean_abs_diff, photo
from .test_browser_decart_livekit import AppOrigin
from .test_transform import FPS, Clip, make_clip

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]

APP_DIR = Path(__file__).parent / "data" / "decart-jobs-app"
SIZE = (320, 240)
SECONDS = 2.0
#: Refused by the server's embedded blocklist (src/livemorph/policy/blocklist.txt).
REFUSED_PROMPT = "cyberpunk neon city, p0rn"
NOT_A_VIDEO = b"these bytes are not a video, whatever the file's name says\n" * 40


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The astronaut sliding 3 pixels a frame, 2 s at 25 fps, with an AAC tone."""
    return make_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=SECONDS, size=SIZE)


@pytest.fixture(scope="module")
def app(clip: Path) -> Iterator[AppOrigin]:
    site = AppOrigin(
        {
            "/index.html": ((APP_DIR / "index.html").read_bytes(), "text/html; charset=utf-8"),
            "/app.js": ((APP_DIR / "app.js").read_bytes(), "text/javascript"),
            "/decart-sdk.js": (published_livekit_sdk().encode(), "text/javascript"),
            "/clip.mp4": (clip.read_bytes(), "video/mp4"),
            "/not-a-video.mp4": (NOT_A_VIDEO, "video/mp4"),
            "/photo.png": (png(photo(*SIZE)), "image/png"),
            "/favicon.ico": (b"", "image/x-icon"),
        }
    )
    httpd = site.serve()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, app: AppOrigin) -> Iterator[LiveServer]:
    """The fast `grade` engine: every prompt its own colour grade, a clip done in seconds."""
    flags = ("--engine", "grade", "--cors-origins", app.origin)
    with serve(tmp_path_factory.mktemp("jobs-sdk"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def edit_server(tmp_path_factory: pytest.TempPathFactory, app: AppOrigin) -> Iterator[LiveServer]:
    """Image edits get a server of their own: on one that has edited an image, the next job
    freezes the whole server (the job worker's subprocess spawn under uvloop deadlocks in
    the forked child on the edit's thread-local PyAV reformatter), so no job may follow."""
    flags = ("--engine", "grade", "--cors-origins", app.origin)
    with serve(tmp_path_factory.mktemp("edit-sdk"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture
def page(browser: Any, app: AppOrigin, request: pytest.FixtureRequest) -> Iterator[Any]:
    """The app page, pointed at the test's server (`server`, or `edit_server` where the
    test asks for it), its console and requests kept and printed after the test."""
    wanted = "edit_server" if "edit_server" in request.fixturenames else "server"
    server: LiveServer = request.getfixturevalue(wanted)
    context = browser.new_context()
    opened = context.new_page()
    log: list[str] = []
    urls: list[str] = []
    opened.on("console", lambda m: log.append(f"console {m.type}: {m.text[:400]}"))
    opened.on("pageerror", lambda e: log.append(f"page error: {e}"))
    opened.on("request", lambda r: (urls.append(r.url), log.append(f"> {r.method} {r.url}")))
    opened.on("response", lambda r: log.append(f"< {r.status} {r.url}"))
    opened.goto(app.page_url(server))
    opened.wait_for_function("() => window.app !== undefined", timeout=15_000)
    try:
        yield opened
    finally:
        context.close()
        print("\n---- browser log ----\n" + "\n".join(log))
    foreign = [url for url in urls if not url.startswith("http://127.0.0.1:")]
    assert not foreign, f"the page reached other hosts: {foreign}"


# -- what came back --------------------------------------------------------------------------


def blob_bytes(value: dict[str, Any], tmp_path: Path | None = None, name: str = "") -> bytes:
    assert value.get("blob") is True, f"the SDK did not return a Blob: {value}"
    data = base64.b64decode(value["base64"])
    assert len(data) == value["size"]
    if tmp_path is not None:
        (tmp_path / name).write_bytes(data)
    return data


def duration(clip: Clip) -> float:
    return clip.times[-1] - clip.times[0] + 1 / float(clip.rate)


def check_restyled(source: Path, result: Path) -> None:
    """The job's MP4 is the clip's size, length and sound, its picture changed."""
    before, after = Clip(source), Clip(result)
    assert after.size == SIZE
    assert abs(duration(after) - duration(before)) <= 2 / FPS + 1e-6, (before.times, after.times)
    assert abs(len(after.rgb) - len(before.rgb)) <= 2
    assert after.audio == "aac" and after.sound == pytest.approx(SECONDS, abs=0.05)
    changed = [mean_abs_diff(a, b) for a, b in zip(before.rgb, after.rgb, strict=False)]
    assert min(changed) > 8, f"the clip was not restyled: {min(changed):.1f} apart at least"


def video_files(url: str = "/clip.mp4", name: str = "clip.mp4") -> dict[str, Any]:
    return {"data": {"url": url, "name": name, "type": "video/mp4"}}


# -- the tests -------------------------------------------------------------------------------


def test_the_sdks_job_and_image_models_are_served(page: Any, server: LiveServer) -> None:
    """Every video model of the SDK's catalog that this server serves is sent to its own
    `/v1/jobs/{name}`, every image model to `/v1/generate/{name}`; those it does not serve
    are the `lucy-clip` family only."""
    found = page.evaluate(
        """() => ({
          video: app.sdk.listModels({ kind: "video" }).map((m) => [m.name, m.queueUrlPath]),
          image: app.sdk.listModels({ kind: "image" }).map((m) => [m.name, m.urlPath]),
        })"""
    )
    video = dict(found["video"])
    image = dict(found["image"])
    assert all(video[name] == f"/v1/jobs/{name}" for name in video)
    assert all(image[name] == f"/v1/generate/{name}" for name in image)
    assert set(image) <= set(IMAGE_MODELS)
    unserved = set(video) - set(VIDEO_MODELS)
    assert unserved <= {"lucy-clip", "lucy-clip-latest", "lucy-pro-v2v"}, unserved
    assert {"lucy-restyle-2", "lucy-2.5", "lucy-2.1", "lucy-restyle-v2v"} <= set(video)
    assert LIVEKIT_VERSION == "0.1.20"


def test_submit_and_poll_restyles_a_clip(
    page: Any, server: LiveServer, clip: Path, tmp_path: Path
) -> None:
    outcome = page.evaluate(
        "([key, input]) => app.submitAndPoll(key, input)",
        [server.api_key, {"model": "lucy-restyle-2", "prompt": "anime", "files": video_files()}],
    )
    assert outcome["ok"], outcome
    result = outcome["value"]
    assert result["status"] == "completed", result
    statuses = [s["status"] for s in outcome["statuses"]]
    # submit's answer, then each poll's: pending (maybe processing), then completed
    assert statuses[0] == "pending" and statuses[-1] == "completed", statuses
    assert set(statuses) <= {"pending", "processing", "completed"}, statuses
    assert {s["job_id"] for s in outcome["statuses"]} == {result["job_id"]}
    assert result["data"]["type"] == "video/mp4"
    blob_bytes(result["data"], tmp_path, "out.mp4")
    check_restyled(clip, tmp_path / "out.mp4")


def test_submit_status_and_result(
    page: Any, server: LiveServer, clip: Path, tmp_path: Path
) -> None:
    """The three calls one by one, with `lucy-2.5` (prompt and a reference image)."""
    files = {
        **video_files(),
        "reference_image": {"url": "/photo.png", "name": "style.png", "type": "image/png"},
    }
    submitted = page.evaluate(
        "([key, input]) => app.submit(key, input)",
        [server.api_key, {"model": "lucy-2.5", "prompt": "watercolor", "files": files}],
    )
    assert submitted["ok"], submitted
    job = submitted["value"]
    assert set(job) == {"job_id", "status"} and job["status"] == "pending", job

    early = page.evaluate("([key, id]) => app.result(key, id)", [server.api_key, job["job_id"]])
    if not early["ok"]:  # not finished yet: the SDK's error with the server's status
        assert early["error"]["code"] == "QUEUE_RESULT_ERROR", early
        assert early["error"]["data"] == {"status": 409}, early
        assert "job not completed" in early["error"]["message"], early

    seen = page.evaluate("([key, id]) => app.poll(key, id)", [server.api_key, job["job_id"]])
    assert all(s["ok"] for s in seen), seen
    last = seen[-1]["value"]
    assert last == {"job_id": job["job_id"], "status": "completed"}, seen

    fetched = page.evaluate("([key, id]) => app.result(key, id)", [server.api_key, job["job_id"]])
    assert fetched["ok"], fetched
    assert fetched["value"]["type"] == "video/mp4"
    blob_bytes(fetched["value"], tmp_path, "out.mp4")
    check_restyled(clip, tmp_path / "out.mp4")

    # a wrong key is refused: the SDK's status error carries the server's 401
    other = page.evaluate("([key, id]) => app.poll(key, id)", ["lm_wrong", job["job_id"]])
    assert other[-1]["ok"] is False
    assert other[-1]["error"]["code"] == "QUEUE_STATUS_ERROR", other
    assert other[-1]["error"]["data"] == {"status": 401}, other


def test_process_edits_an_image(page: Any, edit_server: LiveServer) -> None:
    server = edit_server
    outcome = page.evaluate(
        "([key, input]) => app.process(key, input)",
        [
            server.api_key,
            {
                "model": "lucy-image-2",
                "prompt": "oil painting",
                "files": {"data": {"url": "/photo.png", "name": "photo.png", "type": "image/png"}},
            },
        ],
    )
    assert outcome["ok"], outcome
    answer = outcome["value"]
    assert answer["type"] == "image/png", answer["type"]
    image = Image.open(io.BytesIO(blob_bytes(answer)))
    image.load()
    assert image.size == SIZE
    edited = np.asarray(image.convert("RGB"))
    apart = mean_abs_diff(edited, photo(*SIZE))
    assert apart > 8, f"the picture was not edited: {apart:.1f} apart"


def test_a_file_that_is_not_a_video_is_refused_and_the_next_job_runs(
    page: Any, server: LiveServer, clip: Path, tmp_path: Path
) -> None:
    bad = {"model": "lucy-restyle-2", "prompt": "anime"}
    bad_files = video_files("/not-a-video.mp4", "holiday.mp4")
    refused = page.evaluate(
        """async ([key, input]) =>
          [await app.submit(key, input), await app.submitAndPoll(key, input)]""",
        [server.api_key, {**bad, "files": bad_files}],
    )
    for outcome in refused:
        # The SDK throws (rejects with) its QUEUE_SUBMIT_ERROR: the server's status and,
        # in the message, the server's answer with its reason.
        assert outcome["ok"] is False, outcome
        error = outcome["error"]
        assert error["code"] == "QUEUE_SUBMIT_ERROR", error
        assert error["data"] == {"status": 415}, error
        assert error["message"].startswith("Failed to submit job: 415 - "), error
        assert "invalid video: data is not a video file this server can read" in error["message"]
    assert refused[1]["statuses"] == [], "a refused submit was polled"

    # A job the server takes and then fails: submitAndPoll resolves with the SDK's own
    # words; the server's reason is in the last status it saw (and in queue.status).
    failed = page.evaluate(
        "([key, input]) => app.submitAndPoll(key, input)",
        [
            server.api_key,
            {"model": "lucy-restyle-2", "prompt": REFUSED_PROMPT, "files": video_files()},
        ],
    )
    print("a job with a refused prompt:", json.dumps(failed)[:600])
    assert failed["ok"], failed  # moderation runs with the job, not at submit
    result = failed["value"]
    assert result["status"] == "failed" and result["error"] == "Job failed", result
    last = failed["statuses"][-1]
    assert last["job_id"] == result["job_id"] and last["status"] == "failed", failed
    assert "prompt refused by moderation" in last["error"], failed

    started = time.monotonic()
    after = page.evaluate(
        "([key, input]) => app.submitAndPoll(key, input)",
        [server.api_key, {**bad, "files": video_files()}],
    )
    assert after["ok"] and after["value"]["status"] == "completed", after
    blob_bytes(after["value"]["data"], tmp_path, "out.mp4")
    check_restyled(clip, tmp_path / "out.mp4")
    print(f"the next job: {time.monotonic() - started:.1f} s")
