"""Admin REST (keys and credits) behind the admin key, and `GET /v1/usage` for a key.

The admin routes exist only when the server has an admin key (`--admin-key` or
`LIVEMORPH_ADMIN_KEY`); without one they answer 404, as if absent, so a server started
without it has no admin surface to probe. The key comes in `X-ADMIN-KEY` or as
`Authorization: Bearer ...` and is compared in constant time.
"""

from __future__ import annotations

import hmac
import json
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._version import __version__
from ..cluster import ClusterUnavailable, Node, SessionEntry
from ..storage import ApiKey, KeyNotFound, SessionUsage, UsageDay
from ..storage.store import hash_secret
from .cluster import node_url
from .rest import ErrorResponse, _describe, _state, error

router = APIRouter()

_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
    404: {"model": ErrorResponse, "description": "No admin key configured, or no such key."},
}


class KeyInfo(BaseModel):
    id: str
    name: str
    createdAt: str
    revokedAt: str | None = Field(description="When the key was revoked; null while active.")
    active: bool
    credits: int | None = Field(
        description="Seconds of generation left; null means unlimited (never granted any)."
    )


class CreatedKey(KeyInfo):
    apiKey: str = Field(description="The key itself: shown this once, stored only hashed.")


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(default="default", min_length=1, max_length=200)
    credits: int | None = Field(
        default=None, ge=0, strict=True, description="Initial credits in seconds; omit: unlimited."
    )


class GrantRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds: int = Field(ge=1, le=10**12, strict=True, description="Seconds to add.")


class CreditsInfo(BaseModel):
    id: str
    credits: int = Field(description="Seconds of generation left after the grant.")


class UsageDayInfo(BaseModel):
    day: date = Field(description="UTC day.")
    model: str
    seconds: int


class UsageReport(BaseModel):
    keyId: str
    credits: int | None = Field(description="Seconds left; null means unlimited.")
    totalSeconds: int
    days: list[UsageDayInfo]


class SessionUsageInfo(BaseModel):
    id: str
    tokenId: str | None = Field(description="The client token that opened it, if one did.")
    tokenMetadata: dict[str, Any] | None = Field(description="That token's `metadata`.")
    model: str
    startedAt: str
    lastSecondAt: str
    seconds: int
    endedAt: str | None
    endReason: str | None


class KeyUsageReport(UsageReport):
    sessions: list[SessionUsageInfo] = Field(description="The most recent sessions first.")


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _key_info(key: ApiKey) -> dict[str, Any]:
    return KeyInfo(
        id=key.id,
        name=key.name,
        createdAt=_iso(key.created_at) or "",
        revokedAt=_iso(key.revoked_at),
        active=key.active,
        credits=key.credit_seconds,
    ).model_dump()


def _usage(key_id: str, credits: int | None, days: list[UsageDay]) -> dict[str, Any]:
    return UsageReport(
        keyId=key_id,
        credits=credits,
        totalSeconds=sum(day.seconds for day in days),
        days=[UsageDayInfo(day=d.day, model=d.model, seconds=d.seconds) for d in days],
    ).model_dump(mode="json")


def _session_info(row: SessionUsage) -> dict[str, Any]:
    return SessionUsageInfo(
        id=row.id,
        tokenId=row.token_id,
        tokenMetadata=row.token_metadata,
        model=row.model,
        startedAt=_iso(row.started_at) or "",
        lastSecondAt=_iso(row.updated_at) or "",
        seconds=row.seconds,
        endedAt=_iso(row.ended_at),
        endReason=row.end_reason,
    ).model_dump()


Since = Annotated[
    str | None,
    Query(description="The first UTC day to include, YYYY-MM-DD.", examples=["2025-01-31"]),
]


def _first_day(since: str | None) -> date | None:
    return None if since is None else date.fromisoformat(since)


RequestBody = TypeVar("RequestBody", bound=BaseModel)


async def _body(request: Request, model: type[RequestBody]) -> RequestBody:
    """An empty body is `{}`, so a model whose fields all have defaults needs none."""
    raw = await request.body()
    return model.model_validate(json.loads(raw) if raw.strip() else {})


# -- admin authentication ---------------------------------------------------------------


