"""Moderation end to end: refused input never reaches the picture, and clients hear of it."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest
from decart import DecartClient, models
from decart.errors import DecartSDKError
from PIL import Image
from websockets.asyncio.client import connect

from livemorph import ErrorCode, LivemorphError, RetryPolicy, create_client
from tests.media import FrameSink, SceneTrack, mean_abs_diff
from tests.test_decart_client import connect_official, video_of
from tests.test_signaling import recv_type, stream_url

pytestmark = pytest.mark.slow

#: Retries that would blow the test's own timeout: a retried refusal shows as a hang.
PATIENT = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)

#: Would turn the output neon if it got through: the test can tell.
REFUSED_PROMPT = "cyberpunk neon city, p0rn"


def gif(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    image = np.zeros((96, 96, 3), np.uint8)
    image[...] = color
    Image.fromarray(image).convert("P").save(buffer, format="GIF")
    return buffer.getvalue()


async def test_refused_prompt_gets_a_failed_ack_on_the_wire(server) -> None:
    async with connect(stream_url(server)) as ws:
        await recv_type(ws, "session_id")
        await ws.send(json.dumps({"type": "prompt", "prompt": "N.U.D.E beach"}))
        ack = await recv_type(ws, "prompt_ack")
        assert ack == {
            "type": "prompt_ack",
            "prompt": "N.U.D.E beach",
            "success": False,
            "error": "prompt refused by moderation: "
            "not allowed by the content policy (explicit sexual content)",
        }
        image = base64.b64encode(gif((0, 0, 255))).decode()
        await ws.send(json.dumps({"type": "set_image", "image_data": image, "prompt": "lego"}))
        ack = await recv_type(ws, "set_image_ack")
        assert ack["success"] is False and "GIF is not accepted" in ack["error"]
        await ws.send(json.dumps({"type": "prompt", "prompt": "Essex at dusk"}))
        assert (await recv_type(ws, "prompt_ack"))["success"] is True


async def test_refusals_leave_the_look_unchanged_decart_client(server) -> None:
    tracks = []
    client = DecartClient(
        api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
    )
    model = models.realtime("mirage_v2")
    source = SceneTrack(model.width, model.height, fps=model.fps)
    rt = await connect_official(client, model, source, tracks.append, "anime")
    output = FrameSink(await video_of(tracks))
    try:
        anime = await output.fresh()
        with pytest.raises(DecartSDKError, match="refused by moderation: not allowed"):
            await rt.set_prompt(REFUSED_PROMPT)
        after_prompt = await output.fresh()
        with pytest.raises(DecartSDKError, match="image refused by moderation"):
            await rt.set_image(gif((20, 40, 230)), prompt="cyberpunk neon city")
        after_image = await output.fresh()

        await rt.set_prompt("cyberpunk neon city")  # what the refusals would have done
        neon = await output.fresh()
        change = mean_abs_diff(neon, anime)
        assert change > 5, "the allowed prompt changes the look"
        assert mean_abs_diff(after_prompt, anime) * 2 < change, "refused prompt not applied"
        assert mean_abs_diff(after_image, anime) * 2 < change, "refused set_image not applied"
        assert rt.is_connected()
    finally:
        await output.close()
        await rt.disconnect()
        await client.close()


async def test_refused_initial_prompt_fails_the_decart_connect(server) -> None:
    client = DecartClient(
        api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
    )
    model = models.realtime("mirage")
    try:
        # "not allowed" in the refusal stops the client's retries: this fails at once
        async with asyncio.timeout(20):
            with pytest.raises(Exception, match="refused by moderation") as raised:
                await connect_official(
                    client, model, SceneTrack(320, 176), lambda track: None, "g0ry battlefield"
                )
        assert "graphic gore" in str(raised.value)
    finally:
        await client.close()
    assert await asyncio.to_thread(server.wait_sessions, 0) == 0


async def test_python_sdk_raises_on_refusal(server) -> None:
    async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
        with pytest.raises(LivemorphError) as refused:
            await client.realtime.connect(
                SceneTrack(320, 176),
                model="mirage",
                initial_state={"prompt": {"text": "n u d e"}},
                retry=PATIENT,
            )
        assert "refused by moderation" in refused.value.message
        assert refused.value.permanent

        rt = await client.realtime.connect(
            SceneTrack(320, 176), model="mirage", initial_state={"prompt": {"text": "lego"}}
        )
        try:
            with pytest.raises(LivemorphError) as raised:
                await rt.set_prompt(REFUSED_PROMPT)
            assert raised.value.code is ErrorCode.INVALID_INPUT
            with pytest.raises(LivemorphError, match="image refused"):
                await rt.set(prompt="lego", image=gif((200, 0, 0)))
            await rt.set_prompt("watercolour")  # the session goes on
        finally:
            await rt.disconnect()
