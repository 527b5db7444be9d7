"""The published `@decartai/sdk@0.1.20` (LiveKit transport), unchanged, in Chromium, against a
real `livemorph serve`.

The SDK is bundled as published (tests/decart_js.py) and loaded by a small app page
(tests/data/decart-livekit-app) served from its own origin by a local HTTP server, so it is a
real cross-origin app: the server is told that origin (`--cors-origins`) as an operator would
be. The app points the SDK at the server with the public options an app sets, `baseUrl` and
`realtimeBaseUrl`, and turns its telemetry off (`telemetry: false`); every request and socket
the pages open is checked to go to the app or the server, never to Decart's hosts.

Chromium's fake camera plays scikit-image's astronaut photo at the model's size. What is
checked is what a person sees and what the SDK reports: the output in the <video> at the
model's size, showing the camera's picture transformed (the `grade` engine: every prompt its
own colour grade); `set({prompt})` changing it; a moderation refusal thrown by `set` and
`setPrompt` and leaving the look as it was; `generationTick`s counting; a second page
watching the session through its subscribe token; `disconnect()` ending the server's
session; a bad key and an expired client token refused as the SDK reports them; and a full
node (`--max-sessions 1`) queueing the next client (`onQueuePosition`) until the first
leaves.

Each page's console (the SDK's and livekit-client's log lines), page errors, requests and
the text frames of its `/v1/stream` socket are kept; a failing test prints them, and
`LIVEMORPH_BROWSER_LOG_DIR` keeps them as one file per test.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
from google.protobuf import text_format
from livekit.protocol import rtc
from PIL import Image
from skimage import data

from livemorph.testing import LiveServer, free_port, serve

from .browser import camera_file, chromium, read_video, video_frame
from .decart_js import LIVEKIT_VERSION, published_livekit_sdk
from .media import mean_abs_diff, photo

pytestmark = [pytest.mark.browser, pytest.mark.slow]

APP_DIR = Path(__file__).parent / "data" / "decart-livekit-app"


@dataclass(frozen=True)
class Model:
    name: str
    width: int
    height: int
    fps: int


#: A current realtime model of the SDK's catalog (shared/model.js), as the SDK defines it.
MODEL = Model("lucy-2.5", 1280, 720, 30)
#: Refused by the server's embedded blocklist (src/livemorph/policy/blocklist.txt).
REFUSED_PROMPT = "cyberpunk neon city, p0rn"
#: Long secrets kept out of the log: LiveKit tokens and join requests, wherever they appear.
SECRET = re.compile(r"""((?:access_token|join_request)=|"token": ")([^&'"\s]{16,})""")
#: Set to a folder to keep each test's browser log there.
LOG_DIR_ENV = "LIVEMORPH_BROWSER_LOG_DIR"


# -- the app's own origin ------------------------------------------------------------------------


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


@dataclass
class AppOrigin:
    """A static site on its own port: the app page, the SDK bundle, a reference image."""

    files: dict[str, tuple[bytes, str]]
    port: int = field(default_factory=free_port)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def page_url(self, server: LiveServer, **extra: str) -> str:
        query = {"baseUrl": server.base_url, "realtimeBaseUrl": server.ws_url, **extra}
        return f"{self.origin}/?{urlencode(query)}"

    def serve(self) -> http.server.ThreadingHTTPServer:
        files = self.files

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                found = files.get("/index.html" if path == "/" else path)
                if found is None:
                    self.send_error(404)
                    return
                body, content_type = found
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)


@pytest.fixture(scope="module")
def app() -> Iterator[AppOrigin]:
    site = AppOrigin(
        {
            "/index.html": ((APP_DIR / "index.html").read_bytes(), "text/html; charset=utf-8"),
            "/app.js": ((APP_DIR / "app.js").read_bytes(), "text/javascript"),
            "/decart-sdk.js": (published_livekit_sdk().encode(), "text/javascript"),
            "/reference.jpg": (jpeg(data.chelsea()), "image/jpeg"),
            "/favicon.ico": (b"", "image/x-icon"),  # keeps a 404 out of the console
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
def livekit_server(
    tmp_path_factory: pytest.TempPathFactory, app: AppOrigin
) -> Iterator[LiveServer]:
    flags = ("--engine", "grade", "--cors-origins", app.origin)
    with serve(tmp_path_factory.mktemp("livekit-sdk"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def full_server(tmp_path_factory: pytest.TempPathFactory, app: AppOrigin) -> Iterator[LiveServer]:
    """A node with room for one session: the next client waits in its queue."""
    flags = ("--engine", "grade", "--cors-origins", app.origin, "--max-sessions", "1")
    with serve(tmp_path_factory.mktemp("livekit-full"), *flags) as live:
        yield live


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    camera = camera_file(tmp_path_factory.mktemp("camera"), MODEL.width, MODEL.height)
    with chromium(camera) as launched:
        yield launched


# -- pages and what they did ---------------------------------------------------------------------


def signal(payload: str | bytes, kind: type[Any]) -> str:
    """A LiveKit signal frame in one line: its message's name and fields, an SDP as its
    media sections (kind, direction, mid) rather than its text."""
    if isinstance(payload, str):
        return f"text frame {payload[:200]!r}"
    message = kind()
    try:
        message.ParseFromString(payload)
    except Exception as error:  # what the server sent is part of the evidence
        return f"<{len(payload)} bytes that are not a {kind.__name__}: {error}>"
    name = message.WhichOneof("message")
    if name is None:
        return f"<{len(payload)} bytes, no message>"
    value = getattr(message, name)
    if name in ("offer", "answer"):
        sections = []
        for section in value.sdp.split("\r\nm=")[1:]:
            lines = section.split("\r\n")
            attributes = {line.split(":", 1)[0] for line in lines}
            direction = next(
                (
                    d
                    for d in ("sendrecv", "sendonly", "recvonly", "inactive")
                    if f"a={d}" in attributes
                ),
                "?",
            )
            mid = next((line[6:] for line in lines if line.startswith("a=mid:")), "?")
            sections.append(f"{lines[0].split()[0]} {direction} mid={mid}")
        return f"{name} {value.type} id={getattr(value, 'id', '')} [{', '.join(sections)}]"
    if name == "join":
        others = [f"{p.identity} ({len(p.tracks)} tracks)" for p in value.other_participants]
        permission = text_format.MessageToString(value.participant.permission, as_one_line=True)
        return (
            f"join room={value.room.name} as {value.participant.identity} "
            f"permission={{{permission}}} "
            f"others={others} subscriber_primary={value.subscriber_primary} "
            f"fast_publish={value.fast_publish} server={value.server_info.version} "
            f"ping={value.ping_interval}/{value.ping_timeout}s"
        )
    if not hasattr(value, "DESCRIPTOR"):  # ping, pong, refresh_token: a scalar
        return f"{name} {str(value)[:40]}"
    text = text_format.MessageToString(value, as_one_line=True)
    return f"{name} {text[:400]}"


@dataclass
class Pages:
    """Opens app pages and keeps what each did: console, errors, requests, socket frames."""

    browser: Any
    app: AppOrigin
    log: list[str] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    stream_frames: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    opened: list[Any] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def note(self, tag: str, line: str) -> None:
        line = SECRET.sub(lambda m: f"{m[1]}<{len(m[2])} chars>", line)
        self.log.append(f"{time.monotonic() - self.started:7.3f} [{tag}] {line}")

    def open(self, tag: str, server: LiveServer, **query: str) -> Any:
        context = self.browser.new_context(permissions=["local-network-access"])
        page = context.new_page()
        self.opened.append(page)
        page.on("console", lambda m: self.note(tag, f"console.{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.note(tag, f"pageerror: {e}"))
        page.on("request", lambda r: self._request(tag, r))
        page.on("requestfailed", lambda r: self.note(tag, f"FAILED {r.url}: {r.failure}"))
        page.on("websocket", lambda ws: self._websocket(tag, ws))
        page.goto(self.app.page_url(server, **query))
        page.wait_for_function("() => window.app !== undefined", timeout=10_000)
        return page

    def _request(self, tag: str, request: Any) -> None:
        self.urls.append(request.url)
        self.note(tag, f"{request.method} {request.url}")

    def _websocket(self, tag: str, ws: Any) -> None:
        url = ws.url
        self.urls.append(url)
        self.note(tag, f"websocket open {url}")
        ws.on("close", lambda _ws: self.note(tag, f"websocket closed {url}"))
        ws.on("socketerror", lambda error: self.note(tag, f"websocket error {url}: {error}"))
        if "/v1/stream" not in url:  # LiveKit's signal socket: protobuf, read back in short
            ws.on("framesent", lambda p: self.note(tag, f"rtc > {signal(p, rtc.SignalRequest)}"))
            ws.on(
                "framereceived", lambda p: self.note(tag, f"rtc < {signal(p, rtc.SignalResponse)}")
            )
            return
        frames = self.stream_frames.setdefault(f"{tag} {url}", [])

        def frame(direction: str, payload: Any) -> None:
            text = payload if isinstance(payload, str) else f"<{len(payload)} bytes>"
            try:
                message = json.loads(text)
            except ValueError:
                message = text
            frames.append((direction, message))
            if isinstance(message, dict) and "image_data" in message:
                image = message["image_data"]
                shown = {**message, "image_data": image and f"<{len(image)} chars>"}
                text = json.dumps(shown)
            self.note(tag, f"stream {direction} {text[:300]}")

        ws.on("framesent", lambda p: frame(">", p))
        ws.on("framereceived", lambda p: frame("<", p))

    def sent_types(self, tag: str) -> list[list[str]]:
        """The types of the messages each of `tag`'s /v1/stream sockets sent, socket by socket."""
        return [
            [m.get("type") for d, m in frames if d == ">" and isinstance(m, dict)]
            for key, frames in self.stream_frames.items()
            if key.startswith(f"{tag} ")
        ]

    def received(self, tag: str, kind: str) -> list[dict[str, Any]]:
        return [
            m
            for key, frames in self.stream_frames.items()
            if key.startswith(f"{tag} ")
            for d, m in frames
            if d == "<" and isinstance(m, dict) and m.get("type") == kind
        ]

    def close(self) -> None:
        for page in self.opened:
            try:
                # The SDK's own account of each connect: its phases and how long each took.
                for event in page.evaluate(
                    "() => app.events.filter((e) => e.name === 'diagnostic').map((e) => e.data)"
                ):
                    self.note("diagnostic", json.dumps(event)[:600])
                page.evaluate("() => { app.rt?.disconnect(); app.viewer?.disconnect(); }")
            except Exception as error:  # a page that crashed says so in the log
                self.note("close", f"could not disconnect: {error}")
            page.context.close()


