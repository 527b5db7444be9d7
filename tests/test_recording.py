"""Recording: the Python SDK writes what it receives to a file that plays back (PyAV), across
a reconnect, while the caller still gets every frame; the demo page's Record button saves
the output in Chromium."""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc.mediastreams import AudioStreamTrack, MediaStreamTrack
from av import AudioFrame, VideoFrame

from livemorph import ErrorCode, LivemorphError, RetryPolicy, create_client
from livemorph.config import Settings
from livemorph.models import CATALOG
from livemorph.sdk.recording import Recording
from livemorph.testing import LiveServer, serve
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack
from tests.support import eventually

pytestmark = pytest.mark.slow  # real WebRTC sessions, as in test_realtime_e2e

MODEL = CATALOG["mirage"]
QUICK = RetryPolicy(attempts=5, base_delay=0.2, max_delay=1.0)


class ToneTrack(AudioStreamTrack):
    """A 440 Hz tone in 20 ms frames, paced as a microphone would be."""

    async def recv(self) -> AudioFrame:
        silence = await super().recv()  # the pacing and the stamps
        assert isinstance(silence, AudioFrame) and silence.pts is not None
        t = (silence.pts + np.arange(silence.samples)) / silence.sample_rate
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = AudioFrame.from_ndarray(tone[None, :], format="s16", layout="mono")
        frame.sample_rate, frame.pts = silence.sample_rate, silence.pts
        frame.time_base = fractions.Fraction(1, silence.sample_rate)
        return frame