async def admin_credential(
    x_admin_key: Annotated[str | None, Header(alias="X-ADMIN-KEY")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> str | None:
    """The admin key as sent: `X-ADMIN-KEY: K` or `Authorization: Bearer K`."""
    if x_admin_key:
        return x_admin_key
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


AdminCredential = Annotated[str | None, Depends(admin_credential)]


def _refused(request: Request, credential: str | None) -> JSONResponse | None:
    """None when `credential` is the admin key; else the response to send."""
    configured = _state(request).settings.admin_key
    if not configured:
        return error(404, "not found: this server has no admin key (--admin-key)")
    # Hashing first gives equal lengths, so the comparison's time says nothing either.
    if credential is None or not hmac.compare_digest(
        hash_secret(credential), hash_secret(configured)
    ):
        return error(401, "invalid admin key")
    return None


# -- admin routes -----------------------------------------------------------------------


@router.post(
    "/v1/admin/keys",
    tags=["admin"],
    status_code=201,
    response_model=CreatedKey,
    responses={**_ADMIN_ERRORS, 400: {"model": ErrorResponse}},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": CreateKeyRequest.model_json_schema()}},
        }
    },
)
async def create_key(request: Request, credential: AdminCredential) -> Any:
    """Mint a permanent API key; the response is the only place its plaintext appears."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    try:
        body = await _body(request, CreateKeyRequest)
    except (ValueError, ValidationError) as exc:
        return error(400, f"invalid request body: {_describe(exc)}")
    secret, key = await _state(request).store.create_api_key(body.name, body.credits)
    return JSONResponse({**_key_info(key), "apiKey": secret}, status_code=201)


@router.get("/v1/admin/keys", tags=["admin"], response_model=list[KeyInfo], responses=_ADMIN_ERRORS)
async def list_keys(request: Request, credential: AdminCredential) -> Any:
    """Every key, revoked ones included, oldest first. Never the keys themselves."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    return [_key_info(key) for key in await _state(request).store.list_api_keys()]


@router.get(
    "/v1/admin/keys/{key_id}", tags=["admin"], response_model=KeyInfo, responses=_ADMIN_ERRORS
)
async def get_key(request: Request, key_id: str, credential: AdminCredential) -> Any:
    if (refused := _refused(request, credential)) is not None:
        return refused
    key = await _state(request).store.get_api_key(key_id)
    return error(404, f"no API key with id {key_id!r}") if key is None else _key_info(key)


@router.delete(
    "/v1/admin/keys/{key_id}", tags=["admin"], response_model=KeyInfo, responses=_ADMIN_ERRORS
)
async def revoke_key(request: Request, key_id: str, credential: AdminCredential) -> Any:
    """Revoke a key: it, and every client token minted from it, opens no new session.
    Sessions already running go on. Revoking again changes nothing."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    try:
        return _key_info(await _state(request).store.revoke_api_key(key_id))
    except KeyNotFound as exc:
        return error(404, str(exc))


@router.post(
    "/v1/admin/keys/{key_id}/credits",
    tags=["admin"],
    response_model=CreditsInfo,
    responses={**_ADMIN_ERRORS, 400: {"model": ErrorResponse}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": GrantRequest.model_json_schema()}},
        }
    },
)
async def grant_credits(request: Request, key_id: str, credential: AdminCredential) -> Any:
    """Add seconds of generation to a key. A key never granted any is unlimited; the
    first grant makes it metered."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    try:
        body = await _body(request, GrantRequest)
    except (ValueError, ValidationError) as exc:
        return error(400, f"invalid request body: {_describe(exc)}")
    try:
        left = await _state(request).store.grant_credits(key_id, body.seconds)
    except KeyNotFound as exc:
        return error(404, str(exc))
    return CreditsInfo(id=key_id, credits=left).model_dump()


