"""Keys, client tokens, credits and usage, on SQLAlchemy Core: SQLite or PostgreSQL.

Secrets are 256-bit random strings, so a fast hash is the right tool (no password
stretching needed); the hash is the lookup key, and the stored hash is compared again
with `hmac.compare_digest` so no branch depends on how much of a guess was right.

Usage is written every second of generation, in one transaction per tick that also takes
the second off the key's credits, so a crash loses at most the second under way.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    case,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from .schema import api_keys, client_tokens, usage_daily, usage_sessions

API_KEY_PREFIX = "lm_"
CLIENT_TOKEN_PREFIX = "ek_"

#: Drivers the same code runs on; plain URLs are mapped to them.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+psycopg2": "postgresql+asyncpg",
    "postgresql+psycopg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+pysqlite": "sqlite+aiosqlite",
}


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC)


#: What a store asks for the time: an aware UTC datetime. Tests hand in one they move.
WallClock = Callable[[], datetime]


def _aware(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _maybe_aware(moment: datetime | None) -> datetime | None:
    return None if moment is None else _aware(moment)


def async_database_url(url: str) -> str:
    """The async form of a database URL: `postgresql://` runs on asyncpg, `sqlite://` on
    aiosqlite; libpq's `sslmode` becomes asyncpg's `ssl`."""
    parsed = make_url(url)
    parsed = parsed.set(drivername=_ASYNC_DRIVERS.get(parsed.drivername, parsed.drivername))
    if parsed.drivername == "postgresql+asyncpg" and "sslmode" in parsed.query:
        query = dict(parsed.query)
        query["ssl"] = query.pop("sslmode")
        parsed = parsed.set(query=query)
    return parsed.render_as_string(hide_password=False)


class KeyNotFound(LookupError):
    """No API key has that id (or name)."""


class AmbiguousKey(LookupError):
    """More than one API key has that name: use the id."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    name: str
    created_at: datetime
    revoked_at: datetime | None = None
    #: Seconds of generation left; None means unlimited.
    credit_seconds: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


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


@dataclass(frozen=True, slots=True)
class UsageDay:
    """Seconds of generation one key used on one UTC day with one model."""

    day: date
    model: str
    seconds: int


@dataclass(frozen=True, slots=True)
class SessionUsage:
    """One session's usage, with the client token (and its metadata) that opened it."""

    id: str
    key_id: str
    token_id: str | None
    token_metadata: dict[str, Any] | None
    model: str
    started_at: datetime
    updated_at: datetime
    seconds: int
    ended_at: datetime | None
    end_reason: str | None


def _api_key(row: Any) -> ApiKey:
    return ApiKey(
        id=row.id,
        name=row.name,
        created_at=_aware(row.created_at),
        revoked_at=_maybe_aware(row.revoked_at),
        credit_seconds=row.credit_seconds,
    )


_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.name,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.credit_seconds,
)


