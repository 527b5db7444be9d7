"""The ASGI application: FastAPI for REST (with OpenAPI docs) and the WebSockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from .._version import __version__
from ..config import Settings
from . import admin, rest, stream, web
from .state import AppState


def create_app(settings: Settings | None = None) -> FastAPI:
    state = AppState.from_settings(settings or Settings.from_env())

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
