"""The browser SDK (/sdk/livemorph.js) in a real Chromium: its own logic, then a real server.

The logic tests (ack matching, timeouts, the 10 MB check, reconnects) run against
`FakeSignaling`, which answers out of order, forgets acks or refuses reconnects on cue;
the rest run against a real `livemorph serve` with the cheap `grade` engine.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from livemorph.models import CATALOG
from livemorph.testing import LiveServer, serve

from .browser import chromium
from .fake_signaling import FakeSignaling, Script

pytestmark = pytest.mark.browser

#: Loaded into a blank page of the server's origin: the SDK plus small helpers.
PRELUDE = """
async () => {
  window.sdk = await import("/sdk/livemorph.js");
  window.camera = () =>
    navigator.mediaDevices.getUserMedia({ video: { width: 320, height: 180, frameRate: 15 } });
  window.settle = (promise) =>
    promise.then(
      (value) => ({ ok: true, value: value ?? null }),
      (error) => ({ ok: false, code: error.code ?? null, message: String(error.message) }),
    );
  window.record = (rt) => {
    const log = [];
    rt.on("connectionChange", (state) => log.push(["state", state]));
    rt.on("generationTick", ({ seconds }) => log.push(["tick", seconds]));
    rt.on("generationEnded", ({ reason }) => log.push(["ended", reason]));
    rt.on("error", (error) => log.push(["error", error.code, error.message]));
    return log;
  };
  window.publish = async (baseUrl, options = {}) => {
    const client = sdk.createClient({ apiKey: "a-test-key", baseUrl });
    window.rt = await client.realtime.connect(await camera(), {
      model: sdk.models.realtime.mirage(),
      onRemoteStream: () => {},
      retry: { baseDelay: 50 },
      ...options,
    });
    window.log = record(window.rt);
    return rt.getConnectionState();
  };
}
"""


def png_base64(color: tuple[int, int, int] = (200, 40, 40)) -> str:
    out = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def until(page: Any, expression: str, timeout: float = 15.0) -> Any:
    """Poll a page expression until it is truthy; its value."""
    handle = page.wait_for_function(expression, timeout=timeout * 1000)
    return handle.json_value()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def grade_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("sdk-server"), "--engine", "grade") as live:
        yield live


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSignaling]:
    with FakeSignaling() as server:
        yield server


def open_page(browser: Any, origin: str, *, clock: bool = False) -> Any:
    """A blank page at `origin` (a secure context, so the camera opens) with the SDK loaded.

    It may reach servers on other local ports: Chromium asks a person for that (Local
    Network Access); here the permission is granted up front.
    """
    page = browser.new_context(permissions=["local-network-access"]).new_page()
    page.route(
        f"{origin}/blank",
        lambda route: route.fulfill(
            body="<!doctype html><title>sdk</title>", content_type="text/html"
        ),
    )
    if clock:
        page.clock.install()
    page.goto(f"{origin}/blank")
    page.evaluate(PRELUDE)
    return page


@pytest.fixture
def page(browser: Any, grade_server: LiveServer, fake: FakeSignaling) -> Iterator[Any]:
    fake.reset()
    page = open_page(browser, grade_server.base_url)
    yield page
    page.evaluate("() => window.rt && window.rt.disconnect()")
    page.context.close()


# -- against the fake server: the SDK's own logic -----------------------------------------------


def test_prompt_acks_are_matched_by_text_in_any_order(page: Any, fake: FakeSignaling) -> None:
    fake.script = Script(prompts="hold")
    assert page.evaluate("(url) => publish(url)", fake.base_url) in ("connected", "generating")
    page.evaluate(
        """() => {
          window.outcomes = [];
          for (const text of ["first", "second", "third"]) {
            settle(rt.setPrompt(text, { enhance: false })).then((r) => outcomes.push([text, r]));
          }
        }"""
    )
    held = fake.connections[-1]
    deadline = time.monotonic() + 10
    while len(held.held) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m["prompt"] for m in held.held] == ["first", "second", "third"]
    assert all(m["enhance_prompt"] is False for m in held.held)

    # An ack for a prompt nobody sent resolves nothing; the others land by their text.
    fake.release(
        {"type": "prompt_ack", "prompt": "unrelated", "success": True},
        {"type": "prompt_ack", "prompt": "third", "success": True},
    )
    assert until(page, "() => outcomes.length === 1 && outcomes") == [
        ["third", {"ok": True, "value": None}]
    ]
    fake.release(
        {"type": "prompt_ack", "prompt": "first", "success": False, "error": "refused by policy"},
        {"type": "prompt_ack", "prompt": "second", "success": True},
    )
    outcomes = dict(until(page, "() => outcomes.length === 3 && outcomes"))
    assert outcomes["first"] == {
        "ok": False,
        "code": "INVALID_INPUT",
        "message": "refused by policy",
    }
    assert outcomes["second"] == {"ok": True, "value": None}


def test_a_refused_prompt_throws_and_is_not_restored(page: Any, fake: FakeSignaling) -> None:
    fake.script = Script(refuse_prompts=("forbidden look",))
    page.evaluate(
        "(url) => publish(url, { initialState: { prompt: { text: 'kept look' } } })", fake.base_url
    )
    refused = page.evaluate("() => settle(rt.set({ prompt: 'forbidden look' }))")
    assert refused == {
        "ok": False,
        "code": "INVALID_INPUT",
        "message": "prompt refused: forbidden look",
    }
    fake.script = Script()
    fake.drop()
    until(
        page,
        "() => log.some(([k, s]) => k === 'state' && s === 'reconnecting') && rt.isConnected()",
    )
    restored = [m for m in fake.connections[-1].messages if m["type"] == "prompt"]
    assert [m["prompt"] for m in restored] == ["kept look"]


def test_prompt_ack_times_out_after_15_seconds(
    browser: Any, fake: FakeSignaling, grade_server: LiveServer
) -> None:
    fake.reset(Script(prompts="ignore", images="ignore"))
    page = open_page(browser, grade_server.base_url, clock=True)
    try:
        page.evaluate("(url) => publish(url)", fake.base_url)
        page.evaluate(
            """() => {
              window.pending = null;
              settle(rt.setPrompt("never acked")).then((r) => (pending = r));
            }"""
        )
        page.clock.fast_forward("00:14")
        assert page.evaluate("() => pending") is None
        page.clock.fast_forward("00:02")
        result = until(page, "() => pending")
        assert result["code"] == "TIMEOUT"
        assert "15s" in result["message"]

        # set_image waits 30 s by default, or as long as its `timeout` option says.
        page.evaluate(
            """(image) => {
              window.slow = null;
              window.quick = null;
              settle(rt.setImage(image)).then((r) => (slow = r));
              settle(rt.setImage(image, { timeout: 2000 })).then((r) => (quick = r));
            }""",
            png_base64(),
        )
        page.clock.fast_forward("00:03")
        assert until(page, "() => quick")["code"] == "TIMEOUT"
        assert page.evaluate("() => slow") is None
        page.clock.fast_forward("00:28")
        assert until(page, "() => slow")["code"] == "TIMEOUT"
        assert page.evaluate("() => rt.isConnected()") is True  # a timeout ends nothing
    finally:
        page.evaluate("() => window.rt && window.rt.disconnect()")
        page.context.close()


def test_images_over_10_mb_are_refused_before_sending(page: Any, fake: FakeSignaling) -> None:
    page.evaluate("(url) => publish(url)", fake.base_url)
    results = page.evaluate(
        """async () => {
          const limit = sdk.MAX_IMAGE_BYTES;
          const over = new Uint8Array(limit + 1);
          const b64 = btoa("x".repeat(3 * 1024)).repeat(Math.ceil((limit + 3) / 3072) + 1);
          return {
            limit,
            blob: await settle(rt.setImage(new Blob([over], { type: "image/png" }))),
            file: await settle(rt.set({ image: new File([over], "big.png"), prompt: "x" })),
            bytes: await settle(rt.setImage(over)),
            base64: await settle(rt.setImage(b64)),
            dataUrl: await settle(rt.setImage("data:image/png;base64," + b64)),
            empty: await settle(rt.setImage(new Blob([]))),
            notBase64: await settle(rt.setImage("this is no image!")),
            exactly: await settle(rt.setImage(new Blob([new Uint8Array(limit)]))),
          };
        }"""
    )
    assert results.pop("limit") == 10 * 1024 * 1024
    assert results.pop("exactly") == {"ok": True, "value": None}
    for name, result in results.items():
        assert result["ok"] is False, name
        assert result["code"] == "INVALID_INPUT", name
    for name in ("blob", "file", "bytes", "base64", "dataUrl"):
        assert "10 MB" in results[name]["message"], name
    sent = [m for m in fake.connections[-1].messages if m["type"] == "set_image"]
    assert len(sent) == 1  # only the image of exactly 10 MB went out
    assert len(base64.b64decode(sent[0]["image_data"])) == 10 * 1024 * 1024

    # An oversized initial image fails connect() before any socket opens.
    before = len(fake.connections)
    refused = page.evaluate(
        """(url) => settle(publish(url, {
          initialState: { image: new Blob([new Uint8Array(sdk.MAX_IMAGE_BYTES + 1)]) },
        }))""",
        fake.base_url,
    )
    assert refused["code"] == "INVALID_INPUT"
    assert len(fake.connections) == before


def test_a_drop_reconnects_with_the_prompt_and_image_then_stops_on_a_permanent_error(
    page: Any, fake: FakeSignaling
) -> None:
    image = png_base64()
    initial = {"initialState": {"prompt": {"text": "first look", "enhance": False}}}
    page.evaluate("([url, options]) => publish(url, options)", [fake.base_url, initial])
    first = fake.connections[-1]
    assert first.types()[0] == "prompt"  # the initial state goes before the offer
    assert first.types().index("offer") == 1
    assert page.evaluate("(image) => settle(rt.setImage(image, { prompt: 'second look' }))", image)[
        "ok"
    ]

    fake.drop(1011)
    until(
        page,
        "() => log.some(([k, s]) => k === 'state' && s === 'reconnecting') && rt.isConnected()",
    )
    second = fake.connections[-1]
    assert second is not first
    restore = second.messages[0]
    assert restore["type"] == "set_image"
    assert restore["image_data"] == image
    assert restore["prompt"] == "second look"
    assert restore["enhance_prompt"] is True
    assert second.types().index("offer") == 1
    assert page.evaluate("() => rt.sessionId") == f"fake-{len(fake.connections)}"

    # Now the server says the key is no good: one attempt, then no more.
    fake.script = Script(refuse="invalid api key")
    fake.drop(1011)
    until(
        page, "() => rt.getConnectionState() === 'disconnected' && log.some(([k]) => k === 'error')"
    )
    attempts = len(fake.connections)
    time.sleep(0.5)  # ten times the test's base retry delay
    assert len(fake.connections) == attempts == 3
    log = page.evaluate("() => log")
    errors = [entry for entry in log if entry[0] == "error"]
    assert errors == [["error", "INVALID_API_KEY", "invalid api key"]]
    states = [entry[1] for entry in log if entry[0] == "state"]
    assert states[-2:] == ["reconnecting", "disconnected"]
    assert page.evaluate("() => settle(rt.setPrompt('too late'))")["code"] == "WEB_RTC_ERROR"


def test_transient_refusals_are_retried_then_reported(page: Any, fake: FakeSignaling) -> None:
    assert page.evaluate("() => sdk.retryDelays()") == [1000, 2000, 4000, 8000]
    fake.script = Script(refuse="Server at capacity, try again shortly", refuse_code=1013)
    result = page.evaluate(
        "(url) => settle(publish(url, { retry: { attempts: 3, baseDelay: 20 } }))", fake.base_url
    )
    assert result["ok"] is False
    assert result["code"] == "WEB_RTC_ERROR"
    assert "capacity" in result["message"]
    assert len(fake.connections) == 3


@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        ("invalid api key", "INVALID_API_KEY"),
        ("permission denied: this token may not use model mirage", "WEB_RTC_ERROR"),
        ("model not found: 'nope'", "MODEL_NOT_FOUND"),
    ],
)
def test_permanent_refusals_at_connect_are_not_retried(
    page: Any, fake: FakeSignaling, refusal: str, code: str
) -> None:
    fake.script = Script(refuse=refusal)
    result = page.evaluate("(url) => settle(publish(url))", fake.base_url)
    assert result == {"ok": False, "code": code, "message": refusal}
    # connect() retries before it settles, so any retry would be a connection by now
    assert len(fake.connections) == 1


def test_a_session_ended_for_credits_is_not_reconnected(page: Any, fake: FakeSignaling) -> None:
    page.evaluate("(url) => publish(url)", fake.base_url)
    # A server shutdown is worth a reconnect...
    fake.release({"type": "generation_ended", "seconds": 2, "reason": "server_shutdown"})
    fake.drop(1001)
    until(
        page,
        "() => log.some(([k, s]) => k === 'state' && s === 'reconnecting') && rt.isConnected()",
    )
    assert len(fake.connections) == 2
    # ...running out of credits is not.
    fake.release(
        {"type": "generation_ended", "seconds": 3, "reason": "insufficient_credits"},
        {"type": "error", "error": "insufficient credits"},
    )
    fake.drop(1008)
    until(page, "() => rt.getConnectionState() === 'disconnected'")
    # a reconnect would have said so at once, before its first delay
    states = [entry[1] for entry in page.evaluate("() => log") if entry[0] == "state"]
    assert states.count("reconnecting") == 1 and states[-1] == "disconnected", states
    assert len(fake.connections) == 2
    log = page.evaluate("() => log")
    assert ["ended", "insufficient_credits"] in log
    assert ["error", "WEB_RTC_ERROR", "insufficient credits"] in log


def test_events_and_the_offer(page: Any, fake: FakeSignaling) -> None:
    page.evaluate(
        """(url) => publish(url, {
          customizeOffer: async (offer) => {
            offer.sdp = offer.sdp.replace(/\\r\\n$/, "\\r\\na=x-customized:1\\r\\n");
          },
        })""",
        fake.base_url,
    )
    log = until(page, "() => log.filter(([k]) => k === 'tick').length === 2 && log")
    states = [entry[1] for entry in log if entry[0] == "state"]
    # Events of the connect itself are delivered once connect() has returned. The server may
    # say `generation_started` before this end of the peer connection calls itself connected.
    assert states in (["connecting", "connected", "generating"], ["connecting", "generating"])
    assert [entry[1] for entry in log if entry[0] == "tick"] == [1, 2]
    offer = next(m for m in fake.connections[-1].messages if m["type"] == "offer")
    assert "a=x-customized:1" in offer["sdp"]
    video = offer["sdp"].split("m=video ")[1]
    payload = video.split(" ")[2]  # the first payload type offered: the preferred codec
    assert f"a=rtpmap:{payload} VP8/90000" in video
    assert f"a=fmtp:{payload} x-google-min-bitrate=300;x-google-start-bitrate=600" in video
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # trickle ends with null once gathering is done
        candidates = [m for m in fake.connections[-1].messages if m["type"] == "ice-candidate"]
        if candidates and candidates[-1]["candidate"] is None:
            break
        time.sleep(0.05)
    assert len(candidates) >= 2
    assert candidates[-1]["candidate"] is None
    assert all(c["candidate"]["candidate"].startswith("candidate:") for c in candidates[:-1])
    assert (
        page.evaluate("() => rt.subscribeToken")
        == base64.b64encode(
            f'{{"sid":"fake-1","ip":"127.0.0.1","port":{fake.port},"room_name":"fake-1"}}'.encode()
        ).decode()
    )

    page.evaluate("() => rt.disconnect()")
    assert page.evaluate("() => [rt.isConnected(), rt.getConnectionState()]") == [
        False,
        "disconnected",
    ]


def test_bad_arguments_are_refused_with_codes(page: Any, fake: FakeSignaling) -> None:
    results = page.evaluate(
        """async (url) => {
          const attempt = async (make) => {
            try {
              await make();
              return "no error";
            } catch (e) {
              return e.code;
            }
          };
          const connect = (stream, options) => client.realtime.connect(stream, options);
          const client = sdk.createClient({ apiKey: "k", baseUrl: url });
          return {
            noKey: await attempt(() => sdk.createClient({})),
            blankKey: await attempt(() => sdk.createDecartClient({ apiKey: "  " })),
            badUrl: await attempt(() => sdk.createClient({ apiKey: "k", baseUrl: "ftp://x" })),
            unknownModel: await attempt(() => sdk.models.realtime("nope")),
            noModel: await attempt(() => client.realtime.connect(null, {})),
            noVideo: await attempt(() => connect(new MediaStream(), { model: "mirage" })),
            notAStream: await attempt(() => client.realtime.connect({}, { model: "mirage" })),
            emptyPrompt: await attempt(async () =>
              connect(await camera(), { model: "mirage", initialState: { prompt: { text: "" } } })),
            badToken: await attempt(() => client.realtime.subscribe({ token: "garbage" })),
            instance: (() => {
              try {
                sdk.models.realtime("nope");
              } catch (e) {
                return e instanceof sdk.DecartSDKError && e instanceof Error;
              }
            })(),
          };
        }""",
        fake.base_url,
    )
    assert results == {
        "noKey": "INVALID_API_KEY",
        "blankKey": "INVALID_API_KEY",
        "badUrl": "INVALID_BASE_URL",
        "unknownModel": "MODEL_NOT_FOUND",
        "noModel": "INVALID_OPTIONS",
        "noVideo": "INVALID_INPUT",
        "notAStream": "INVALID_INPUT",
        "emptyPrompt": "INVALID_INPUT",
        "badToken": "INVALID_INPUT",
        "instance": True,
    }
    assert fake.connections == []  # none of them reached the network

    page.evaluate("(url) => publish(url)", fake.base_url)
    misuse = page.evaluate(
        """async () => ({
          set: (await settle(rt.set({}))).code,
          prompt: (await settle(rt.setPrompt("   "))).code,
          event: (() => { try { rt.on("nope", () => {}); } catch (e) { return e.code; } })(),
        })"""
    )
    assert misuse == {"set": "INVALID_INPUT", "prompt": "INVALID_INPUT", "event": "INVALID_INPUT"}


# -- against a real livemorph server ------------------------------------------------------------


def test_the_seeds_browser_snippet_runs_against_livemorph(
    browser: Any, grade_server: LiveServer
) -> None:
    """The seeds' code, unchanged but for the import line (served by the server itself)."""
    backend = open_page(browser, grade_server.base_url)
    viewer_page = open_page(browser, grade_server.base_url)
    try:
        token = backend.evaluate(
            """async (key) => {
              const { createDecartClient } = sdk;
              const client = createDecartClient({ apiKey: key });
              const token = await client.tokens.create();
              return token.apiKey;
            }""",
            grade_server.api_key,
        )
        assert token.startswith("ek_")
        state = backend.evaluate(
            """async (tokenFromBackend) => {
              const { createDecartClient, models } = sdk;
              const model = models.realtime("lucy_2_rt");
              const stream = await navigator.mediaDevices.getUserMedia({
                video: { frameRate: model.fps, width: model.width, height: model.height },
              });
              const videoElement = document.createElement("video");
              videoElement.muted = true;
              document.body.append(videoElement);
              const client = createDecartClient({ apiKey: tokenFromBackend });
              const rt = await client.realtime.connect(stream, {
                model,
                onRemoteStream: (remoteStream) => {
                  videoElement.srcObject = remoteStream;
                  videoElement.play();
                },
              });
              await rt.set({ prompt: "Anime style", enhance: true });
              window.rt = rt;
              window.ticks = [];
              rt.on("generationTick", ({ seconds }) => ticks.push(seconds));
              return rt.getConnectionState();
            }""",
            token,
        )
        assert state in ("connected", "generating")
        assert grade_server.wait_sessions(1) == 1
        until(backend, "() => ticks.length >= 2 && document.querySelector('video').videoWidth")
        size = backend.evaluate(
            "() => [document.querySelector('video').videoWidth, "
            "document.querySelector('video').videoHeight]"
        )
        assert size == [1280, 720]  # lucy_2_rt's size, whatever the camera gave
        ticks = backend.evaluate("() => ticks")
        assert ticks == sorted(ticks) and ticks[-1] >= 2

        subscribe_token = backend.evaluate("() => rt.subscribeToken")
        viewer_page.evaluate(
            """async ([apiKey, token]) => {
              const video = document.createElement("video");
              video.muted = true;
              document.body.append(video);
              const client = sdk.createDecartClient({ apiKey });
              window.viewer = await client.realtime.subscribe({
                token,
                onRemoteStream: (stream) => { video.srcObject = stream; video.play(); },
              });
            }""",
            [token, subscribe_token],
        )
        until(viewer_page, "() => document.querySelector('video').videoWidth === 1280")
        backend.evaluate("() => rt.disconnect()")
        assert grade_server.wait_sessions(0) == 0
        # The viewer ends with the session: its reconnect hears `invalid session` and stops.
        until(viewer_page, "() => viewer.getConnectionState() === 'disconnected'")
    finally:
        backend.context.close()
        viewer_page.context.close()