@pytest.fixture
def pages(browser: Any, app: AppOrigin, request: pytest.FixtureRequest) -> Iterator[Pages]:
    opened = Pages(browser, app)
    try:
        yield opened
    finally:
        opened.close()
        text = "\n".join(opened.log)
        print(f"\n---- browser log of {request.node.name} ----\n{text}")
        folder = os.environ.get(LOG_DIR_ENV)
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / f"{request.node.name}.log").write_text(text + "\n")
    # Telemetry is off and the app names its server: nothing may go to Decart's hosts.
    ours = ("http://127.0.0.1:", "ws://127.0.0.1:")
    foreign = [url for url in opened.urls if not url.startswith(ours)]
    assert not foreign, f"the pages reached other hosts: {foreign}"


# -- measuring -----------------------------------------------------------------------------------


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll `condition()` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or 'condition'}: still {value!r} after {timeout:g}s")
        time.sleep(0.2)


def playing(page: Any) -> bool:
    """The output <video> has a picture and its time moves on."""
    found = read_video(page, "#out")
    if found is None:
        return False
    first = found[2]
    time.sleep(0.3)
    again = read_video(page, "#out")
    return again is not None and again[2] > first


def steady(page: Any, settle: float = 1.5) -> np.ndarray:
    """What the output shows once the newest look has reached the screen."""
    time.sleep(settle)
    return video_frame(page, "#out").astype(np.float32)


