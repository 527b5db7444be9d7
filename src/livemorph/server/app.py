"""The ASGI application: FastAPI for REST (with OpenAPI docs) and the WebSockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from .._version import __version__
from ..config import Settings
from ..storage.store import WallClock, utcnow
from . import admin, metrics, rest, rtc, stream, web
from .limits import Clock
from .state import AppState


def create_app(
    settings: Settings | None = None,
    *,
    wall_clock: WallClock = utcnow,
    monotonic_clock: Clock = time.monotonic,
) -> FastAPI:
    """The app for `settings` (the environment's by default); the clocks are for tests
    (see `AppState.from_settings`)."""
    state = AppState.from_settings(
        settings or Settings.from_env(), wall_clock=wall_clock, monotonic_clock=monotonic_clock
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.open()
        try:
            yield
        finally:
            await state.close()

    app = FastAPI(
        title="livemorph",
        version=__version__,
        summary="Realtime video transformation over WebRTC.",
        lifespan=lifespan,
    )
    app.state.livemorph = state
    app.include_router(rest.router)
    app.include_router(admin.router)
    app.include_router(stream.router)
    app.include_router(rtc.router)
    if state.settings.metrics:
        app.include_router(metrics.router)
    web.install(app, state)
    return app


class GracefulServer(uvicorn.Server):
    """uvicorn, but sessions hear `generation_ended` (`server_shutdown`) before it closes
    their sockets, so clients know to reconnect elsewhere rather than report a failure."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self._state = state

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await self._state.sessions.close_all("server_shutdown")
        await super().shutdown(sockets)