def test_real_server_refusals_carry_codes(page: Any, grade_server: LiveServer) -> None:
    results = page.evaluate(
        """async ([key, image]) => {
          const code = async (promise) => {
            const r = await settle(promise);
            return r.ok ? "ok" : [r.code, r.message];
          };
          const stream = await camera();
          const good = sdk.createClient({ apiKey: key });
          const minted = await good.tokens.create({ expiresIn: 120, allowedModels: ["mirage"] });
          const token = minted.apiKey;
          const asToken = sdk.createClient({ apiKey: token });
          const rt = await asToken.realtime.connect(stream, { model: "mirage" });
          const bad = sdk.createClient({ apiKey: "lm_wrong" });
          const custom = { name: "nope", fps: 25, width: 64, height: 64 };
          const gone = sdk.encodeSubscribeToken("gone", location.hostname, Number(location.port));
          const out = {
            badKey: await code(bad.realtime.connect(stream, { model: "mirage" })),
            notAllowed: await code(asToken.realtime.connect(stream, { model: "mirage_v2" })),
            unknown: await code(good.realtime.connect(stream, { model: custom })),
            noPortrait: await code(good.realtime.connect(stream, { model: "live_avatar" })),
            noSession: await code(good.realtime.subscribe({ token: gone })),
            mintWithToken: await code(asToken.tokens.create()),
            mintWithBadKey: await code(bad.tokens.create()),
            realImage: await code(rt.setImage(image, { prompt: "warm" })),
            garbageImage: await code(rt.setImage(new Blob([new Uint8Array(2048).fill(7)]))),
            cleared: await code(rt.setImage(null)),
          };
          rt.disconnect();
          return out;
        }""",
        [grade_server.api_key, png_base64()],
    )
    assert results["badKey"] == ["INVALID_API_KEY", "invalid api key"]
    assert results["notAllowed"][0] == "WEB_RTC_ERROR"
    assert "permission denied" in results["notAllowed"][1]
    assert results["unknown"][0] == "MODEL_NOT_FOUND"
    assert results["noPortrait"][0] == "INVALID_INPUT"  # refused before any socket opens
    assert "live_avatar needs a portrait" in results["noPortrait"][1]
    assert results["noSession"][0] == "WEB_RTC_ERROR"
    assert "invalid session" in results["noSession"][1]
    assert results["mintWithToken"][0] == "TOKEN_CREATE_ERROR"
    assert "403" in results["mintWithToken"][1]
    assert results["mintWithBadKey"][0] == "INVALID_API_KEY"
    assert results["realImage"] == "ok"
    assert results["garbageImage"][0] == "INVALID_INPUT"
    assert "image" in results["garbageImage"][1]
    assert results["cleared"] == "ok"
    assert grade_server.wait_sessions(0) == 0


