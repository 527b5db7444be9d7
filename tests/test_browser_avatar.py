"""live_avatar in a real Chromium: our browser SDK, the published `@decartai/sdk@0.0.46`, the demo.

The server runs the `meter` engine, which lights the portrait by the loudness of what it
hears (a quarter of its brightness in silence, all of it at full voice), so the frames tell
whether and when the page's audio reached the engine. Each page samples what its <video>
shows and what its peer connection receives (the inbound audio's `audioLevel`, from
getStats) ten times a second; an init script wraps `RTCPeerConnection` to reach the SDK's
connection, and counts every connection of an audio node to the speakers (none may happen:
the clip goes into the session only, and the person hears it as it comes back).

What is checked, for both SDKs: connect(null, {avatar}) sends the portrait; playAudio of a
1.5 s WAV resolves about 1.5 s later, the frames brighten while it plays and the voice comes
back on the audio track; a second playAudio stops the first at once (its promise resolves)
and what the engine then hears is the second. For ours also: the order of messages and the
offer's transceivers, a reconnect restoring the portrait and the prompt, the portrait's
forms, a microphone stream, and the clear refusals.
"""

from __future__ import annotations

import base64
import io
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from livemorph.testing import LiveServer, serve

from .browser import chromium, video_frame
from .decart_js import published_sdk
from .fake_signaling import FakeSignaling
from .media import mean_abs_diff, photo, tone_wav

pytestmark = pytest.mark.browser

PORTRAITS = Path(__file__).parents[1] / "src" / "livemorph" / "web" / "app" / "portraits"
PORTRAIT = (PORTRAITS / "astronaut.jpg").read_bytes()
BEHAVIOUR = "Smile warmly and nod occasionally"
#: Set to a path to keep a screenshot of the demo's avatar mode.
SCREENSHOT_ENV = "LIVEMORPH_AVATAR_SCREENSHOT"

#: Before any page script: reach the SDK's peer connections, count audio sent to speakers.
INIT_SCRIPT = """
(() => {
  window.pcs = [];
  const Native = window.RTCPeerConnection;
  function Wrapped(...args) {
    const pc = new Native(...args);
    window.pcs.push(pc);
    return pc;
  }
  Wrapped.prototype = Native.prototype;
  Object.setPrototypeOf(Wrapped, Native);
  window.RTCPeerConnection = Wrapped;
  window.toSpeakers = 0;
  const connect = AudioNode.prototype.connect;
  AudioNode.prototype.connect = function (target, ...rest) {
    if (target instanceof AudioDestinationNode) window.toSpeakers += 1;
    return connect.call(this, target, ...rest);
  };
})();
"""

