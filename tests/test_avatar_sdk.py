"""The avatar from Python: our SDK (and the published `decart==0.0.30` client) against a real
server running the `meter` engine, with real speech from espeak-ng.

`meter` lights the portrait by the loudness of what it hears (a quarter of its brightness in
silence), so the frames say when the engine heard speech; the audio that comes back says
what the server heard. What is checked: the avatar connect (portrait, then prompt, then
offer) gives frames at the model's size showing the portrait; `play_audio` of speech lights
the frames while it plays and not after, resolves after about the clip's length, and comes
back on the audio track, silent between clips; a second `play_audio` stops the first;
numpy samples play too; an audio file as the source drives the avatar and leaves no
`play_audio`; a missing portrait is refused before connecting; the published client's
`play_audio` drives the avatar the same way; a faceless portrait is refused by the real
avatar engine. One `meter` server serves the module.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamTrack
from av import AudioFrame, VideoFrame
from PIL import Image

from livemorph import Client, ErrorCode, LivemorphError, RealtimeClient, create_client, models
from livemorph import sources as lm_sources
from livemorph.sdk.audio import SAMPLE_RATE, decode_audio
from livemorph.testing import LiveServer, serve
from tests.media import photo, speech_wav
from tests.support import eventually

pytestmark = pytest.mark.slow

MODEL = models.realtime("live_avatar")
PROMPT = "Smile warmly and nod occasionally"
GREETING = "Hello, I am your avatar. Nice to meet you."
LONG = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."
SHORT = "Wait, listen to me instead."
#: espeak-ng's loudness, 0 to 200: loud enough that speech lights the meter well.
LOUD = 180


@pytest.fixture(scope="module")
def meter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("avatar-sdk"), "--engine", "meter") as live:
        yield live


@pytest.fixture
async def client(meter_server: LiveServer) -> AsyncIterator[Client]:
    async with create_client(api_key=meter_server.api_key, base_url=meter_server.base_url) as c:
        yield c


def portrait_rgb() -> np.ndarray:
    return photo(480, 640)


def png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def speech(text: str) -> bytes:
    return speech_wav(text, amplitude=LOUD)


def seconds_of(wav: bytes) -> float:
    return len(decode_audio(wav)) / SAMPLE_RATE


class Levels:
    """Drains a remote track, keeping (arrival time, level) of each frame: mean luma for
    video, RMS in -1..1 for audio. The newest video frame is kept whole."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.kind = track.kind
        self.levels: list[tuple[float, float]] = []
        self.last: VideoFrame | None = None
        self._arrived = asyncio.Event()
        self._task = asyncio.create_task(self._drain(track))

    async def _drain(self, track: MediaStreamTrack) -> None:
        while True:
            frame = await track.recv()
            if isinstance(frame, VideoFrame):
                self.last = frame
                plane = frame.planes[0]
                luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)
                level = float(luma[: frame.height, : frame.width].mean())
            else:
                assert isinstance(frame, AudioFrame)
                samples = frame.to_ndarray().astype(np.float64) / 32768.0
                level = float(np.sqrt(np.mean(samples**2)))
            self.levels.append((time.monotonic(), level))
            self._arrived.set()

    def between(self, start: float, end: float) -> np.ndarray:
        return np.array([level for when, level in self.levels if start <= when <= end])

    async def until(self, when: float) -> None:
        """Wait until a frame has arrived after `when`."""
        async with asyncio.timeout(10):
            while not self.levels or self.levels[-1][0] <= when:
                self._arrived.clear()
                await self._arrived.wait()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def listen(rt: RealtimeClient) -> tuple[Levels, Levels]:
    """Levels of the session's video and of the voice that comes back."""
    await eventually(lambda: rt.video_track is not None and rt.audio_track is not None)
    assert rt.video_track is not None and rt.audio_track is not None
    return Levels(rt.video_track), Levels(rt.audio_track)


def shows_portrait(frame: VideoFrame, rgb: np.ndarray) -> float:
    """Correlation of a frame's luma with the portrait's (cropped to the frame's shape)."""
    gray = frame.to_ndarray(format="gray").astype(np.float64)
    h, w = rgb.shape[:2]
    crop_h = round(w * frame.height / frame.width)
    top = (h - crop_h) // 2
    expected = Image.fromarray(rgb[top : top + crop_h]).convert("L")
    wanted = np.asarray(expected.resize((frame.width, frame.height)), np.float64)
    return float(np.corrcoef(gray.ravel(), wanted.ravel())[0, 1])


