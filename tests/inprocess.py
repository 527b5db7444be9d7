"""A livemorph server in the test's own event loop, on a clock the test moves.

`livemorph.testing.serve` runs the real CLI in a subprocess, which is the better test of
what users run, but its clocks are the machine's: a token that must expire, or a rate
bucket that must refill, has to be waited for. Here the app is built with `create_app` and
served by uvicorn in-process, with the store and the rate limits reading a `FakeClock`,
so the test moves time itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import uvicorn

from livemorph.config import Settings
from livemorph.server import GracefulServer, create_app
from livemorph.server.state import AppState
from livemorph.testing import free_port
from tests.support import FakeClock, eventually


@dataclass(frozen=True)
class InProcessServer:
    """What a test needs of the server: its URLs, a key, its clock and its state."""

    base_url: str
    ws_url: str
    api_key: str
    clock: FakeClock
    state: AppState


@asynccontextmanager
async def serve_in_process(
    settings: Settings, clock: FakeClock | None = None
) -> AsyncIterator[InProcessServer]:
    """Serve `settings` (its port replaced by a free one) until the block ends; one API key
    is minted in its store. The store's "now" and the rate limits' refills follow `clock`."""
    clock = clock or FakeClock()
    port = free_port()
    settings = replace(settings, host="127.0.0.1", port=port)
    app = create_app(settings, wall_clock=clock.utc, monotonic_clock=clock)
    state: AppState = app.state.livemorph
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=port,
        log_level="warning",
        ws_max_size=settings.max_message_bytes or None,  # type: ignore[arg-type]
    )
    server = GracefulServer(config, state)
    serving = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or serving.done())
        if serving.done():
            serving.result()  # the start's own error, if it raised one
            raise RuntimeError("the in-process server stopped while starting")
        api_key, _ = await state.store.create_api_key("tests")
        yield InProcessServer(
            f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", api_key, clock, state
        )
    finally:
        server.should_exit = True
        await serving