def reference_sample(frame: np.ndarray) -> np.ndarray:
    """The camera's photo at the model's size, sampled as the page samples a frame."""
    height, width = frame.shape[:2]
    image = Image.fromarray(photo(MODEL.width, MODEL.height)).resize((width, height))
    return np.asarray(image).astype(np.float32)


def luma_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """How alike two pictures' shapes are, whatever their colours: 1 for the same scene."""
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return float(np.corrcoef((a @ weights).ravel(), (b @ weights).ravel())[0, 1])


def start(page: Any, key: str, **options: Any) -> dict[str, Any]:
    result = page.evaluate(
        "([key, options]) => app.start(key, options)",
        [key, {"model": MODEL.name, **options}],
    )
    assert isinstance(result, dict)
    return result


def started(page: Any, key: str, **options: Any) -> dict[str, Any]:
    """`start` that must succeed, and whose output must be playing at the model's size."""
    result = start(page, key, **options)
    assert result["ok"], f"connect was refused: {result}"
    wait_for(
        lambda: page.evaluate("() => app.size()") == [MODEL.width, MODEL.height],
        30,
        "the output at the model's size",
    )
    wait_for(lambda: playing(page), 15, "the output playing")
    return result


# -- the tests -----------------------------------------------------------------------------------


def test_the_bundle_is_the_published_release(pages: Pages, livekit_server: LiveServer) -> None:
    """The page loads the bundle from its own origin: the SDK's catalog, livekit-client's
    version, and the options an app points it at a server with."""
    page = pages.open("app", livekit_server)
    found = page.evaluate(
        """(name) => ({
          model: app.sdk.models.realtime(name),
          liveKit: app.liveKitVersion,
          realtime: app.sdk.listModels({ kind: "realtime", canonicalOnly: true })
            .map((m) => m.name),
          baseUrl: app.baseUrl,
          realtimeBaseUrl: app.realtimeBaseUrl,
          client: Object.keys(app.client("k").realtime).sort(),
        })""",
        MODEL.name,
    )
    model = found["model"]
    assert (model["name"], model["width"], model["height"], model["fps"]["ideal"]) == (
        MODEL.name,
        MODEL.width,
        MODEL.height,
        MODEL.fps,
    )
    assert model["urlPath"] == "/v1/stream"
    assert MODEL.name in found["realtime"]
    assert found["liveKit"] == "2.20.1"  # what the SDK's ~2.20.1 resolved to in the lock
    assert found["baseUrl"] == livekit_server.base_url
    assert found["realtimeBaseUrl"] == livekit_server.ws_url
    assert found["client"] == ["checkConnectivity", "connect", "subscribe"]
    assert LIVEKIT_VERSION == "0.1.20"


