"""The Python SDK against a real server over real WebRTC on loopback."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from livemorph import ErrorCode, LivemorphError, RetryPolicy, create_client, models
from livemorph.config import Settings
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack, mean_abs_diff, photo
from tests.support import eventually

pytestmark = pytest.mark.slow

#: Retries that would blow the test's own timeout: a retried permanent error shows as a hang.
PATIENT = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = np.zeros((96, 96, 3), np.uint8)
    image[...] = color
    image[:48] //= 3  # some spread, so the colour transfer has a shape to copy
    Image.fromarray(image).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
async def client(server):
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        yield client


async def test_prompt_image_and_passthrough_control_the_output(client, server) -> None:
    model = models.realtime("mirage_v2")
    source = SceneTrack(model.width, model.height, fps=model.fps)
    rt = await client.realtime.connect(
        source, model=model, initial_state={"prompt": {"text": "anime", "enhance": True}}
    )
    output = FrameSink(rt.video_track)
    try:
        assert rt.session_id and rt.subscribe_token
        anime = await output.fresh()
        assert anime.shape == (model.height, model.width, 3)
        assert mean_abs_diff(anime, source.last_rgb) > 8

        await rt.set_prompt("cyberpunk neon city")
        # the default engine is the neural one, reading prompts through its style catalog
        assert rt.enhanced_prompt and "neon" in rt.enhanced_prompt.lower()
        neon = await output.fresh()
        assert mean_abs_diff(neon, anime) > 5

        await rt.set_image(jpeg((30, 60, 220)))
        blue = await output.fresh()
        assert mean_abs_diff(blue, neon) > 5

        await rt.set_image(None)  # clears the image: back to the prompt's look
        cleared = await output.fresh()
        assert mean_abs_diff(cleared, neon) * 2 < mean_abs_diff(cleared, blue)

        await rt.passthrough()  # set_image with image_data and prompt both null
        plain = await output.fresh()
        assert mean_abs_diff(plain, source.last_rgb) * 2 < mean_abs_diff(plain, neon)
        assert rt.get_connection_state() == "generating"
    finally:
        await output.close()
        await rt.disconnect()
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0


async def test_ticks_count_seconds(client) -> None:
    model = models.realtime("mirage")
    ticks: list[int] = []
    rt = await client.realtime.connect(
        SceneTrack(640, 352), model=model, initial_state={"prompt": {"text": "lego"}}
    )
    rt.on("generation_tick", lambda tick: ticks.append(tick.seconds))
    try:
        await eventually(lambda: len(ticks) >= 3, within=10)
    finally:
        await rt.disconnect()
    assert ticks[:3] == list(range(ticks[0], ticks[0] + 3)), "cumulative, one per second"


async def test_bad_key_fails_at_once_without_retries(server) -> None:
    async with create_client(api_key="lm_wrong", base_url=server.base_url) as bad:
        with pytest.raises(LivemorphError) as error:
            async with asyncio.timeout(10):
                await bad.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
    assert error.value.code is ErrorCode.INVALID_API_KEY


@pytest.mark.parametrize("name", ["warp_drive"])
async def test_unknown_or_unavailable_model(client, name: str) -> None:
    with pytest.raises(LivemorphError) as error:
        async with asyncio.timeout(10):
            await client.realtime.connect(SceneTrack(320, 176), model=name, retry=PATIENT)
    assert error.value.code is ErrorCode.MODEL_NOT_FOUND


async def test_expired_token_refuses_new_sessions_only(tmp_path) -> None:
    """In-process, so the token expires when the test moves the server's clock, however
    long the first session took to connect."""
    async with (
        serve_in_process(Settings(data_dir=tmp_path, engine="passthrough")) as server,
        create_client(api_key=server.api_key, base_url=server.base_url) as client,
    ):
        token = await client.tokens.create(expires_in=2, allowed_models=["mirage"])
        async with create_client(api_key=token.api_key, base_url=server.base_url) as browser:
            rt = await browser.realtime.connect(
                SceneTrack(640, 352), model="mirage", initial_state={"prompt": {"text": "ink"}}
            )
            output = FrameSink(rt.video_track)
            try:
                server.clock.advance(2)
                with pytest.raises(LivemorphError) as error:
                    async with asyncio.timeout(10):
                        await browser.realtime.connect(
                            SceneTrack(320, 176), model="mirage", retry=PATIENT
                        )
                assert error.value.code is ErrorCode.INVALID_API_KEY
                await output.fresh()  # the running session goes on
                assert rt.is_connected()
                await rt.set_prompt("still steering after expiry")
            finally:
                await output.close()
                await rt.disconnect()


async def test_client_token_cannot_mint(client, server) -> None:
    token = await client.tokens.create()
    async with create_client(api_key=token.api_key, base_url=server.base_url) as browser:
        with pytest.raises(LivemorphError) as error:
            await browser.tokens.create()
    assert "403" in str(error.value)


async def test_viewer_sees_the_output_and_cannot_steer(client, server) -> None:
    source = SceneTrack(640, 352)
    rt = await client.realtime.connect(
        source, model="mirage", initial_state={"prompt": {"text": "sepia film"}}
    )
    viewer = await client.realtime.subscribe(rt.subscribe_token)
    errors: list[LivemorphError] = []
    viewer.on("error", errors.append)
    output, watching = FrameSink(rt.video_track), FrameSink(viewer.video_track)
    try:
        # Past the first frames, while the viewer's encoder ramps up its bitrate.
        watched, published = await asyncio.gather(watching.fresh(10), output.fresh(10))
        camera = photo(1280, 704)
        assert watched.shape == published.shape == (704, 1280, 3)
        assert mean_abs_diff(watched, camera) > 8, "the viewer sees transformed video..."
        assert mean_abs_diff(watched, published) * 2 < mean_abs_diff(watched, camera), (
            "...the session's output"
        )

        await viewer.signaling.send_raw({"type": "prompt", "prompt": "hijack"})
        await eventually(lambda: bool(errors))
        assert "not allowed" in errors[0].message
        after = await output.fresh()
        # A different prompt would shift the colours of the whole picture; noise does not.
        shift = np.abs(after.mean(axis=(0, 1)) - published.mean(axis=(0, 1))).max()
        assert shift < 3, "the viewer's prompt changed nothing"
    finally:
        await output.close()
        await watching.close()
        await rt.disconnect()
    await eventually(lambda: viewer.get_connection_state() == "disconnected")
    await viewer.disconnect()
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0


async def test_healthz_counts_sessions(client, server) -> None:
    rt = await client.realtime.connect(SceneTrack(320, 176), model="mirage")
    try:
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"{server.base_url}/healthz")).json()
        assert health["active_sessions"] >= 1
    finally:
        await rt.disconnect()