#: What every test page has: a <video> for the avatar and helpers to sample it.
PAGE = """<!doctype html><title>avatar</title><video id="out" autoplay playsinline></video>"""
PRELUDE = """
() => {
  window.bytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  window.blob = (b64, type) => new Blob([bytes(b64)], { type });
  window.show = (stream) => { document.querySelector("#out").srcObject = stream; };
  window.settle = (promise) =>
    promise.then(
      (value) => ({ ok: true, value: value ?? null }),
      (error) => ({ ok: false, code: error.code ?? null, message: String(error.message) }),
    );
  window.samples = [];
  const canvas = document.createElement("canvas");
  canvas.width = 32;
  canvas.height = 18;
  const context = canvas.getContext("2d", { willReadFrequently: true });
  const sample = async () => {
    const video = document.querySelector("#out");
    let light = null;
    if (video.videoWidth && video.readyState >= 2) {
      context.drawImage(video, 0, 0, 32, 18);
      const rgba = context.getImageData(0, 0, 32, 18).data;
      let sum = 0;
      for (let i = 0; i < rgba.length; i += 4) sum += rgba[i] + rgba[i + 1] + rgba[i + 2];
      light = sum / (rgba.length / 4) / 3;
    }
    let level = null;
    const pc = pcs[pcs.length - 1];
    if (pc && pc.connectionState !== "closed") {
      (await pc.getStats()).forEach((report) => {
        if (report.type === "inbound-rtp" && report.kind === "audio") {
          level = report.audioLevel ?? null;
        }
      });
    }
    samples.push({ t: performance.now(), light, level });
  };
  setInterval(sample, 100);
}
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


#: The portrait's mean brightness, as the meter shows it at full voice.
FULL_LIGHT = float(np.asarray(Image.open(io.BytesIO(PORTRAIT)).convert("RGB")).mean())


@pytest.fixture(scope="module")
def meter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("avatar-browser"), "--engine", "meter") as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeSignaling]:
    with FakeSignaling() as server:
        yield server


def open_page(browser: Any, origin: str, sdk_module: str | None = None) -> Any:
    """A page at `origin` with the helpers above, `/portrait.jpg` served as the seeds fetch
    it, and `sdk_module` (the published SDK's text) at `/decart-sdk.js` when given."""
    page = browser.new_context(permissions=["local-network-access"]).new_page()
    page.add_init_script(INIT_SCRIPT)
    page.route(f"{origin}/blank", lambda r: r.fulfill(body=PAGE, content_type="text/html"))
    page.route(
        f"{origin}/portrait.jpg",
        lambda r: r.fulfill(body=PORTRAIT, content_type="image/jpeg"),
    )
    if sdk_module is not None:
        page.route(
            f"{origin}/decart-sdk.js",
            lambda r: r.fulfill(body=sdk_module, content_type="text/javascript"),
        )
    page.goto(f"{origin}/blank")
    page.evaluate(PRELUDE)
    return page


@pytest.fixture
def page(browser: Any, meter_server: LiveServer) -> Iterator[Any]:
    page = open_page(browser, meter_server.base_url)
    yield page
    page.evaluate("() => window.rt && window.rt.disconnect()")
    page.context.close()
    assert meter_server.wait_sessions(0) == 0


def sampled(page: Any, start: float, end: float, what: str) -> list[float]:
    """The sampled `what` ("light" or "level") between two page times (ms)."""
    return [
        s[what]
        for s in page.evaluate("() => samples")
        if start <= s["t"] <= end and s[what] is not None
    ]


def wait_for_picture(page: Any) -> None:
    page.wait_for_function(
        "() => samples.filter((s) => s.light !== null).length >= 5", timeout=15_000
    )


def check_clips(page: Any) -> None:
    """playAudio's timing, the frames and the returned voice, and an interrupted clip: the
    same checks for any SDK whose session is `window.rt`."""
    wait_for_picture(page)
    time.sleep(1.0)
    played = page.evaluate(
        """async (wav) => {
          const clip = blob(wav, "audio/wav");
          const start = performance.now();
          await rt.playAudio(clip);
          return [start, performance.now()];
        }""",
        b64(tone_wav(1.5, 0.5)),
    )
    start, end = played
    assert 1350 <= end - start <= 2300, f"playAudio resolved after {end - start:.0f} ms"
    time.sleep(1.2)
    quiet = statistics.median(sampled(page, start - 900, start, "light"))
    loud = statistics.median(sampled(page, start + 500, start + 1300, "light"))
    after = statistics.median(sampled(page, end + 600, end + 1100, "light"))
    assert quiet < 0.4 * FULL_LIGHT, (quiet, FULL_LIGHT)
    assert loud > 2.5 * quiet and loud > 0.8 * FULL_LIGHT, (quiet, loud)
    assert after < 0.5 * loud, (loud, after)
    voice = statistics.median(sampled(page, start + 500, start + 1300, "level"))
    silence = max(sampled(page, start - 900, start, "level") or [0.0])
    assert voice > 0.3, f"the voice did not come back: audioLevel {voice}"
    assert silence < 0.02, f"silence came back loud: audioLevel {silence}"

    # A second clip stops the first at once: its promise resolves, the engine hears the
    # second (a quieter tone: the portrait half lit), then silence, long before the first
    # clip's 4 s were over.
    timing = page.evaluate(
        """async ([long, short]) => {
          const t0 = performance.now();
          const first = rt.playAudio(blob(long, "audio/wav")).then(() => performance.now());
          await new Promise((resolve) => setTimeout(resolve, 1000));
          const t1 = performance.now();
          const second = rt.playAudio(blob(short, "audio/wav")).then(() => performance.now());
          return { t0, t1, first: await first, second: await second };
        }""",
        [b64(tone_wav(4.0, 0.5)), b64(tone_wav(1.2, 0.07))],
    )
    t0, t1 = timing["t0"], timing["t1"]
    assert timing["first"] - t1 < 400, "the first clip's promise resolves when it is stopped"
    assert 1050 <= timing["second"] - t1 <= 2000, timing
    time.sleep(max(0.0, (t0 + 3600 - page.evaluate("() => performance.now()")) / 1000))
    first = statistics.median(sampled(page, t0 + 400, t1, "light"))
    second = statistics.median(sampled(page, t1 + 500, t1 + 1100, "light"))
    silent = statistics.median(sampled(page, timing["second"] + 600, t0 + 3600, "light"))
    assert first > 0.8 * FULL_LIGHT, first
    assert 1.3 * quiet < second < 0.8 * first, (quiet, second, first)
    assert silent < 0.5 * second + 0.5 * quiet, (silent, second, quiet)
    assert page.evaluate("() => toSpeakers") == 0, "audio was connected to the speakers"


# -- our SDK against the meter engine -----------------------------------------------------------


def test_our_sdk_plays_clips_through_the_avatar(page: Any, meter_server: LiveServer) -> None:
    state = page.evaluate(
        """async ([key, prompt]) => {
          const sdk = await import("/sdk/livemorph.js");
          const avatarImage = await fetch("/portrait.jpg").then((r) => r.blob());
          const client = sdk.createDecartClient({ apiKey: key });
          window.rt = await client.realtime.connect(null, {
            model: sdk.models.realtime("live_avatar"),
            avatar: { avatarImage },
            onRemoteStream: show,
            initialState: { prompt: { text: prompt, enhance: true } },
          });
          const [video, audio] = pcs[0].getTransceivers();
          return {
            state: rt.getConnectionState(),
            playAudio: typeof rt.playAudio,
            transceivers: [
              [video.receiver.track.kind, video.direction],
              [audio.receiver.track.kind, audio.direction],
            ],
          };
        }""",
        [meter_server.api_key, BEHAVIOUR],
    )
    assert state["state"] in ("connected", "generating")
    assert state["playAudio"] == "function"
    assert state["transceivers"] == [["video", "recvonly"], ["audio", "sendrecv"]]
    page.wait_for_function("() => document.querySelector('#out').srcObject.getAudioTracks().length")
    check_clips(page)


def test_our_sdk_sends_a_microphone(page: Any, meter_server: LiveServer) -> None:
    result = page.evaluate(
        """async (key) => {
          const sdk = await import("/sdk/livemorph.js");
          // A stand-in microphone: a loud tone, and a camera track the SDK must leave out.
          const context = new AudioContext();
          const tone = context.createOscillator();
          window.micGain = context.createGain();
          micGain.gain.value = 0.5;
          tone.connect(micGain);
          const destination = context.createMediaStreamDestination();
          micGain.connect(destination);
          tone.start();
          const canvas = document.createElement("canvas");
          canvas.getContext("2d").fillRect(0, 0, 10, 10);
          const mic = new MediaStream([
            ...destination.stream.getAudioTracks(),
            ...canvas.captureStream(5).getVideoTracks(),
          ]);
          const client = sdk.createDecartClient({ apiKey: key });
          window.rt = await client.realtime.connect(mic, {
            model: sdk.models.realtime.liveAvatar(),
            avatar: { avatarImage: "/portrait.jpg" },
            onRemoteStream: show,
          });
          return {
            playAudio: "playAudio" in rt,
            sent: pcs[0].getSenders().filter((s) => s.track).map((s) => s.track.kind),
            transceivers: pcs[0].getTransceivers().map((t) => t.direction),
          };
        }""",
        meter_server.api_key,
    )
    assert result == {
        "playAudio": False,
        "sent": ["audio"],
        "transceivers": ["recvonly", "sendrecv"],
    }
    wait_for_picture(page)
    time.sleep(1.0)
    now = page.evaluate("() => performance.now()")
    assert statistics.median(sampled(page, now - 800, now, "light")) > 0.8 * FULL_LIGHT
    assert statistics.median(sampled(page, now - 800, now, "level")) > 0.3
    page.evaluate("() => { micGain.gain.value = 0; }")  # the speaker falls silent
    time.sleep(1.2)
    now = page.evaluate("() => performance.now()")
    assert statistics.median(sampled(page, now - 500, now, "light")) < 0.4 * FULL_LIGHT


def test_our_sdk_refuses_clearly(page: Any, meter_server: LiveServer) -> None:
    results = page.evaluate(
        """async ([key, wav]) => {
          const sdk = await import("/sdk/livemorph.js");
          const client = sdk.createDecartClient({ apiKey: key });
          const model = sdk.models.realtime("live_avatar");
          const canvas = document.createElement("canvas");
          const camera = canvas.captureStream(5);
          const avatar = { avatarImage: "/portrait.jpg" };
          const out = {
            noPortrait: await settle(client.realtime.connect(null, { model })),
            emptyAvatar: await settle(client.realtime.connect(null, { model, avatar: {} })),
            notAnImage: await settle(
              client.realtime.connect(null, { model, avatar: { avatarImage: 42 } })),
            missingPortrait: await settle(
              client.realtime.connect(null, { model, avatar: { avatarImage: "/nope.jpg" } })),
            cameraOnly: await settle(client.realtime.connect(camera, { model, avatar })),
          };
          window.rt = await client.realtime.connect(null, { model, avatar, onRemoteStream: show });
          out.notAudio = await settle(rt.playAudio("a string"));
          out.notDecodable = await settle(rt.playAudio(new Uint8Array(4000).fill(7).buffer));
          out.stillLive = rt.isConnected();
          rt.disconnect();
          out.afterDisconnect = await settle(rt.playAudio(blob(wav, "audio/wav")));
          return out;
        }""",
        [meter_server.api_key, b64(tone_wav(0.2, 0.3))],
    )
    for name in ("noPortrait", "emptyAvatar"):
        assert results[name]["code"] == "INVALID_INPUT", name
        assert "live_avatar needs a portrait" in results[name]["message"], name
    assert results["notAnImage"]["code"] == "INVALID_INPUT"
    assert results["missingPortrait"]["code"] == "INVALID_INPUT"
    assert "HTTP 404" in results["missingPortrait"]["message"]
    assert results["cameraOnly"]["code"] == "INVALID_INPUT"
    assert "audio track" in results["cameraOnly"]["message"]
    assert results["notAudio"]["code"] == "INVALID_INPUT"
    assert results["notDecodable"]["code"] == "INVALID_INPUT"
    assert "cannot decode audio" in results["notDecodable"]["message"]
    assert results["stillLive"] is True  # a refused clip ends nothing
    assert results["afterDisconnect"]["code"] == "WEB_RTC_ERROR"


def test_our_sdk_sends_the_portrait_first_and_restores_it(page: Any, fake: FakeSignaling) -> None:
    """Against the scripted server: what is sent, in which order, and after a drop."""
    fake.reset()
    page.evaluate(
        """async ([url, prompt]) => {
          window.sdk = await import("/sdk/livemorph.js");
          const client = sdk.createClient({ apiKey: "a-test-key", baseUrl: url });
          window.rt = await client.realtime.connect(null, {
            model: "live_avatar",
            avatar: { avatarImage: "/portrait.jpg" },
            onRemoteStream: show,
            initialState: { prompt: { text: prompt, enhance: false } },
            retry: { baseDelay: 50 },
          });
          window.states = [];
          rt.on("connectionChange", (state) => states.push(state));
        }""",
        [fake.base_url, BEHAVIOUR],
    )
    first = fake.connections[-1]
    assert first.types()[:3] == ["set_image", "prompt", "offer"]
    assert first.messages[0] == {"type": "set_image", "image_data": b64(PORTRAIT)}
    assert first.messages[1] == {"type": "prompt", "prompt": BEHAVIOUR, "enhance_prompt": False}
    sdp = first.messages[2]["sdp"]
    media = [section.split("\r\n") for section in sdp.split("m=")[1:]]
    assert [lines[0].split()[0] for lines in media] == ["video", "audio"]
    assert "a=recvonly" in media[0] and "a=sendrecv" in media[1]

    assert page.evaluate("() => settle(rt.setPrompt('Look excited'))")["ok"]
    fake.drop(1011)
    page.wait_for_function(
        "() => states.includes('reconnecting') && rt.isConnected()", timeout=15_000
    )
    second = fake.connections[-1]
    assert second is not first
    assert second.types()[:3] == ["set_image", "prompt", "offer"]
    assert second.messages[0]["image_data"] == b64(PORTRAIT)
    assert second.messages[1]["prompt"] == "Look excited"
    assert page.evaluate("() => typeof rt.playAudio") == "function"  # the same audio track

    # The portrait's other forms: a data: URL, plain base64, bytes, initialState.image.
    page.evaluate(
        """async ([url, portrait]) => {
          rt.disconnect();
          const client = sdk.createClient({ apiKey: "a-test-key", baseUrl: url });
          const forms = [
            { avatar: { avatarImage: `data:image/jpeg;base64,${portrait}` } },
            { avatar: { avatarImage: portrait } },
            { avatar: { avatarImage: bytes(portrait).buffer } },
            { initialState: { image: blob(portrait, "image/jpeg") } },
          ];
          for (const form of forms) {
            const session = await client.realtime.connect(null, { model: "live_avatar", ...form });
            session.disconnect();
          }
        }""",
        [fake.base_url, b64(PORTRAIT)],
    )
    forms = fake.connections[-4:]
    assert [c.messages[0] for c in forms] == [
        {"type": "set_image", "image_data": b64(PORTRAIT)}
    ] * 4
    assert all(c.types()[1] == "offer" for c in forms)  # no prompt: straight to the offer


# -- the published @decartai/sdk@0.0.46 against the meter engine --------------------------------


def test_the_published_sdk_plays_clips_through_the_avatar(
    browser: Any, meter_server: LiveServer
) -> None:
    """The seeds' Avatar Live code, run by the package as published (bundled by esbuild, its
    hosted realtime URL pointed at this server, nothing else changed)."""
    page = open_page(browser, meter_server.base_url, published_sdk(meter_server.ws_url))
    try:
        state = page.evaluate(
            """async ([apiKey, prompt]) => {
              const { createDecartClient, models } = await import("/decart-sdk.js");
              const model = models.realtime("live_avatar");
              const avatarImage = await fetch("/portrait.jpg").then((r) => r.blob());
              const client = createDecartClient({ apiKey });
              window.rt = await client.realtime.connect(null, {
                model,
                avatar: { avatarImage },
                onRemoteStream: (animatedStream) => {
                  document.querySelector("#out").srcObject = animatedStream;
                },
                initialState: { prompt: { text: prompt, enhance: true } },
              });
              return [rt.getConnectionState(), typeof rt.playAudio, rt.sessionId];
            }""",
            [meter_server.api_key, BEHAVIOUR],
        )
        assert state[0] in ("connected", "generating")
        assert state[1] == "function"
        assert state[2]
        assert meter_server.wait_sessions(1) == 1
        check_clips(page)
        page.evaluate("() => rt.disconnect()")
        assert meter_server.wait_sessions(0) == 0
    finally:
        page.context.close()


# -- the demo page's avatar mode ----------------------------------------------------------------


def light(page: Any) -> float:
    return float(video_frame(page, "#output").mean())


def test_the_demo_has_an_avatar_mode(browser: Any, meter_server: LiveServer) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        page.goto(f"{meter_server.base_url}/?model=live_avatar")
        page.wait_for_function(
            "() => document.querySelector('#state').textContent === 'generating'",
            timeout=30_000,
        )
        assert page.input_value("#model") == "live_avatar"
        assert page.evaluate("() => document.querySelector('#output').muted") is False
        assert page.is_hidden("#camera") and page.is_hidden("#image-row")
        assert page.is_visible("#portrait-view") and page.is_visible("#avatar-controls")
        assert page.text_content("#input-caption") == "Portrait"
        assert page.input_value("#prompt") == BEHAVIOUR
        assert page.is_visible("#examples button:has-text('Look excited')")
        page.wait_for_function(
            "() => document.querySelector('#output').videoWidth === 1280"
            " && document.querySelector('#output').srcObject.getAudioTracks().length",
            timeout=15_000,
        )
        time.sleep(0.5)
        quiet = light(page)
        assert quiet < 0.4 * FULL_LIGHT

        # Play a file: the avatar lights up while it plays, and the page says so.
        page.set_input_files(
            "#audio-file",
            files=[{"name": "tone.wav", "mimeType": "audio/wav", "buffer": tone_wav(2.5, 0.5)}],
        )
        page.wait_for_function(
            "() => document.querySelector('#audio-state').textContent === 'playing tone.wav'"
        )
        time.sleep(1.0)
        assert light(page) > 2.5 * quiet
        page.wait_for_function(
            "() => document.querySelector('#audio-state').textContent === ''", timeout=10_000
        )

        # Another portrait replaces the face at once; a behaviour prompt is applied.
        before = video_frame(page, "#output")
        page.click("button.portrait[title='Astronaut (anime)']")
        page.wait_for_selector("button.portrait[title='Astronaut (anime)'][aria-pressed='true']")
        time.sleep(1.0)
        assert mean_abs_diff(before, video_frame(page, "#output")) > 5
        assert page.get_attribute("#portrait-view", "src").endswith("astronaut-anime.jpg")
        page.click("#examples button:has-text('Look excited')")
        assert page.input_value("#prompt") == "Look excited"

        # An uploaded portrait (the camera's astronaut photo, wider) does the same.
        upload = io.BytesIO()
        Image.fromarray(photo(640, 480)).save(upload, format="PNG")
        before = video_frame(page, "#output")
        page.set_input_files(
            "#portrait-file",
            files=[{"name": "me.png", "mimeType": "image/png", "buffer": upload.getvalue()}],
        )
        page.wait_for_function(
            "() => document.querySelector('#portrait-view').src.startsWith('blob:')"
        )
        assert page.evaluate(
            "() => [...document.querySelectorAll('button.portrait')]"
            ".every((b) => b.getAttribute('aria-pressed') === 'false')"
        )
        time.sleep(1.0)
        assert mean_abs_diff(before, video_frame(page, "#output")) > 5
        assert page.is_hidden("#error"), page.text_content("#error")

        # Speak: the session restarts with the microphone (Chromium's fake one).
        old = page.evaluate("() => livemorphDemo.session.sessionId")
        page.click("#speak")
        page.wait_for_function(
            """(old) => {
              const session = livemorphDemo.session;
              return session && session.sessionId !== old && session.isConnected();
            }""",
            arg=old,
            timeout=30_000,
        )
        assert page.get_attribute("#speak", "aria-pressed") == "true"
        assert page.evaluate("() => 'playAudio' in livemorphDemo.session") is False
        assert meter_server.wait_sessions(1) == 1
        assert page.is_hidden("#error"), page.text_content("#error")
        page.set_viewport_size({"width": 390, "height": 844})  # the avatar's controls fit a phone
        assert (
            page.evaluate(
                "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            <= 0
        )
        if shot := os.environ.get(SCREENSHOT_ENV):
            page.set_viewport_size({"width": 1280, "height": 860})
            time.sleep(0.5)
            page.screenshot(path=shot)
        page.click("#start")  # Stop
        assert meter_server.wait_sessions(0) == 0
        assert not errors, errors
    finally:
        context.close()
