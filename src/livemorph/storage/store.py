"""Keys and client tokens: minted here, stored only as SHA-256 hashes, checked in constant time.

Secrets are 256-bit random strings, so a fast hash is the right tool (no password
stretching needed); the hash is the lookup key, and the stored hash is compared again
with `hmac.compare_digest` so no branch depends on how much of a guess was right.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import event, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .schema import api_keys, client_tokens, metadata

API_KEY_PREFIX = "lm_"
CLIENT_TOKEN_PREFIX = "ek_"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ClientToken:
    id: str
    key_id: str
    expires_at: datetime
    allowed_models: list[str] | None = None
    constraints: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a permanent key, or a client token minted from one."""

    key_id: str
    token: ClientToken | None = None

    @property
    def is_client_token(self) -> bool:
        return self.token is not None

    def may_use(self, model: str) -> bool:
        allowed = self.token.allowed_models if self.token else None
        return not allowed or model in allowed

    @property
    def max_session_seconds(self) -> float | None:
        constraints = (self.token.constraints if self.token else None) or {}
        value = (constraints.get("realtime") or {}).get("maxSessionDuration")
        return float(value) if value else None


class Store:
    """The storage layer; `url` is any SQLAlchemy async URL (SQLite by default)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: AsyncEngine = create_async_engine(url)
        if url.startswith("sqlite"):
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> Store:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite+aiosqlite:///{data_dir / 'livemorph.db'}")

    async def open(self) -> None:
        async with self._engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

    async def close(self) -> None:
        await self._engine.dispose()

    # -- API keys ---------------------------------------------------------------------

    async def create_api_key(self, name: str) -> tuple[str, ApiKey]:
        """Mint a permanent key; the plaintext is returned once and never stored."""
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(id=secrets.token_hex(8), name=name, created_at=utcnow())
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=record.id,
                    name=record.name,
                    key_hash=hash_secret(secret),
                    created_at=record.created_at,
                )
            )
        return secret, record

    async def count_api_keys(self) -> int:
        async with self._engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(api_keys))).scalar())

    # -- client tokens ----------------------------------------------------------------

    async def create_client_token(
        self,
        key_id: str,
        expires_in: int,
        allowed_models: list[str] | None = None,
        constraints: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> tuple[str, ClientToken]:
        secret = CLIENT_TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        token = ClientToken(
            id=secrets.token_hex(8),
            key_id=key_id,
            expires_at=now + timedelta(seconds=expires_in),
            allowed_models=allowed_models,
            constraints=constraints,
            metadata=metadata,
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(client_tokens).values(
                    id=token.id,
                    token_hash=hash_secret(secret),
                    key_id=key_id,
                    created_at=now,
                    expires_at=token.expires_at,
                    allowed_models=allowed_models,
                    constraints=constraints,
                    metadata=metadata,
                )
            )
        return secret, token

    # -- authentication ---------------------------------------------------------------

    async def authenticate(self, secret: str | None) -> Principal | None:
        """The principal for a key or an unexpired client token, else None."""
        if not secret or len(secret) > 256:
            return None
        digest = hash_secret(secret)
        async with self._engine.connect() as conn:
            if secret.startswith(CLIENT_TOKEN_PREFIX):
                row = (
                    await conn.execute(
                        select(client_tokens, api_keys.c.revoked_at)
                        .join(api_keys, api_keys.c.id == client_tokens.c.key_id)
                        .where(client_tokens.c.token_hash == digest)
                    )
                ).first()
                if row is None or not hmac.compare_digest(row.token_hash, digest):
                    return None
                if row.revoked_at is not None or _aware(row.expires_at) <= utcnow():
                    return None
                token = ClientToken(
                    id=row.id,
                    key_id=row.key_id,
                    expires_at=_aware(row.expires_at),
                    allowed_models=row.allowed_models,
                    constraints=row.constraints,
                    metadata=row.metadata,
                )
                return Principal(key_id=row.key_id, token=token)
            row = (
                await conn.execute(select(api_keys).where(api_keys.c.key_hash == digest))
            ).first()
            if row is None or not hmac.compare_digest(row.key_hash, digest):
                return None
            if row.revoked_at is not None:
                return None
            return Principal(key_id=row.id)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
