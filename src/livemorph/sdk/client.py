"""The entry point: `create_client()`, REST calls, and the realtime namespace."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..errors import ErrorCode, LivemorphError
from ..models import ModelSpec
from .images import ImageInput
from .jobs import JobsClient, edit_image
from .realtime import USER_AGENT, RealtimeAPI

if TYPE_CHECKING:
    from .realtime import _LiveConnection

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "LIVEMORPH_API_KEY"
BASE_URL_ENV = "LIVEMORPH_BASE_URL"


@dataclass(frozen=True, slots=True)
class ClientToken:
    """A short-lived key that is safe to hand to a browser or app."""

    api_key: str = field(repr=False)
    #: ISO-8601 UTC, as the server sent it.
    expires_at: str
    permissions: dict[str, Any] | None = None
    constraints: dict[str, Any] | None = None


class TokensClient:
    """`client.tokens`: mint client tokens with the permanent key, on your backend."""

    def __init__(self, client: Client) -> None:
        self._client = client

    async def create(
        self,
        *,
        expires_in: int | None = None,
        allowed_models: Sequence[str | ModelSpec] | None = None,
        constraints: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ClientToken:
        """Mint a token (default lifetime 60 s, at most 3600).

        `constraints` is e.g. `{"realtime": {"maxSessionDuration": 300}}`.
        """
        body: dict[str, Any] = {}
        if expires_in is not None:
            body["expiresIn"] = expires_in
        if allowed_models is not None:
            body["allowedModels"] = [m if isinstance(m, str) else m.name for m in allowed_models]
        if constraints is not None:
            body["constraints"] = constraints
        if metadata is not None:
            body["metadata"] = metadata
        try:
            response = await self._client._http.post(
                f"{self._client.base_url}/v1/client/tokens",
                json=body,
                headers={"X-API-KEY": self._client.api_key},
            )
        except httpx.HTTPError as exc:
            raise LivemorphError(
                f"Failed to create token: {exc}", ErrorCode.TOKEN_CREATE_ERROR
            ) from None
        if response.status_code != 200:
            text = response.text.strip()[:500]
            code = (
                ErrorCode.INVALID_API_KEY
                if response.status_code == 401
                else ErrorCode.TOKEN_CREATE_ERROR
            )
            raise LivemorphError(f"Failed to create token: {response.status_code} - {text}", code)
        try:
            data = response.json()
            return ClientToken(
                api_key=str(data["apiKey"]),
                expires_at=str(data["expiresAt"]),
                permissions=data.get("permissions"),
                constraints=data.get("constraints"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LivemorphError(
                "Failed to create token: malformed response", ErrorCode.TOKEN_CREATE_ERROR
            ) from None


class Client:
    """A connection to one livemorph server with one key; make it with `create_client()`."""

    def __init__(
        self,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 30.0,
        ssl: SSLContext | None = None,
    ) -> None:
        if not api_key or not api_key.strip():
            raise LivemorphError(
                f"missing API key: pass api_key or set {API_KEY_ENV}", ErrorCode.INVALID_API_KEY
            )
        self._api_key = api_key.strip()
        self.base_url = validate_base_url(base_url)
        self.ws_base_url = "ws" + self.base_url[len("http") :]
        #: What https:// and wss:// trust (None: the system's certificates).
        self.ssl = ssl
        self._http = httpx.AsyncClient(
            transport=transport,
            timeout=timeout,
            headers={"User-Agent": USER_AGENT},
            verify=ssl if ssl is not None else True,
        )
        self._sessions: set[_LiveConnection] = set()
        self.tokens = TokensClient(self)
        self.realtime = RealtimeAPI(self)
        self.jobs = JobsClient(self)

    @property
    def api_key(self) -> str:
        return self._api_key

    async def list_models(self) -> list[ModelSpec]:
        """The server's realtime model catalog (`GET /v1/models`)."""
        try:
            response = await self._http.get(f"{self.base_url}/v1/models")
        except httpx.HTTPError as exc:
            raise LivemorphError(f"cannot list models: {exc}", ErrorCode.SERVER_ERROR) from None
        if response.status_code != 200:
            raise LivemorphError(
                f"cannot list models: HTTP {response.status_code}", ErrorCode.SERVER_ERROR
            )
        data = response.json()
        items = data.get("models", data) if isinstance(data, dict) else data
        try:
            return [
                ModelSpec(
                    name=str(m["name"]),
                    fps=int(m["fps"]),
                    width=int(m["width"]),
                    height=int(m["height"]),
                    kind=str(m.get("kind", "")),
                    speeds=tuple(str(s) for s in m.get("speeds") or ()),
                    resolutions=tuple(str(r) for r in m.get("resolutions") or ("720p",)),
                    alias_of=None if m.get("alias_of") is None else str(m["alias_of"]),
                )
                for m in items
            ]
        except (KeyError, TypeError, ValueError):
            raise LivemorphError(
                "cannot list models: malformed response", ErrorCode.SERVER_ERROR
            ) from None

    async def edit_image(
        self,
        model: str,
        image: ImageInput,
        *,
        prompt: str,
        reference_image: ImageInput | None = None,
        enhance_prompt: bool = True,
    ) -> bytes:
        """Edit one picture (`POST /v1/generate/{model}`, e.g. `lucy-image-2`): the edited
        picture's bytes, its size, PNG (JPEG for a JPEG)."""
        return await edit_image(
            self,
            model,
            image,
            prompt=prompt,
            reference_image=reference_image,
            enhance_prompt=enhance_prompt,
        )

    async def aclose(self) -> None:
        """Disconnect every session this client started, then close its HTTP pool."""
        await asyncio.gather(
            *(session.disconnect() for session in list(self._sessions)), return_exceptions=True
        )
        await self._http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"


def validate_base_url(url: str) -> str:
    """The URL without a trailing slash; http(s) with a host, or INVALID_BASE_URL."""
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        valid = False
    if not valid:
        raise LivemorphError(f"Invalid base URL: {url!r}", ErrorCode.INVALID_BASE_URL)
    return urlunsplit(parts).rstrip("/")


def create_client(
    api_key: str | None = None,
    base_url: str | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    ssl: SSLContext | None = None,
) -> Client:
    """A client for the server at `base_url` (else `LIVEMORPH_BASE_URL`, else local :8000).

    The key comes from `api_key`, else `LIVEMORPH_API_KEY`; it may be a permanent key or a
    client token. `ssl` is what an https:// server's certificate is checked against, for
    its REST calls and its WebSockets alike: for a server on `--tls self-signed`,
    `ssl.create_default_context(cafile="cert.pem")` with the certificate it made.
    """
    key = api_key or os.environ.get(API_KEY_ENV, "").strip()
    if not key:
        raise LivemorphError(
            f"missing API key: pass api_key or set {API_KEY_ENV}", ErrorCode.INVALID_API_KEY
        )
    url = base_url or os.environ.get(BASE_URL_ENV, "").strip() or DEFAULT_BASE_URL
    return Client(key, url, transport=transport, ssl=ssl)
