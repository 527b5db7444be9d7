"""The avatar's transport, with the published `decart==0.0.30` client and the `meter` engine.

`meter` lights the portrait by the loudness of what it hears, so the frames say whether
the client's audio reached the engine, and when. What is checked: a session without a
portrait is refused with a clear error; frames come at the model's size from a clock (no
camera); `play_audio` resolves after its clip has played; loud audio lights the frames and
silence dims them; the voice comes back on the audio track, delayed, and silence comes
back silent.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from decart import DecartClient, models
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState
from PIL import Image

from livemorph.testing import LiveServer, serve
from tests.media import FrameSink, photo, tone_wav

pytestmark = pytest.mark.slow

MODEL = models.realtime("live_avatar")


@pytest.fixture(scope="module")
def meter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("avatar"), "--engine", "meter") as live:
        yield live


def portrait_png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(photo(480, 640)).save(buffer, format="PNG")
    return buffer.getvalue()


class AudioSink:
    """Drains the returned audio track, keeping (arrival time, RMS) of each frame."""

    def __init__(self, track: Any) -> None:
        self.levels: list[tuple[float, float]] = []
        self._task = asyncio.create_task(self._drain(track))

    async def _drain(self, track: Any) -> None:
        while True:
            frame = await track.recv()
            samples = frame.to_ndarray().astype(np.float64) / 32768.0
            self.levels.append((time.monotonic(), float(np.sqrt(np.mean(samples**2)))))

    def between(self, start: float, end: float) -> list[float]:
        return [rms for when, rms in self.levels if start <= when <= end]

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def connect(server: LiveServer, state: ModelState | None, tracks: list) -> RealtimeClient:
    client = DecartClient(
        api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
    )
    try:
        return await RealtimeClient.connect(
            base_url=client.realtime_base_url,
            api_key=client.api_key,
            local_track=None,
            options=RealtimeConnectOptions(
                model=MODEL, on_remote_stream=tracks.append, initial_state=state
            ),
        )
    finally:
        await client.close()


async def of_kind(tracks: list, kind: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            for track in tracks:
                if track.kind == kind:
                    return track
            await asyncio.sleep(0.05)


async def test_no_portrait_is_refused_clearly(meter_server: LiveServer) -> None:
    # the published client sends passthrough (no image, no prompt) and retries on refusal
    with pytest.raises(Exception, match="needs a portrait"):
        await connect(meter_server, None, [])
    assert meter_server.wait_sessions(0) == 0


async def test_the_voice_drives_the_frames_and_comes_back(meter_server: LiveServer) -> None:
    tracks: list = []
    rt = await connect(meter_server, ModelState(image=portrait_png()), tracks)
    video = FrameSink(await of_kind(tracks, "video"))
    audio = AudioSink(await of_kind(tracks, "audio"))
    try:
        quiet = await video.fresh(skip=5)
        assert quiet.shape == (MODEL.height, MODEL.width, 3)
        started = time.monotonic()
        playing = asyncio.create_task(rt.play_audio(tone_wav(1.2, 0.5)))
        await asyncio.sleep(0.6)
        loud = await video.fresh()
        await playing
        played = time.monotonic() - started
        assert 1.1 <= played < 2.5, "play_audio resolves once its 1.2 s clip has played"
        await asyncio.sleep(0.5)
        after = await video.fresh()
        assert loud.mean() > 2.0 * quiet.mean(), "the engine heard the voice"
        assert after.mean() < 0.6 * loud.mean(), "and silence after it"
        voice = audio.between(started + 0.3, started + 1.0)
        silence = audio.between(started - 1.0, started)
        assert voice and silence
        assert np.median(voice) > 0.2 and np.median(silence) < 0.01, "the voice came back"
    finally:
        await video.close()
        await audio.close()
        await rt.disconnect()
    assert meter_server.wait_sessions(0) == 0


def portrait_of_the_astronaut() -> bytes:
    from skimage.data import astronaut

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(astronaut()[0:400, 110:410])).save(buffer, "PNG")
    return buffer.getvalue()


async def test_the_published_client_drives_a_talking_portrait(server: LiveServer) -> None:
    """decart==0.0.30 against the real avatar engine: the mouth moves while espeak-ng
    speaks and rests in silence, measured on the frames the client receives."""
    from tests.media import speech_wav

    clip = speech_wav("Hello, I am speaking to you from orbit. Can you hear me?")
    tracks: list = []
    rt = await connect(server, ModelState(image=portrait_of_the_astronaut(), prompt=None), tracks)
    video = await of_kind(tracks, "video")
    frames: list[tuple[float, np.ndarray]] = []

    async def drain() -> None:
        while True:
            frame = await video.recv()
            small = frame.reformat(160, 90, format="gray").to_ndarray().astype(np.float32)
            frames.append((time.monotonic(), small))

    drainer = asyncio.create_task(drain())
    try:
        await asyncio.sleep(1.5)
        spoken = time.monotonic()
        await rt.play_audio(clip)
        quiet = time.monotonic()
        await asyncio.sleep(1.5)
    finally:
        drainer.cancel()
        await asyncio.gather(drainer, return_exceptions=True)
        await rt.disconnect()
    assert frames[0][1].shape == (90, 160)
    stamps = np.array([t for t, _ in frames])
    change = np.abs(np.diff(np.stack([f for _, f in frames]), axis=0))
    stamps = stamps[1:]
    speaking = change[(stamps > spoken + 0.3) & (stamps < quiet)]
    silent = change[(stamps > quiet + 0.5) | (stamps < spoken)]
    # the block (12x12 of 160x90) that moves most while speaking: the mouth
    block = max(
        ((y, x) for y in range(0, 78, 6) for x in range(0, 148, 6)),
        key=lambda p: speaking[:, p[0] : p[0] + 12, p[1] : p[1] + 12].mean(),
    )
    y, x = block
    in_speech = speaking[:, y : y + 12, x : x + 12].mean()
    in_silence = silent[:, y : y + 12, x : x + 12].mean()
    assert in_speech > 4 * in_silence, (in_speech, in_silence)
    assert 20 < y < 80, "the moving block is in the face's lower half, not the background"
