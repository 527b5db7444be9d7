"""The ASGI application: FastAPI for REST (with OpenAPI docs) and the WebSockets."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from .._version import __version__
from ..config import Settings, cors_origins
from ..storage.files import FileStore
from ..storage.store import WallClock, utcnow
from . import admin, files, generate, jobs, metrics, rest, rtc, stream, web
from .limits import Clock
from .state import AppState

logger = logging.getLogger(__name__)

#: The paths browser apps call with fetch, which `--cors-origins` opens to other origins.
#: Decart's JS SDK calls POST /v1/client/tokens, /v1/generate/{model}, /v1/jobs/{model},
#: GET /v1/jobs/{id} and /v1/jobs/{id}/content, POST|GET|DELETE /v1/files[/{id}] and
#: POST /watch-stream/{room}; this server's own SDK GET /v1/models too; and livekit-client
#: GETs /rtc/v1/validate (whose 404 sends it to /rtc) and /rtc/validate (why a join
#: failed): without them a page on another origin never joins its room. Not /demo/token,
#: which mints tokens for whoever reaches it, nor /metrics: what they answer rests on who
#: can reach the server, not on a key a page must hold.
CORS_PATHS = ("/v1/", "/watch-stream/", "/rtc/")
CORS_METHODS = ("GET", "POST", "DELETE", "OPTIONS")
#: What those calls send beyond the safelisted headers: the key, a bearer token, JSON, and
#: the SDK's `User-Agent` (Chromium drops it, Firefox sends it, so it is asked for).
CORS_HEADERS = ("x-api-key", "authorization", "content-type", "user-agent")
#: How long a browser may reuse a preflight's answer (Chromium keeps it 2 h at most).
CORS_MAX_AGE = 3600


class ApiCors:
    """Starlette's `CORSMiddleware` on `CORS_PATHS`, for the origins of `--cors-origins`.

    Never with credentials: keys travel in headers, never in cookies. An origin not named
    sees the API as with no setting at all: its preflight goes on to the routes (405, no
    Access-Control-* header), rather than to Starlette's 400, which lists what is allowed.
    Other paths and every WebSocket (`/v1/stream`: browsers apply no CORS to them) pass by
    untouched."""

    def __init__(self, app: ASGIApp, origins: Sequence[str]) -> None:
        self.app = app
        self.cors = CORSMiddleware(
            app,
            allow_origins=origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_HEADERS,
            allow_credentials=False,
            # a named origin may reach this server on a private network or on loopback:
            # Chromium asks with Access-Control-Request-Private-Network
            allow_private_network=True,
            max_age=CORS_MAX_AGE,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._applies(scope):
            await self.cors(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _applies(self, scope: Scope) -> bool:
        """Whether CORS answers this request: an HTTP one on the API, not a refused preflight."""
        if scope["type"] != "http" or not scope["path"].startswith(CORS_PATHS):
            return False
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        return origin is None or not preflight or self.cors.is_allowed_origin(origin)


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
        worker = state.job_worker
        if worker is not None:  # uploaded files expire with the jobs' housekeeping
            worker.sweepers.append(
                functools.partial(files.sweep_expired, FileStore(state.store), worker.files)
            )
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
    app.include_router(generate.router)
    app.include_router(jobs.router)
    app.include_router(files.router)
    if state.settings.metrics:
        app.include_router(metrics.router)
    web.install(app, state)
    if origins := cors_origins(state.settings.cors_origins):
        app.add_middleware(ApiCors, origins=origins)
        logger.info("pages from %s may call the REST API (--cors-origins)", ", ".join(origins))
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