async def test_speech_lights_the_avatar_and_comes_back(
    client: Client, meter_server: LiveServer
) -> None:
    portrait = portrait_rgb()
    remote: list[MediaStreamTrack] = []
    rt = await client.realtime.connect(
        None,
        model=MODEL,
        avatar={"image": png(portrait)},
        on_remote_stream=remote.append,
        initial_state={"prompt": {"text": PROMPT, "enhance": False}},
    )
    video, voice = await listen(rt)
    try:
        assert sorted(t.kind for t in remote) == ["audio", "video"]
        connected = time.monotonic()
        await video.until(connected + 1.0)
        assert video.last is not None
        assert (video.last.width, video.last.height) == (1280, 720)
        assert shows_portrait(video.last, portrait) > 0.9

        clip = speech(GREETING)
        length = seconds_of(clip)
        started = time.monotonic()
        played = await rt.play_audio(clip)
        finished = time.monotonic()
        assert played is True
        assert 0.9 * length <= finished - started <= length + 1.5, "resolves once played out"
        await video.until(finished + 1.2)

        quiet = video.between(connected + 0.3, started)
        speaking = video.between(started + 0.3, finished - 0.3)
        after = video.between(finished + 0.5, finished + 1.2)
        assert len(quiet) and len(speaking) and len(after)
        assert np.percentile(speaking, 75) > 1.5 * np.median(quiet), "the engine heard speech"
        assert np.max(after) < 1.15 * np.median(quiet), "and silence after it"

        heard = voice.between(started + 0.3, finished - 0.3)
        silent = voice.between(connected + 0.3, started)
        silent_after = voice.between(finished + 0.5, finished + 1.2)
        assert np.median(heard) > 0.02, "the voice came back"
        assert np.percentile(silent, 95) < 0.005 and np.percentile(silent_after, 95) < 0.005
    finally:
        await video.close()
        await voice.close()
        await rt.disconnect()
    assert await asyncio.to_thread(meter_server.wait_sessions, 0) == 0


async def test_a_second_clip_stops_the_first(client: Client) -> None:
    rt = await client.realtime.connect(None, model=MODEL, avatar={"image": portrait_rgb()})
    video, voice = await listen(rt)
    try:
        first, second = speech(LONG), speech(SHORT)
        first_length, second_length = seconds_of(first), seconds_of(second)
        await video.until(time.monotonic() + 0.6)
        started = time.monotonic()
        playing = asyncio.create_task(rt.play_audio(first))
        await asyncio.sleep(1.0)
        interrupted = time.monotonic()
        replacing = asyncio.create_task(rt.play_audio(second))
        assert await playing is False, "the first clip was stopped, not played out"
        stopped = time.monotonic()
        assert stopped - interrupted < 0.5
        assert await replacing is True
        finished = time.monotonic()
        assert 0.9 * second_length <= finished - interrupted <= second_length + 1.5
        assert finished - started < first_length < first_length + second_length

        # The first clip would still be speaking now; its remainder was never sent.
        assert started + first_length > finished + 1.2
        await video.until(finished + 1.2)
        heard = voice.between(interrupted + 0.3, finished - 0.3)
        remainder = voice.between(finished + 0.4, finished + 1.2)
        assert np.median(heard) > 0.02 and np.percentile(remainder, 95) < 0.005
        quiet = video.between(started - 0.6, started)
        dark = video.between(finished + 0.5, finished + 1.2)
        assert len(quiet) and len(dark) and np.max(dark) < 1.15 * np.median(quiet)
    finally:
        await video.close()
        await voice.close()
        await rt.disconnect()


