"""The browser side: the SDK at /sdk/, the demo app at / and /watch, and demo client tokens.

The demo page needs a client token, and the permanent key must never reach a browser, so the
server mints tokens itself (POST /demo/token) from a dedicated API key named "demo" that it
creates on first use and keeps only hashed, like every key: tokens are minted for its id
through the Store, so its plaintext is never needed. Revoking that key turns the demo's token
minting off; `--no-demo` (LIVEMORPH_DEMO=0) removes the demo routes altogether, for
production. Since the route mints tokens for anyone who can reach it, the demo is on by
default only while the server listens on a loopback address; elsewhere it takes `--demo`,
and the log warns that it is on. The SDK is always served: it is how browsers talk to this server.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.staticfiles import StaticFiles

from ..config import is_loopback
from ..models import CATALOG
from ..storage import Store
from .limits import MemoryRateLimiter, retry_after
from .metrics import RATE_LIMIT_REASON
from .rest import ErrorResponse, TokenResponse, error, token_body
from .state import AppState

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
SDK_DIR = WEB_DIR / "sdk"
APP_DIR = WEB_DIR / "app"

DEMO_KEY_NAME = "demo"
#: A demo token must outlive the page's reconnects: it opens sessions, nothing else.
DEMO_TOKEN_SECONDS = 3600
#: Demo tokens one client address may mint: 10 at once (a page load, a share, a restart or
#: two), then one every 6 s.
DEMO_TOKEN_BURST = 10
DEMO_TOKEN_RATE = 1 / 6

router = APIRouter()


class BrowserFiles(StaticFiles):
    """Static files that every origin may load as ES modules, revalidated on each load."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Access-Control-Allow-Origin"] = "*"
        response.headers["Cache-Control"] = "no-cache"
        path = str(args[0] if args else kwargs.get("full_path", ""))
        if path.endswith(".d.ts"):  # mimetypes calls .ts an MPEG transport stream
            response.headers["Content-Type"] = "application/typescript; charset=utf-8"
        return response


class DemoKey:
    """The id of the API key that demo tokens are minted from, created on first use."""

    def __init__(self) -> None:
        self._key_id: str | None = None
        self._lock = asyncio.Lock()

    async def key_id(self, store: Store) -> str | None:
        """The demo key's id; None once an operator has revoked it."""
        async with self._lock:
            if self._key_id is not None:
                known = await store.get_api_key(self._key_id)
                if known is not None and known.active:
                    return self._key_id
            named = [key for key in await store.list_api_keys() if key.name == DEMO_KEY_NAME]
            active = [key for key in named if key.active]
            if active:
                self._key_id = active[0].id
            elif named:
                return None
            else:
                _, record = await store.create_api_key(DEMO_KEY_NAME)
                logger.info("created the API key %r (%s) for the demo page", record.name, record.id)
                self._key_id = record.id
            return self._key_id


class Demo:
    """What the demo routes keep between requests."""

    def __init__(self) -> None:
        self.key = DemoKey()
        self.limiter = MemoryRateLimiter(DEMO_TOKEN_RATE, DEMO_TOKEN_BURST)


def install(app: FastAPI, state: AppState) -> None:
    """Serve the SDK, and the demo unless the settings turn it off."""
    app.mount("/sdk", BrowserFiles(directory=SDK_DIR), name="sdk")
    settings = state.settings
    if not settings.demo_on:
        if settings.demo is None:
            logger.info(
                "the demo page is off: %s is not a loopback address (--demo turns it on)",
                settings.host,
            )
        return
    if not is_loopback(settings.host):
        logger.warning(
            "the demo is on at %s, which is not a loopback address: POST /demo/token mints "
            "client tokens for anyone who can reach this server (--no-demo turns it off)",
            settings.host,
        )
    app.state.demo = Demo()
    app.mount("/app", BrowserFiles(directory=APP_DIR), name="app")
    app.include_router(router)


def _page(name: str) -> FileResponse:
    return FileResponse(APP_DIR / name, headers={"Cache-Control": "no-cache"})


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The demo: camera and transformed output side by side."""
    return _page("index.html")


@router.get("/watch", include_in_schema=False)
async def watch() -> FileResponse:
    """A viewer of a shared session (`/watch?token=SUBSCRIBE_TOKEN`)."""
    return _page("watch.html")


@router.post(
    "/demo/token",
    tags=["demo"],
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={403: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
async def demo_token(request: Request) -> Any:
    """A client token for the demo page, minted from the server's own demo key.

    Lives an hour, may open sessions on the models this server serves, and nothing else.
    Turned off with `--no-demo`; rate limited per client address.
    """
    state: AppState = request.app.state.livemorph
    demo: Demo = request.app.state.demo
    client = request.client.host if request.client else "unknown"
    if wait := await demo.limiter.acquire(client):
        state.metrics.refused(RATE_LIMIT_REASON)
        seconds = retry_after(wait)
        message = f"too many demo tokens: try again in {seconds} s"
        return error(429, message, {"Retry-After": str(seconds)})
    key_id = await demo.key.key_id(state.store)
    if key_id is None:
        return error(403, f"permission denied: the {DEMO_KEY_NAME!r} API key is revoked")
    served = [name for name in CATALOG if state.engines.engine_name(name) is not None]
    secret, token = await state.store.create_client_token(
        key_id,
        expires_in=DEMO_TOKEN_SECONDS,
        allowed_models=served,
        metadata={"source": "demo"},
    )
    return JSONResponse(token_body(secret, token, served), headers={"Cache-Control": "no-store"})
