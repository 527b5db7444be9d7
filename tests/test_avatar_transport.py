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
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from decart import DecartClient, models
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState
from PIL import Image

from livemorph.testing import LiveServer, serve
from tests.media import FrameSink, photo

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


def tone_wav(seconds: float, amplitude: float, rate: int = 48_000) -> bytes:
    """A 220 Hz tone as a 16-bit mono WAV file."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (amplitude * 32767 * np.sin(2 * np.pi * 220 * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
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