class Store:
    """The storage layer; `url` is a SQLAlchemy URL (SQLite by default, or PostgreSQL).

    Every "now" the store writes or compares (creation and revocation times, token expiry,
    the day usage counts for) comes from `clock`, so a test can expire a token or cross
    midnight by moving a clock of its own rather than by waiting.
    """

    def __init__(self, url: str, clock: WallClock = utcnow) -> None:
        self.url = async_database_url(url)
        self.clock = clock
        self.dialect = make_url(self.url).get_backend_name()
        options: dict[str, Any] = {}
        if self.dialect == "postgresql":
            options["pool_pre_ping"] = True
        self._engine: AsyncEngine = create_async_engine(self.url, **options)
        if self.dialect == "sqlite":
            event.listen(self._engine.sync_engine, "connect", _sqlite_pragmas)

    @classmethod
    def in_data_dir(cls, data_dir: Path, clock: WallClock = utcnow) -> Store:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite+aiosqlite:///{data_dir / 'livemorph.db'}", clock)

    async def open(self) -> None:
        """Connect, and migrate the schema to the newest version."""
        from . import migrate  # Alembic is loaded only by what opens a store

        async with self._engine.begin() as conn:
            await conn.run_sync(migrate.upgrade)

    async def schema_revision(self) -> str | None:
        from . import migrate

        async with self._engine.connect() as conn:
            return await conn.run_sync(migrate.current_revision)

    async def close(self) -> None:
        await self._engine.dispose()

    # -- API keys ---------------------------------------------------------------------

    async def create_api_key(
        self, name: str, credit_seconds: int | None = None
    ) -> tuple[str, ApiKey]:
        """Mint a permanent key; the plaintext is returned once and never stored."""
        if credit_seconds is not None and credit_seconds < 0:
            raise ValueError("credits cannot be negative")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKey(
            id=secrets.token_hex(8),
            name=name,
            created_at=self.clock(),
            credit_seconds=credit_seconds,
        )
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=record.id,
                    name=record.name,
                    key_hash=hash_secret(secret),
                    created_at=record.created_at,
                    credit_seconds=credit_seconds,
                )
            )
        return secret, record

    async def count_api_keys(self) -> int:
        async with self._engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(api_keys))).scalar_one()

    async def list_api_keys(self) -> list[ApiKey]:
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(*_KEY_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)
            )
            return [_api_key(row) for row in rows]

    async def get_api_key(self, key_id: str) -> ApiKey | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(*_KEY_COLUMNS).where(api_keys.c.id == key_id))).first()
        return None if row is None else _api_key(row)

    async def find_api_key(self, ref: str) -> ApiKey:
        """The key whose id is `ref`, else the one key named `ref`."""
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(*_KEY_COLUMNS).where(or_(api_keys.c.id == ref, api_keys.c.name == ref))
                )
            ).all()
        by_id = [row for row in rows if row.id == ref]
        if by_id:
            return _api_key(by_id[0])
        if not rows:
            raise KeyNotFound(f"no API key with id or name {ref!r}")
        if len(rows) > 1:
            ids = ", ".join(sorted(row.id for row in rows))
            raise AmbiguousKey(f"{len(rows)} API keys are named {ref!r} ({ids}): use the id")
        return _api_key(rows[0])

    async def revoke_api_key(self, key_id: str) -> ApiKey:
        """Revoke a key (and so every client token minted from it) for new sessions.

        Sessions already running go on. Revoking twice keeps the first time."""
        async with self._engine.begin() as conn:
            await conn.execute(
                update(api_keys)
                .where(and_(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)))
                .values(revoked_at=self.clock())
            )
            row = (await conn.execute(select(*_KEY_COLUMNS).where(api_keys.c.id == key_id))).first()
        if row is None:
            raise KeyNotFound(f"no API key with id {key_id!r}")
        return _api_key(row)

    # -- credits ----------------------------------------------------------------------

    async def grant_credits(self, key_id: str, seconds: int) -> int:
        """Add `seconds` of generation to a key's credits; the new balance.

        A key that never had credits is unlimited; its first grant makes it metered."""
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            raise ValueError("credits are granted in whole seconds, more than zero")
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id)
                .values(credit_seconds=func.coalesce(api_keys.c.credit_seconds, 0) + seconds)
            )
            if result.rowcount == 0:
                raise KeyNotFound(f"no API key with id {key_id!r}")
            return int(await _credits(conn, key_id) or 0)

    async def credits_left(self, key_id: str) -> int | None:
        """Seconds of generation the key has left; None when unlimited."""
        async with self._engine.connect() as conn:
            return await _credits(conn, key_id)

    # -- usage ------------------------------------------------------------------------

    async def start_session_usage(
        self, session_id: str, principal: Principal, model: str, at: datetime | None = None
    ) -> None:
        """The usage row of a new session, with the client token that opened it, if any."""
        now = at or self.clock()
        token = principal.token
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(usage_sessions).values(
                    id=session_id,
                    key_id=principal.key_id,
                    token_id=token.id if token else None,
                    token_metadata=token.metadata if token else None,
                    model=model,
                    started_at=now,
                    updated_at=now,
                    seconds=0,
                )
            )

    async def record_usage(
        self, session_id: str, key_id: str, model: str, seconds: int = 1, at: datetime | None = None
    ) -> int | None:
        """Count `seconds` of generation, durably, and take them off the key's credits.

        Returns the credits left (None: unlimited). Credits never go below zero: sessions
        of one key that tick in the same instant may together overdraw by a second each.
        """
        if seconds <= 0:
            return await self.credits_left(key_id)
        now = at or self.clock()
        async with self._engine.begin() as conn:
            await conn.execute(
                update(usage_sessions)
                .where(usage_sessions.c.id == session_id)
                .values(seconds=usage_sessions.c.seconds + seconds, updated_at=now)
            )
            return await charge(conn, key_id, model, seconds, now)

    async def end_session_usage(
        self, session_id: str, reason: str, at: datetime | None = None
    ) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(usage_sessions)
                .where(and_(usage_sessions.c.id == session_id, usage_sessions.c.ended_at.is_(None)))
                .values(ended_at=at or self.clock(), end_reason=reason[:64])
            )

    async def usage_by_day(self, key_id: str, since: date | None = None) -> list[UsageDay]:
        query = select(usage_daily.c.day, usage_daily.c.model, usage_daily.c.seconds).where(
            usage_daily.c.key_id == key_id
        )
        if since is not None:
            query = query.where(usage_daily.c.day >= since)
        async with self._engine.connect() as conn:
            rows = await conn.execute(query.order_by(usage_daily.c.day, usage_daily.c.model))
            return [UsageDay(row.day, row.model, int(row.seconds)) for row in rows]

    async def session_usage(self, key_id: str, limit: int = 100) -> list[SessionUsage]:
        """The key's most recent sessions, newest first."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(usage_sessions)
                .where(usage_sessions.c.key_id == key_id)
                .order_by(usage_sessions.c.started_at.desc(), usage_sessions.c.id)
                .limit(limit)
            )
            return [
                SessionUsage(
                    id=row.id,
                    key_id=row.key_id,
                    token_id=row.token_id,
                    token_metadata=row.token_metadata,
                    model=row.model,
                    started_at=_aware(row.started_at),
                    updated_at=_aware(row.updated_at),
                    seconds=int(row.seconds),
                    ended_at=_maybe_aware(row.ended_at),
                    end_reason=row.end_reason,
                )
                for row in rows
            ]

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
        now = self.clock()
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
        """The principal for an active key or an unexpired client token of one, else None."""
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
                if row.revoked_at is not None or _aware(row.expires_at) <= self.clock():
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


async def _credits(conn: AsyncConnection, key_id: str) -> int | None:
    value = (
        await conn.execute(select(api_keys.c.credit_seconds).where(api_keys.c.id == key_id))
    ).scalar()
    return None if value is None else int(value)


async def charge(
    conn: AsyncConnection, key_id: str, model: str, seconds: int, now: datetime
) -> int | None:
    """Count `seconds` of generation for the key's day and model and take them off its
    credits (never below zero), inside the caller's transaction; the credits left."""
    await conn.run_sync(_add_daily, key_id, now.date(), model, seconds)
    await conn.execute(
        update(api_keys)
        .where(and_(api_keys.c.id == key_id, api_keys.c.credit_seconds.is_not(None)))
        .values(
            credit_seconds=case(
                (api_keys.c.credit_seconds > seconds, api_keys.c.credit_seconds - seconds),
                else_=0,
            )
        )
    )
    return await _credits(conn, key_id)


def _add_daily(conn: Connection, key_id: str, day: date, model: str, seconds: int) -> None:
    """usage_daily[key, day, model] += seconds, as one atomic upsert where the dialect has one."""
    values = {"key_id": key_id, "day": day, "model": model, "seconds": seconds}
    upsert: postgresql.Insert | sqlite.Insert | None = None
    if conn.dialect.name == "postgresql":
        upsert = postgresql.insert(usage_daily)
    elif conn.dialect.name == "sqlite":
        upsert = sqlite.insert(usage_daily)
    if upsert is not None:
        statement = upsert.values(**values)
        conn.execute(
            statement.on_conflict_do_update(
                index_elements=[usage_daily.c.key_id, usage_daily.c.day, usage_daily.c.model],
                set_={"seconds": usage_daily.c.seconds + statement.excluded.seconds},
            )
        )
        return
    where = and_(
        usage_daily.c.key_id == key_id, usage_daily.c.day == day, usage_daily.c.model == model
    )
    result = conn.execute(
        update(usage_daily).where(where).values(seconds=usage_daily.c.seconds + seconds)
    )
    if result.rowcount == 0:
        conn.execute(insert(usage_daily).values(**values))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: every committed tick survives a power cut too, at one fsync per commit.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