async def test_numpy_samples_play_too(client: Client) -> None:
    rt = await client.realtime.connect(None, model=MODEL, avatar={"image": portrait_rgb()})
    video, voice = await listen(rt)
    try:
        # speech as float samples, mono at espeak's own 22 050 Hz
        with io.BytesIO(speech(GREETING)) as wav, wave.open(wav) as reader:
            rate = reader.getframerate()
            ints = np.frombuffer(reader.readframes(reader.getnframes()), "<i2")
        floats = ints.astype(np.float32) / 32768.0
        # and a tone as int16 stereo (n, 2) at 16 kHz
        t = np.arange(int(0.8 * 16_000)) / 16_000
        tone = (0.5 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
        stereo = np.stack([tone, tone], axis=1)

        await video.until(time.monotonic() + 0.5)
        for samples, sample_rate in ((floats, rate), (stereo, 16_000)):
            length = len(samples) / sample_rate
            before = time.monotonic()
            quiet = video.between(before - 0.4, before)
            assert await rt.play_audio(samples, sample_rate=sample_rate) is True
            finished = time.monotonic()
            assert 0.9 * length <= finished - before <= length + 1.5
            lit = video.between(before + 0.3, finished - 0.2)
            assert np.percentile(lit, 75) > 1.5 * np.median(quiet)
            assert np.median(voice.between(before + 0.3, finished - 0.2)) > 0.02
            await asyncio.sleep(0.5)
    finally:
        await video.close()
        await voice.close()
        await rt.disconnect()


async def test_an_audio_file_drives_the_avatar_instead(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "greeting.wav"
    path.write_bytes(speech(GREETING))
    player = lm_sources.file(str(path), loop=True)
    rt = await client.realtime.connect(
        player,
        model=models.realtime.live_avatar(),
        initial_state={"image": png(portrait_rgb())},  # the published Python client's way
    )
    video, voice = await listen(rt)
    try:
        with pytest.raises(LivemorphError, match="audio source of its own") as info:
            await rt.play_audio(speech(SHORT))
        assert info.value.code is ErrorCode.INVALID_INPUT
        start = time.monotonic()
        await video.until(start + 3.0)
        levels = video.between(start, start + 3.0)
        # speech with its pauses: lit frames and dim ones
        assert np.percentile(levels, 90) > 1.5 * np.percentile(levels, 10)
        assert np.percentile(voice.between(start, start + 3.0), 90) > 0.05
    finally:
        await video.close()
        await voice.close()
        await rt.disconnect()
        if player.audio is not None:
            player.audio.stop()


async def test_the_portrait_is_required_before_connecting(meter_server: LiveServer) -> None:
    async with create_client(api_key=meter_server.api_key, base_url=meter_server.base_url) as c:
        with pytest.raises(LivemorphError, match="live_avatar needs a portrait") as info:
            await c.realtime.connect(None, model=MODEL)
        assert info.value.code is ErrorCode.INVALID_INPUT
        with pytest.raises(LivemorphError, match="avatar is only for live_avatar"):
            await c.realtime.connect(None, model="mirage", avatar={"image": portrait_rgb()})
    assert meter_server.active_sessions() == 0


async def test_the_published_client_plays_speech(meter_server: LiveServer) -> None:
    from decart import DecartClient
    from decart import models as decart_models
    from decart.realtime import RealtimeClient as DecartRealtime
    from decart.realtime import RealtimeConnectOptions
    from decart.types import ModelState

    client = DecartClient(
        api_key=meter_server.api_key,
        base_url=meter_server.base_url,
        realtime_base_url=meter_server.ws_url,
    )
    remote: list[MediaStreamTrack] = []
    try:
        rt = await DecartRealtime.connect(
            base_url=client.realtime_base_url,
            api_key=client.api_key,
            local_track=None,
            options=RealtimeConnectOptions(
                model=decart_models.realtime("live_avatar"),
                on_remote_stream=remote.append,
                initial_state=ModelState(image=png(portrait_rgb())),
            ),
        )
    finally:
        await client.close()
    await eventually(lambda: {t.kind for t in remote} == {"audio", "video"})
    video = Levels(next(t for t in remote if t.kind == "video"))
    voice = Levels(next(t for t in remote if t.kind == "audio"))
    try:
        await video.until(time.monotonic() + 0.6)
        clip = speech(GREETING)
        length = seconds_of(clip)
        started = time.monotonic()
        await rt.play_audio(clip)
        finished = time.monotonic()
        assert 0.9 * length <= finished - started <= length + 1.5
        await video.until(finished + 1.2)
        quiet = video.between(started - 0.5, started)
        speaking = video.between(started + 0.3, finished - 0.3)
        after = video.between(finished + 0.5, finished + 1.2)
        assert np.percentile(speaking, 75) > 1.5 * np.median(quiet)
        assert np.max(after) < 1.15 * np.median(quiet)
        assert np.median(voice.between(started + 0.3, finished - 0.3)) > 0.02
        assert np.percentile(voice.between(finished + 0.5, finished + 1.2), 95) < 0.005
    finally:
        await video.close()
        await voice.close()
        await rt.disconnect()
    assert await asyncio.to_thread(meter_server.wait_sessions, 0) == 0


async def test_a_faceless_portrait_is_refused_by_the_avatar_engine(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    pytest.importorskip("livemorph.engines.avatar.engine")
    # a landscape with no one in it: sky over grass
    faceless = np.zeros((480, 640, 3), np.uint8)
    faceless[:240] = (120, 170, 230)
    faceless[240:] = (60, 140, 50)
    with serve(tmp_path_factory.mktemp("avatar-engine")) as live:
        async with create_client(api_key=live.api_key, base_url=live.base_url) as client:
            with pytest.raises(LivemorphError, match=r"(?i)face") as info:
                await client.realtime.connect(None, model=MODEL, avatar={"image": faceless})
            assert info.value.code is ErrorCode.INVALID_INPUT
        assert await asyncio.to_thread(live.wait_sessions, 0) == 0