def played(path: Path) -> dict[str, Any]:
    """What a player finds in `path`: every frame decoded, the video's size and the times."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        frames = list(container.decode(video=0))
        size = (video.codec_context.width, video.codec_context.height)
    with av.open(str(path)) as container:
        samples = (
            sum(f.samples for f in container.decode(audio=0)) if container.streams.audio else 0
        )
    times = [float(frame.time) for frame in frames]
    return {"frames": len(frames), "size": size, "times": times, "samples": samples}


async def test_a_recording_plays_back_at_the_models_size_with_its_sound(tmp_path: Path) -> None:
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="grade")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        rt = await client.realtime.connect(
            [SceneTrack(640, 352), ToneTrack()],
            model=MODEL,
            initial_state={"prompt": "anime"},
        )
        sink = FrameSink(rt.video_track)  # the caller reads the output too
        try:
            assert rt.audio_track is not None, "the session sends the audio back"
            await rt.record(tmp_path / "session.mp4")
            assert rt.recording == tmp_path / "session.mp4"
            with pytest.raises(LivemorphError) as twice:
                await rt.record(tmp_path / "again.mp4")
            assert twice.value.code is ErrorCode.INVALID_INPUT
            start = sink.count
            await eventually(lambda: sink.count >= start + 25, within=20)  # a second or so
            recording = rt._recording
            assert recording is not None
            # The recorder reads its own copy, at its own pace (aiortc's MediaRecorder encodes
            # on the event loop): a second of frames too, video and audio alike.
            await eventually(lambda: recording.frames("video") >= 25, within=60)
            await eventually(lambda: recording.frames("audio") >= 25, within=60)
            assert await rt.stop_recording() == tmp_path / "session.mp4"
            assert rt.recording is None and await rt.stop_recording() is None
        finally:
            await sink.close()
            await rt.disconnect()
    found = played(tmp_path / "session.mp4")
    assert found["size"] == (MODEL.width, MODEL.height)
    assert found["frames"] >= 10
    assert found["times"][0] < 0.5, "the file starts when the recording did"
    assert all(b > a for a, b in zip(found["times"], found["times"][1:], strict=False))
    assert found["samples"] > 48_000 // 2, "the sound is recorded with the picture"


async def test_a_recording_goes_on_across_a_reconnect(tmp_path: Path) -> None:
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        rt = await client.realtime.connect(
            SceneTrack(640, 352), model=MODEL, initial_state={"prompt": "ink"}, retry=QUICK
        )
        states: list[str] = []
        rt.on("connection_change", states.append)
        try:
            await rt.record(tmp_path / "both.webm")
            sink = FrameSink(rt.video_track)
            await eventually(lambda: sink.count >= 10, within=20)
            await sink.close()
            before = rt.session_id
            [session] = server.state.sessions.all()
            assert session.pc is not None
            await session.pc.close()  # the server drops the peer connection: not final
            await eventually(lambda: "reconnecting" in states, within=10)
            await eventually(
                lambda: rt.get_connection_state() == "generating" and rt.session_id != before,
                within=20,
            )
            sink = FrameSink(rt.video_track)
            await eventually(lambda: sink.count >= 10, within=20)
            await sink.close()
        finally:
            await rt.disconnect()  # finishes the recording too
        assert rt.recording is None
    found = played(tmp_path / "both.webm")
    assert found["size"] == (MODEL.width, MODEL.height)
    assert found["frames"] >= 15, "frames from both connections"
    assert all(b > a for a, b in zip(found["times"], found["times"][1:], strict=False))


async def test_a_viewer_records_too_and_nothing_is_recorded_before_connecting(
    tmp_path: Path,
) -> None:
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="grade")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        rt = await client.realtime.connect(SceneTrack(320, 176), model=MODEL)
        viewer = await client.realtime.subscribe(rt.subscribe_token or "")
        try:
            with pytest.raises(LivemorphError) as nowhere:
                await viewer.record(tmp_path / "no such folder" / "watched.mkv")
            assert nowhere.value.code is ErrorCode.INVALID_INPUT and viewer.recording is None
            await viewer.record(tmp_path / "watched.mkv")
            sink = FrameSink(viewer.video_track)
            await eventually(lambda: sink.count >= 15, within=20)
            await sink.close()
        finally:
            await viewer.disconnect()
            await rt.disconnect()
        with pytest.raises(LivemorphError) as closed:
            await rt.record(tmp_path / "late.mp4")
        assert closed.value.code is ErrorCode.WEB_RTC_ERROR
    found = played(tmp_path / "watched.mkv")
    assert found["size"] == (MODEL.width, MODEL.height) and found["frames"] >= 5
    assert not (tmp_path / "late.mp4").exists()


@pytest.fixture(scope="module")
def grade_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with serve(tmp_path_factory.mktemp("record-server"), "--engine", "grade") as live:
        yield live


@pytest.mark.browser
def test_the_demo_record_button_saves_the_output(grade_server: LiveServer, tmp_path: Path) -> None:
    from .browser import camera_file, chromium

    camera = camera_file(tmp_path, MODEL.width, MODEL.height, MODEL.fps)
    with chromium(camera) as browser:
        page = browser.new_page()
        page.goto(f"{grade_server.base_url}/")
        page.wait_for_function(
            "() => document.querySelector('#state').textContent === 'generating'",
            timeout=60_000,
        )
        page.click("#record")
        assert page.text_content("#record") == "Stop recording"
        # the recorder hands over data once a second: wait for some, then stop
        page.wait_for_function("() => livemorphDemo.recorded > 0", timeout=20_000)
        page.click("#record")
        link = page.wait_for_selector("#recording-link:not([hidden])")
        assert link is not None
        size = page.evaluate("() => livemorphDemo.recording.size")
        assert size > 0
        assert page.evaluate("() => livemorphDemo.recording.type").startswith("video/")
        with page.expect_download() as download:
            page.click("#recording-link")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        assert saved.suffix == ".webm" and saved.stat().st_size == size
        found = played(saved)
        assert found["frames"] > 0 and found["size"] == (MODEL.width, MODEL.height)


class _Late(MediaStreamTrack):
    """Frames of one kind at their real pace, the first of them `delay` seconds late."""

    def __init__(self, kind: str, delay: float = 0.0) -> None:
        super().__init__()
        self.kind = kind
        self._delay = delay
        self._count = 0

    async def recv(self) -> Any:
        if self._count == 0:
            await asyncio.sleep(self._delay)
        self._count += 1
        if self.kind == "video":
            await asyncio.sleep(1 / 25)
            frame = VideoFrame.from_ndarray(np.full((96, 160, 3), 120, np.uint8), format="rgb24")
            frame.pts, frame.time_base = self._count * 3600, fractions.Fraction(1, 90_000)
            return frame
        await asyncio.sleep(0.02)
        audio = AudioFrame.from_ndarray(np.zeros((1, 960), np.int16), format="s16", layout="mono")
        audio.sample_rate, audio.pts = 48_000, self._count * 960
        audio.time_base = fractions.Fraction(1, 48_000)
        return audio


async def test_audio_that_comes_before_the_first_video_frame_does_not_cost_the_video(
    tmp_path: Path,
) -> None:
    """aiortc's MediaRecorder sizes its video stream by the first video frame, and the
    first audio packet written opens every codec: audio first used to end the video's task
    ("Cannot change width after codec is open"), leaving a file of sound alone."""
    recording = Recording(
        tmp_path / "late.mp4", {"video": _Late("video", delay=0.3), "audio": _Late("audio")}
    )
    await recording.start()
    await eventually(lambda: recording.frames("video") >= 10, within=30)
    await recording.stop()
    found = played(tmp_path / "late.mp4")
    assert found["size"] == (160, 96)
    assert found["frames"] >= 5
