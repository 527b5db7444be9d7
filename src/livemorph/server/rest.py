"""The REST endpoints: health, the model catalog, and client-token minting."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import FormData, UploadFile

from ..cluster import ClusterUnavailable
from ..models import CATALOG, IMAGE_MODELS, UnknownModelError
from ..sessions.metering import INSUFFICIENT_CREDITS
from ..storage import ClientToken, JobFiles, Principal
from .limits import retry_after
from .metrics import INVALID_KEY_REASON, RATE_LIMIT_REASON
from .state import AppState

router = APIRouter()


class ModelInfo(BaseModel):
    name: str
    fps: int
    width: int
    height: int
    kind: str
    available: bool = Field(description="Whether this server has an engine for the model.")
    engine: str | None = Field(description="The engine that serves the model here, if any.")
    alias_of: str | None = Field(
        description="For an alias (`lucy-latest`), the model it stands for and is served as."
    )
    speeds: list[str] = Field(
        description="The `speed` tiers the published clients advertise for the model. "
        "`speed=fast` is accepted on every model; this server has one tier, so it changes "
        "nothing."
    )
    resolutions: list[str] = Field(
        description="The `resolution` values `/v1/stream` accepts for the model: `720p` is "
        "its own size (width x height); others are refused."
    )
    limitations: str | None = Field(
        description="What this server does not do of what the model is meant to do (the "
        "try-on models: no try-on, the reference image guides the style only); null: none."
    )


class RealtimeConstraints(BaseModel):
    model_config = ConfigDict(extra="forbid")
    maxSessionDuration: int | None = Field(default=None, ge=1, le=86_400)


class TokenConstraints(BaseModel):
    model_config = ConfigDict(extra="forbid")
    realtime: RealtimeConstraints | None = None


class TokenRequest(BaseModel):
    """All optional. The browser SDK sends no body and no content type at all."""

    model_config = ConfigDict(extra="ignore")
    metadata: dict[str, Any] | None = None
    expiresIn: int = Field(default=60, ge=1, le=3600, strict=True)
    allowedModels: list[str] | None = Field(default=None, max_length=20)
    constraints: TokenConstraints | None = None


class TokenResponse(BaseModel):
    apiKey: str
    #: The same credential: Decart's current clients (`decart>=0.2`) require a `token`
    #: field, the one their frontends are told to use. livemorph's client tokens are
    #: opaque keys checked by the server (hashed), not JWTs to verify offline.
    token: str
    expiresAt: str
    permissions: dict[str, list[str]] | None = None
    constraints: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    error: str


def _state(request: Request) -> AppState:
    return request.app.state.livemorph


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Refused(Exception):
    """A batch request (`/v1/generate`, `/v1/jobs`, `/v1/files`) refused: the status and
    the words the client reads (`error(exc.status, exc.message)`)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


#: Bytes copied at a time from an upload to its file.
COPY_CHUNK = 1 << 20


