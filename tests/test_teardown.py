"""A session leaves nothing behind: no tasks, peer connections, tracks or decoder threads.

The server runs in this test's own event loop (uvicorn in-process), so the test can
see every task and object the session created.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import threading

import pytest
import uvicorn
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from decart import models
from decart.realtime import RealtimeClient, RealtimeConnectOptions
from decart.types import ModelState, Prompt
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from livemorph.config import Settings
from livemorph.server import create_app
from livemorph.storage import Store
from livemorph.testing import free_port
from tests.media import SceneTrack
from tests.support import eventually

pytestmark = pytest.mark.slow


def live_objects(kind: type) -> list[object]:
    gc.collect()
    return [obj for obj in gc.get_objects() if isinstance(obj, kind)]


def decoder_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "decoder" in t.name]


async def test_disconnect_frees_everything(tmp_path) -> None:
    settings = Settings(port=free_port(), data_dir=tmp_path)
    store = Store.in_data_dir(tmp_path)
    await store.open()
    key, _ = await store.create_api_key("tests")
    await store.close()
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, port=settings.port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started)
    baseline_tasks = set(asyncio.all_tasks())
    try:
        model = models.realtime("mirage")
        tracks: list = []
        rt = await RealtimeClient.connect(
            base_url=f"ws://127.0.0.1:{settings.port}",
            api_key=key,
            local_track=SceneTrack(model.width // 2, model.height // 2, fps=model.fps),
            options=RealtimeConnectOptions(
                model=model,
                on_remote_stream=tracks.append,
                initial_state=ModelState(prompt=Prompt(text="anime")),
            ),
        )
        video = next(t for t in tracks if t.kind == "video")
        for _ in range(5):
            await asyncio.wait_for(video.recv(), 10)
        sessions = app.state.livemorph.sessions
        assert len(sessions) == 1
        session = next(iter(sessions._sessions.values()))
        await rt.disconnect()
        await asyncio.wait_for(session.ended.wait(), 10)
        await eventually(lambda: len(sessions) == 0)
        tracks.clear()
        del rt, video

        def leftover_tasks() -> set[asyncio.Task]:
            leftover = {t for t in asyncio.all_tasks() if not t.done()} - baseline_tasks
            leftover.discard(asyncio.current_task())
            return leftover

        def wound_down() -> bool:
            return not leftover_tasks() and not decoder_threads()

        # what the session started winds down on its own time: wait for it, then say
        # what is left if it never does
        with contextlib.suppress(TimeoutError):
            await eventually(wound_down, within=10)
        assert session.pc is not None and session.pc.connectionState == "closed"
        assert session.pipeline.track.readyState == "ended"
        leftover = leftover_tasks()
        assert not leftover, [t.get_name() + ": " + repr(t.get_coro()) for t in leftover]
        assert all(pc.connectionState == "closed" for pc in live_objects(RTCPeerConnection))
        assert not decoder_threads()
    finally:
        server.should_exit = True
        await serving


async def test_peer_connection_closing_ends_the_session(server) -> None:
    """The WebSocket stays open but the media is gone: the session ends all the same."""
    url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
    async with connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "session_id"
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTrack(SceneTrack(320, 176))
        await pc.setLocalDescription(await pc.createOffer())
        await ws.send(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
        while (message := json.loads(await ws.recv()))["type"] != "answer":
            pass
        await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "answer"))
        await eventually(lambda: pc.connectionState == "connected")
        assert server.active_sessions() == 1
        await pc.close()
        assert await asyncio.to_thread(server.wait_sessions, 0) == 0
        with pytest.raises(ConnectionClosed):  # and the server closes the socket too
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