def test_a_bad_key_is_refused_once(pages: Pages, livekit_server: LiveServer) -> None:
    """The server refuses the key on /v1/stream; the SDK rejects connect with the server's
    words and does not retry (its permanent errors include `invalid api key`)."""
    page = pages.open("bad-key", livekit_server)
    result = start(page, "lm_wrong", prompt="anime")
    pages.note("result", json.dumps(result))
    assert result["ok"] is False
    error = result["error"]
    # A server refusal reaches the app as an Error with the server's text, marked as the
    # server's (`source`), without one of the SDK's codes: connect rethrows it as it came.
    assert error["isError"] is True
    assert error["message"] == "invalid api key"
    assert error["source"] == "server"
    sockets = pages.sent_types("bad-key")
    assert len(sockets) == 1, f"a refused key was retried: {sockets}"
    assert sockets[0][:2] == ["livekit_join", "prompt"]
    stream_url = next(url for url in pages.urls if "/v1/stream" in url)
    assert stream_url.startswith(f"{livekit_server.ws_url}/v1/stream?")
    assert "api_key=lm_wrong" in stream_url and f"model={MODEL.name}" in stream_url
    assert livekit_server.wait_sessions(0) == 0


def test_an_expired_client_token_is_refused(pages: Pages, livekit_server: LiveServer) -> None:
    page = pages.open("expired", livekit_server)
    minted = page.evaluate("(key) => app.mint(key, { expiresIn: 1 })", livekit_server.api_key)
    assert minted["ok"], f"client.tokens.create was refused: {minted}"
    token = minted["value"]
    assert set(token) >= {"apiKey", "expiresAt"}
    time.sleep(2.2)
    result = start(page, token["apiKey"], prompt="anime")
    pages.note("result", json.dumps(result))
    assert result["ok"] is False
    error = result["error"]
    assert error["isError"] is True and error["source"] == "server"
    assert "expired" in error["message"] or "invalid api key" in error["message"]
    assert len(pages.sent_types("expired")) == 1, "a refused token was retried"
    assert livekit_server.wait_sessions(0) == 0