async def save_upload(
    files: JobFiles, folder: str, name: str, upload: UploadFile, limit: int, what: str
) -> int:
    """Copy `upload` into the file `name` of `folder` in the jobs directory, whole or not
    at all (`JobFiles.open_atomic`), on a worker thread; its size. Refused(413), naming
    `what`, once it passes `limit` bytes."""
    too_large = Refused(413, f"file too large: {what} may be at most {limit // (1 << 20)} MB")

    def copy() -> int:
        size = 0
        with files.open_atomic(folder, name) as out:
            while chunk := upload.file.read(COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_large
                out.write(chunk)
        return size

    return await asyncio.to_thread(copy)


async def multipart(request: Request, *, max_files: int, max_fields: int) -> FormData:
    """The request's multipart form; Refused(400) in the parser's words when it is none."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except Exception as exc:  # the multipart parser's errors, as HTTPException or its own
        detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise Refused(400, f"invalid request body: {detail}") from None


async def caller(state: AppState, key: str | None) -> Principal | JSONResponse:
    """Who holds `key` (`X-API-KEY`): a key or client token; else the 401 to answer with,
    counted as a refusal."""
    principal = await state.store.authenticate(key)
    if principal is None:
        state.metrics.refused(INVALID_KEY_REASON)
        return error(401, "invalid api key")
    return principal


async def batch_caller(
    request: Request, model: str, served: Mapping[str, str], kind: str
) -> tuple[Principal, str] | JSONResponse:
    """The caller of a batch endpoint (`/v1/generate`, `/v1/jobs`) for `model`, one of
    `served` (each named for the realtime model whose engine serves it), with that realtime
    model's name; else the refusal to answer with: the key (401), the model (404), the
    token's models (403), no engine for it here (404), the credits (402). The engine is not
    loaded here: a job runs in a process of its own, and an edit loads it when it runs."""
    state = _state(request)
    principal = await caller(state, request.headers.get("x-api-key"))
    if isinstance(principal, JSONResponse):
        return principal
    target = served.get(model)
    if target is None:
        known = ", ".join(served)
        return error(404, f"model not found: {model!r} is not allowed; {kind} models: {known}")
    if not principal.may_use(model):
        return error(403, f"permission denied: this token may not use model {model}")
    try:
        available = state.engines.engine_name(target) is not None
    except UnknownModelError:
        available = False
    if not available:
        return error(404, f"model not available on this server: {model} is not allowed here")
    if not await state.meter.admits(principal):
        return error(402, INSUFFICIENT_CREDITS)
    return principal, target


def token_body(secret: str, token: ClientToken, models: list[str] | None) -> dict[str, Any]:
    """The JSON answer for a newly minted client token; `models`: its permitted models."""
    return TokenResponse(
        apiKey=secret,
        token=secret,
        expiresAt=token.expires_at.isoformat().replace("+00:00", "Z"),
        permissions=None if models is None else {"models": models},
        constraints=token.constraints,
    ).model_dump(exclude_none=True)


@router.get("/healthz", tags=["service"])
async def healthz(request: Request) -> dict[str, Any]:
    """200 once the server accepts sessions; also how many sessions run here."""
    return {"status": "ok", "active_sessions": len(_state(request).sessions)}


@router.get("/v1/models", tags=["realtime"])
async def list_models(request: Request) -> list[ModelInfo]:
    """The realtime model catalog, with what each model expects from the camera."""
    engines = _state(request).engines
    infos = []
    for name, spec in CATALOG.items():
        engine = engines.engine_name(name)
        infos.append(
            ModelInfo(
                name=spec.name,
                fps=spec.fps,
                width=spec.width,
                height=spec.height,
                kind=spec.kind,
                available=engine is not None,
                engine=engine,
                alias_of=spec.alias_of,
                speeds=list(spec.speeds),
                resolutions=list(spec.resolutions),
                limitations=spec.limitations,
            )
        )
    return infos


@router.post(
    "/v1/client/tokens",
    tags=["auth"],
    response_model=TokenResponse,
    response_model_exclude_none=True,
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "Too many tokens minted; see Retry-After."},
    },
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": TokenRequest.model_json_schema()}},
        }
    },
)
async def create_client_token(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-KEY")] = None,
) -> Any:
    """Mint a short-lived client token from a permanent key, for use in a browser."""
    state = _state(request)
    principal = await caller(state, x_api_key)
    if isinstance(principal, JSONResponse):
        return principal
    if principal.is_client_token:
        return error(403, "permission denied: a client token cannot mint tokens")
    try:
        wait = await state.limits.token_mints.acquire(principal.key_id)
    except ClusterUnavailable:
        return error(503, "cluster unavailable: cannot count token mints, try again shortly")
    if wait:
        state.metrics.refused(RATE_LIMIT_REASON)
        seconds = retry_after(wait)
        message = f"rate limit: too many tokens minted for this key, retry in {seconds} s"
        return error(429, message, {"Retry-After": str(seconds)})
    raw = await request.body()
    try:
        body = TokenRequest.model_validate(json.loads(raw) if raw.strip() else {})
    except (ValueError, RecursionError) as exc:  # ValidationError is a ValueError
        return error(400, f"invalid request body: {_describe(exc)}")
    # realtime models and the image models of /v1/generate: a token may be limited to either
    unknown = [m for m in body.allowedModels or [] if m not in CATALOG and m not in IMAGE_MODELS]
    if unknown:
        return error(400, f"invalid request body: unknown models {unknown}")
    constraints = body.constraints.model_dump(exclude_none=True) if body.constraints else None
    secret, token = await state.store.create_client_token(
        principal.key_id,
        expires_in=body.expiresIn,
        allowed_models=body.allowedModels,
        constraints=constraints or None,
        metadata=body.metadata,
    )
    return token_body(secret, token, body.allowedModels or None)


def _describe(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        return f"{where}: {first['msg']}"
    if isinstance(exc, json.JSONDecodeError | RecursionError):  # also nested too deep
        return "not valid JSON"
    return str(exc)