@router.get(
    "/v1/admin/keys/{key_id}/usage",
    tags=["admin"],
    response_model=KeyUsageReport,
    responses={**_ADMIN_ERRORS, 400: {"model": ErrorResponse}},
)
async def key_usage(
    request: Request, key_id: str, credential: AdminCredential, since: Since = None
) -> Any:
    """A key's usage by UTC day and model, and its latest sessions with the client token
    (and metadata) behind each. `since`: the first day to include (YYYY-MM-DD)."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    store = _state(request).store
    key = await store.get_api_key(key_id)
    if key is None:
        return error(404, f"no API key with id {key_id!r}")
    try:
        first_day = _first_day(since)
    except ValueError:
        return error(400, "invalid since: expected a date, YYYY-MM-DD")
    report = _usage(key.id, key.credit_seconds, await store.usage_by_day(key.id, first_day))
    sessions = [_session_info(row) for row in await store.session_usage(key.id)]
    return {**report, "sessions": sessions}


# -- a key's own usage ------------------------------------------------------------------


@router.get(
    "/v1/usage",
    tags=["usage"],
    response_model=UsageReport,
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse, "description": "Missing or invalid API key."},
        403: {"model": ErrorResponse, "description": "A client token asked."},
    },
)
async def usage(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias="X-API-KEY")] = None,
    since: Since = None,
) -> Any:
    """The calling key's seconds of generation by UTC day and model (its client tokens'
    included), and its credits left. `since`: the first day to include (YYYY-MM-DD)."""
    store = _state(request).store
    principal = await store.authenticate(x_api_key)
    if principal is None:
        return error(401, "invalid api key")
    if principal.is_client_token:
        return error(403, "permission denied: a client token cannot read usage")
    try:
        first_day = _first_day(since)
    except ValueError:
        return error(400, "invalid since: expected a date, YYYY-MM-DD")
    days = await store.usage_by_day(principal.key_id, first_day)
    return _usage(principal.key_id, await store.credits_left(principal.key_id), days)


# -- the cluster ------------------------------------------------------------------------


class ClusterSession(BaseModel):
    id: str
    model: str
    keyId: str


class ClusterNode(BaseModel):
    name: str
    url: str = Field(description="Where the other nodes relay to.")
    publicHost: str
    publicPort: int
    room: dict[str, int | None] = Field(
        description="Per model served: sessions it takes now; null: no limit known."
    )
    engines: dict[str, str] = Field(description="The engine serving each model there.")
    load: float
    version: str
    startedAt: str
    sessions: list[ClusterSession]


class ClusterReport(BaseModel):
    node: str = Field(description="The node that answered.")
    clustered: bool = Field(description="False for a single node (no --redis-url).")
    nodes: list[ClusterNode]


@router.get(
    "/v1/cluster",
    tags=["admin"],
    response_model=ClusterReport,
    responses={**_ADMIN_ERRORS, 503: {"model": ErrorResponse}},
)
async def cluster(request: Request, credential: AdminCredential) -> Any:
    """The nodes serving as this service and the sessions each holds (a single node lists
    itself). Nodes that stopped heartbeating are gone within seconds."""
    if (refused := _refused(request, credential)) is not None:
        return refused
    state = _state(request)
    member = state.cluster
    if member is None:
        settings = state.settings
        me = Node(
            name=settings.node_name or "local",
            url=node_url(settings),
            public_host=settings.public_host or settings.host,
            public_port=settings.public_port or settings.port,
            room={},
            load=float(len(state.sessions)),
            version=__version__,
            started=state.started,
            sessions=tuple(
                SessionEntry(s.id, s.spec.name, s.principal.key_id) for s in state.sessions.all()
            ),
            engines=state.engines.engine_names(),
        )
        return ClusterReport(node=me.name, clustered=False, nodes=[_cluster_node(me)])
    try:
        nodes = await member.directory.nodes()
    except ClusterUnavailable:
        return error(503, "cluster unavailable: redis cannot be reached")
    return ClusterReport(
        node=member.name, clustered=True, nodes=[_cluster_node(node) for node in nodes]
    )


def _cluster_node(node: Node) -> ClusterNode:
    return ClusterNode(
        name=node.name,
        url=node.url,
        publicHost=node.public_host,
        publicPort=node.public_port,
        room=node.room,
        engines=node.engines,
        load=node.load,
        version=node.version,
        startedAt=datetime.fromtimestamp(node.started, UTC).isoformat(),
        sessions=[
            ClusterSession(id=entry.id, model=entry.model, keyId=entry.key_id)
            for entry in node.sessions
        ],
    )