def test_the_sdk_catalog_matches_the_server(page: Any, grade_server: LiveServer) -> None:
    served = page.evaluate("() => sdk.createClient({ apiKey: 'k' }).listModels()")
    for model in served:
        js = page.evaluate("(name) => sdk.models.realtime(name)", model["name"])
        assert {k: js[k] for k in ("name", "fps", "width", "height")} == {
            k: model[k] for k in ("name", "fps", "width", "height")
        }
        assert js["urlPath"] == CATALOG[model["name"]].url_path
        assert js.get("aliasOf") == model["alias_of"]
    assert sorted(m["name"] for m in served) == sorted(CATALOG)
    factories = page.evaluate(
        """() => ["mirage", "mirageV2", "lucyV2V720pRt", "lucy2Rt", "liveAvatar"]
          .map((factory) => sdk.models.realtime[factory]().name)"""
    )
    # one factory per first-generation model; the `lucy-*` names are not identifiers
    assert sorted(factories) == sorted(name for name in CATALOG if "-" not in name)


def test_types_declare_what_the_module_exports(page: Any) -> None:
    exported = set(page.evaluate("() => Object.keys(sdk)"))
    declarations = (Path(__file__).parents[1] / "src/livemorph/web/sdk/livemorph.d.ts").read_text()
    missing = [name for name in exported if name not in declarations]
    assert not missing, f"livemorph.d.ts does not declare {missing}"
