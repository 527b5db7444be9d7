"""The ASGI application: FastAPI for REST (with OpenAPI docs) and the WebSockets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .._version import __version__
from ..config import Settings
from . import rest, stream
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
    app.include_router(stream.router)
    return app
