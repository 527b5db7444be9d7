"""Sessions that end: a restarted server is reconnected to; a token's time limit is final."""

from __future__ import annotations

import asyncio

import pytest

from livemorph import GenerationEnded, RetryPolicy, create_client
from livemorph.testing import serve, start_server, stop_server
from tests.media import FrameSink, SceneTrack, mean_abs_diff, photo
from tests.support import eventually

pytestmark = pytest.mark.slow

QUICK = RetryPolicy(attempts=5, base_delay=0.5, max_delay=4.0)  # 7.5 s in all


async def test_reconnects_to_a_restarted_server_and_restores_the_prompt(tmp_path) -> None:
    first = start_server(tmp_path)
    port = int(first.base_url.rsplit(":", 1)[1])
    states: list[str] = []
    async with create_client(api_key=first.api_key, base_url=first.base_url) as client:
        source = SceneTrack(640, 352)
        rt = await client.realtime.connect(
            source, model="mirage", initial_state={"prompt": "anime"}, retry=QUICK
        )
        rt.on("connection_change", states.append)
        old_session = rt.session_id
        sink = FrameSink(rt.video_track)
        styled = await sink.fresh()
        await sink.close()

        ended: list[GenerationEnded] = []
        rt.on("generation_ended", ended.append)
        await asyncio.to_thread(stop_server, first)
        await eventually(lambda: "reconnecting" in states)
        assert [e.reason for e in ended] == ["server_shutdown"]
        second = await asyncio.to_thread(start_server, tmp_path, port=port)
        try:
            await eventually(lambda: rt.get_connection_state() == "generating", within=20)
            assert rt.session_id != old_session
            sink = FrameSink(rt.video_track)
            restored = await sink.fresh()
            await sink.close()
            # Same prompt, same look: the SDK restored "anime" before the first new frame.
            assert mean_abs_diff(restored, styled) * 2 < mean_abs_diff(restored, photo(1280, 704))
            await rt.disconnect()
        finally:
            stop_server(second)
    assert states[-1] == "disconnected"


async def test_max_session_duration_ends_the_session_for_good(tmp_path) -> None:
    with serve(tmp_path) as server:
        async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
            token = await client.tokens.create(constraints={"realtime": {"maxSessionDuration": 2}})
        async with create_client(api_key=token.api_key, base_url=server.base_url) as browser:
            ended: list[GenerationEnded] = []
            states: list[str] = []
            rt = await browser.realtime.connect(SceneTrack(320, 176), model="mirage", retry=QUICK)
            rt.on("generation_ended", ended.append)
            rt.on("connection_change", states.append)
            await eventually(lambda: rt.get_connection_state() == "disconnected", within=15)
            assert ended and ended[0].reason == "max_duration" and ended[0].seconds == 2
            # a reconnect says "reconnecting" before it waits out its delay: none may come
            assert "reconnecting" not in states, "no reconnect after a final end"
            assert await asyncio.to_thread(server.wait_sessions, 0) == 0
            await rt.disconnect()
