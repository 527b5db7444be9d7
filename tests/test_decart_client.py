"""The published `decart==0.0.30` Python client works unchanged against livemorph."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from aiortc.mediastreams import MediaStreamTrack
from decart import DecartClient, models
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState, Prompt

from tests.media import FrameSink, SceneTrack, mean_abs_diff
from tests.support import eventually

pytestmark = pytest.mark.slow


async def test_official_client_default_flow(server) -> None:
    states: list[str] = []
    ticks: list[int] = []
    tracks = []

    client = DecartClient(
        api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
    )
    model = models.realtime("mirage_v2")
    source = SceneTrack(model.width, model.height, fps=model.fps)
    rt = await connect_official(client, model, source, tracks.append, "anime")
    rt.on("connection_change", states.append)
    rt.on("generation_tick", lambda msg: ticks.append(msg.seconds))
    assert rt.session_id
    assert rt.is_connected()
    output = FrameSink(await video_of(tracks))
    try:
        anime = await output.fresh()
        assert anime.shape == (model.height, model.width, 3)
        assert mean_abs_diff(anime, source.last_rgb) > 5, "output should be restyled"

        await rt.set_prompt("cyberpunk neon city")
        neon = await output.fresh()
        assert mean_abs_diff(neon, anime) > 5, "a new prompt changes the output"
        await eventually(lambda: len(ticks) >= 2)
        assert states[-1] == "generating"
    finally:
        await output.close()
        await rt.disconnect()
        await client.close()
    assert rt.get_connection_state() == "disconnected"
    assert server.wait_sessions(0) == 0


async def connect_official(
    client: DecartClient,
    model: Any,
    source: MediaStreamTrack,
    on_remote_stream: Callable[[Any], None],
    prompt: str,
) -> RealtimeClient:
    """The published client's `RealtimeClient.connect`, as the seeds call it."""
    return await RealtimeClient.connect(
        base_url=client.realtime_base_url,
        api_key=client.api_key,
        local_track=source,
        options=RealtimeConnectOptions(
            model=model,
            on_remote_stream=on_remote_stream,
            initial_state=ModelState(prompt=Prompt(text=prompt, enhance=True)),
        ),
    )


async def video_of(tracks: list) -> Any:
    """The first video track among those `on_remote_stream` collected, once one arrives."""
    async with asyncio.timeout(10):
        while True:
            for track in tracks:
                if track.kind == "video":
                    return track
            await asyncio.sleep(0.05)