def test_a_session_shows_the_camera_transformed_and_follows_prompts(
    pages: Pages, livekit_server: LiveServer
) -> None:
    page = pages.open("publisher", livekit_server)
    result = started(
        page,
        livekit_server.api_key,
        prompt="anime",
        enhance=True,
        imageUrl="/reference.jpg",
    )
    assert result["state"] in ("connected", "generating")
    assert result["sessionId"]
    assert result["camera"]["width"] == MODEL.width and result["camera"]["height"] == MODEL.height
    assert livekit_server.wait_sessions(1) == 1
    sent = pages.sent_types("publisher")
    assert sent[0][:2] == ["livekit_join", "set_image"], sent
    assert pages.received("publisher", "livekit_room_info"), "no livekit_room_info"

    first = steady(page)
    again = steady(page, 1.0)
    still = mean_abs_diff(first, again)
    assert still < 6, f"a still camera's output moves: {still:.1f}"
    reference = reference_sample(first)
    alike = luma_correlation(first, reference)
    pages.note("measure", f"still camera: {still:.2f} apart; like the photo: {alike:.3f}")
    assert alike > 0.6, "the output is not the camera's picture"

    changed = page.evaluate("() => app.settle(app.rt.set({ prompt: 'cyberpunk neon city' }))")
    assert changed["ok"], changed
    neon = steady(page)
    change = mean_abs_diff(neon, first)
    pages.note("measure", f"a new prompt: {change:.2f} apart")
    assert change > max(8.0, 4 * still), f"set({{prompt}}) did not change the picture: {change}"
    assert luma_correlation(neon, reference) > 0.6

    refused = page.evaluate(
        """(prompt) => Promise.all([
          app.settle(app.rt.set({ prompt })),
          app.settle(app.rt.setPrompt(prompt)),
        ])""",
        REFUSED_PROMPT,
    )
    pages.note("refused", json.dumps(refused))
    for outcome in refused:
        assert outcome["ok"] is False
        assert "refused by moderation" in outcome["error"]["message"]
    after = steady(page)
    pages.note("measure", f"after the refusals: {mean_abs_diff(after, neon):.2f} apart")
    assert mean_abs_diff(after, neon) < max(6.0, 2 * still), "a refused prompt changed the look"
    assert page.evaluate("() => app.rt.isConnected()")

    wait_for(lambda: page.evaluate("() => app.count('generationTick')") >= 2, 15, "two ticks")
    ticks = page.evaluate(
        "() => app.events.filter((e) => e.name === 'generationTick').map((e) => e.data.seconds)"
    )
    assert ticks == sorted(ticks) and ticks[-1] >= 1, ticks
    assert page.evaluate("() => app.count('error')") == 0, page.evaluate("() => app.events")

    page.evaluate("() => app.rt.disconnect()")
    assert livekit_server.wait_sessions(0) == 0
    assert page.evaluate("() => app.rt.getConnectionState()") == "disconnected"


def test_a_viewer_watches_with_the_subscribe_token(
    pages: Pages, livekit_server: LiveServer
) -> None:
    publisher = pages.open("publisher", livekit_server)
    result = started(publisher, livekit_server.api_key, prompt="anime", enhance=False)
    token = result["subscribeToken"]
    assert token and publisher.evaluate("() => app.rt.getSubscribeToken()") == token

    viewer = pages.open("viewer", livekit_server)
    watched = viewer.evaluate(
        "([key, token]) => app.watch(key, token)", [livekit_server.api_key, token]
    )
    assert watched["ok"], f"subscribe was refused: {watched}"
    assert watched["state"] == "connected"
    wait_for(
        lambda: viewer.evaluate("() => app.size()") == [MODEL.width, MODEL.height],
        30,
        "the viewer's picture at the model's size",
    )
    wait_for(lambda: playing(viewer), 15, "the viewer's picture playing")
    shown, seen = steady(publisher), steady(viewer, 0.0)
    apart = mean_abs_diff(shown, seen)
    pages.note("measure", f"publisher and viewer: {apart:.2f} apart")
    assert apart < 12, "the viewer does not see the publisher's output"
    assert livekit_server.wait_sessions(1) == 1  # a viewer is not a session

    publisher.evaluate("() => app.rt.disconnect()")
    assert livekit_server.wait_sessions(0) == 0
    wait_for(
        lambda: viewer.evaluate("() => app.viewer.getConnectionState()") == "disconnected",
        20,
        "the viewer disconnected when the session ended",
    )


def test_a_full_node_queues_the_next_client(pages: Pages, full_server: LiveServer) -> None:
    first = pages.open("first", full_server)
    started(first, full_server.api_key, prompt="anime")
    assert full_server.wait_sessions(1) == 1

    second = pages.open("second", full_server)
    second.evaluate(
        "([key, model]) => { window.waiting = app.start(key, { model, prompt: 'anime' }); }",
        [full_server.api_key, MODEL.name],
    )
    wait_for(lambda: second.evaluate("() => app.count('onQueuePosition')"), 20, "a queue position")
    time.sleep(1.0)  # it stays queued while the first session runs
    positions = second.evaluate(
        "() => app.events.filter((e) => e.name === 'onQueuePosition').map((e) => e.data)"
    )
    pages.note("queue", json.dumps(positions))
    assert positions[0]["position"] >= 1 and positions[0]["queueSize"] >= 1, positions
    assert second.evaluate("() => app.rt") is None
    assert full_server.active_sessions() == 1

    first.evaluate("() => app.rt.disconnect()")
    result = second.evaluate("() => waiting")
    assert result["ok"], f"the queued client was not let in: {result}"
    wait_for(
        lambda: second.evaluate("() => app.size()") == [MODEL.width, MODEL.height],
        30,
        "the queued client's output",
    )
    wait_for(lambda: playing(second), 15, "the queued client's output playing")
    assert full_server.wait_sessions(1) == 1
    second.evaluate("() => app.rt.disconnect()")
    assert full_server.wait_sessions(0) == 0
