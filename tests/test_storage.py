"""The storage layer on both backends: migrations, keys, tokens, credits and usage.

Every test here runs twice, on SQLite and on a real PostgreSQL server (tests/postgres.py).
The store runs on a clock the test moves (tests/support.py), so expiry and the usage day
are decided by the test, never by when it happens to run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, select, text

from livemorph.sessions.metering import StoreMeter
from livemorph.storage import (
    AmbiguousKey,
    KeyNotFound,
    Principal,
    Store,
    UsageDay,
    async_database_url,
    migrate,
)
from livemorph.storage.schema import api_keys, client_tokens, metadata
from tests.support import FakeClock

#: Where the stores' clocks start: a minute before midnight, so a test can cross into the
#: next UTC day by moving its clock.
START = datetime(2030, 1, 1, 23, 59, tzinfo=UTC)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def store(database_url: str, clock: FakeClock) -> AsyncIterator[Store]:
    store = Store(database_url, clock=clock.utc)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def reopened(store: Store) -> Store:
    await store.close()
    again = Store(store.url, store.clock)
    await again.open()
    return again


def session_like(store_session_id: str, principal: Principal, model: str = "mirage") -> Any:
    """What a meter reads of a Session: id, principal, spec.name, seconds, end_reason."""
    return SimpleNamespace(
        id=store_session_id,
        principal=principal,
        spec=SimpleNamespace(name=model),
        seconds=0,
        end_reason=None,
    )


# -- URLs and migrations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@db:5432/live", "postgresql+asyncpg://u:p@db:5432/live"),
        ("postgres://u@db/live", "postgresql+asyncpg://u@db/live"),
        ("postgresql+asyncpg://u@db/live", "postgresql+asyncpg://u@db/live"),
        ("postgresql://u@db/live?sslmode=require", "postgresql+asyncpg://u@db/live?ssl=require"),
        ("sqlite:////var/lib/lm.db", "sqlite+aiosqlite:////var/lib/lm.db"),
        ("sqlite+aiosqlite:///lm.db", "sqlite+aiosqlite:///lm.db"),
    ],
)
def test_plain_urls_map_to_the_async_drivers(given: str, expected: str) -> None:
    assert async_database_url(given) == expected


def test_a_url_that_is_not_one_is_refused() -> None:
    with pytest.raises(Exception, match="parse"):
        Store("not a database url")


async def test_migrations_reach_head_and_match_the_schema(store: Store) -> None:
    assert await store.schema_revision() == migrate.head_revision()

    def differences(conn: Connection) -> list[Any]:
        return compare_metadata(MigrationContext.configure(conn), metadata)

    async with store._engine.connect() as conn:
        assert await conn.run_sync(differences) == [], "schema.py and the migrations disagree"


async def test_opening_again_changes_nothing(store: Store) -> None:
    secret, key = await store.create_api_key("kept")
    again = await reopened(store)
    try:
        assert await again.schema_revision() == migrate.head_revision()
        assert (await again.authenticate(secret)) == Principal(key_id=key.id)
    finally:
        await again.close()


async def test_a_database_from_before_migrations_is_stamped_and_upgraded(
    database_url: str,
) -> None:
    old = Store(database_url)
    try:
        async with old._engine.begin() as conn:
            await conn.run_sync(migrate.upgrade, migrate.BASELINE)
            await conn.execute(text("DROP TABLE alembic_version"))  # as create_all left it
        secret, key = await _legacy_key(old)
    finally:
        await old.close()
    store = Store(database_url)
    await store.open()
    try:
        assert await store.schema_revision() == migrate.head_revision()
        assert await store.authenticate(secret) == Principal(key_id=key)
        assert await store.credits_left(key) is None, "old keys stay unlimited"
    finally:
        await store.close()


async def _legacy_key(store: Store) -> tuple[str, str]:
    """A key written with the columns revision 0001 had (no credits column yet)."""
    from livemorph.storage.store import hash_secret

    secret, key_id = "lm_legacy_" + "x" * 30, "legacy0000000001"
    async with store._engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO api_keys (id, name, key_hash, created_at) "
                "VALUES (:id, 'legacy', :hash, :now)"
            ),
            {"id": key_id, "hash": hash_secret(secret), "now": store.clock()},
        )
    return secret, key_id


async def test_downgrade_to_baseline_and_back(store: Store) -> None:
    async with store._engine.begin() as conn:
        await conn.run_sync(_downgrade_to_baseline)
        tables = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
    assert "usage_daily" not in tables and "api_keys" in tables
    await store.open()
    assert await store.schema_revision() == migrate.head_revision()


def _downgrade_to_baseline(conn: Connection) -> None:
    from alembic import command

    config = migrate.alembic_config()
    config.attributes["connection"] = conn
    command.downgrade(config, migrate.BASELINE)


# -- keys and tokens ----------------------------------------------------------------------


async def test_keys_are_stored_hashed_and_shown_once(store: Store) -> None:
    secret, key = await store.create_api_key("alice")
    token, _ = await store.create_client_token(key.id, expires_in=60, metadata={"u": 1})
    assert secret.startswith("lm_") and len(secret) > 40
    async with store._engine.connect() as conn:
        stored = [tuple(row) for row in await conn.execute(select(api_keys))]
        stored += [tuple(row) for row in await conn.execute(select(client_tokens))]
    everything = repr(stored)
    assert secret not in everything and token not in everything
    assert secret[3:] not in everything and token[3:] not in everything
    assert secret not in repr(await store.list_api_keys())


async def test_authentication(store: Store) -> None:
    secret, key = await store.create_api_key("alice")
    assert await store.authenticate(secret) == Principal(key_id=key.id)
    for bad in (None, "", secret[:-1], secret + "x", "ek_" + secret[3:], "x" * 10_000):
        assert await store.authenticate(bad) is None


async def test_find_by_id_or_unique_name(store: Store, clock: FakeClock) -> None:
    _, alice = await store.create_api_key("alice")
    clock.advance(1)
    _, bob1 = await store.create_api_key("bob")
    clock.advance(1)
    _, bob2 = await store.create_api_key("bob")
    assert (await store.find_api_key("alice")).id == alice.id
    assert (await store.find_api_key(bob1.id)).id == bob1.id
    with pytest.raises(AmbiguousKey, match="use the id"):
        await store.find_api_key("bob")
    with pytest.raises(KeyNotFound):
        await store.find_api_key("carol")
    assert [k.id for k in await store.list_api_keys()] == [alice.id, bob1.id, bob2.id]


async def test_revoking_refuses_the_key_and_its_tokens(store: Store, clock: FakeClock) -> None:
    secret, key = await store.create_api_key("alice")
    token, _ = await store.create_client_token(key.id, expires_in=600)
    _, other = await store.create_api_key("bob")
    assert await store.authenticate(token) is not None
    revoked = await store.revoke_api_key(key.id)
    assert not revoked.active and revoked.revoked_at is not None
    assert await store.authenticate(secret) is None
    assert await store.authenticate(token) is None
    assert (await store.get_api_key(other.id)).active  # type: ignore[union-attr]
    clock.advance(60)
    again = await store.revoke_api_key(key.id)
    assert again.revoked_at == revoked.revoked_at, "the first revocation time is kept"
    with pytest.raises(KeyNotFound):
        await store.revoke_api_key("nope")


async def test_tokens_expire_on_the_stores_clock(store: Store, clock: FakeClock) -> None:
    secret, key = await store.create_api_key("alice")
    assert key.created_at == START
    token, minted = await store.create_client_token(key.id, expires_in=60)
    assert minted.expires_at == START + timedelta(seconds=60)
    clock.advance(59)
    assert await store.authenticate(token) is not None, "valid until its last second"
    clock.advance(1)
    assert await store.authenticate(token) is None, "expired at expires_at itself"
    assert await store.authenticate(secret) is not None, "the key does not expire"
    revoked = await store.revoke_api_key(key.id)
    assert revoked.revoked_at == START + timedelta(seconds=60)


async def test_usage_counts_on_the_day_of_the_stores_clock(store: Store, clock: FakeClock) -> None:
    _, key = await store.create_api_key("alice")
    await store.start_session_usage("s1", Principal(key_id=key.id), "mirage")
    await store.record_usage("s1", key.id, "mirage", seconds=2)
    clock.advance(60)  # past midnight
    await store.record_usage("s1", key.id, "mirage", seconds=3)
    await store.end_session_usage("s1", "client_disconnected")
    assert await store.usage_by_day(key.id) == [
        UsageDay(date(2030, 1, 1), "mirage", 2),
        UsageDay(date(2030, 1, 2), "mirage", 3),
    ]
    (row,) = await store.session_usage(key.id)
    assert (row.started_at, row.updated_at, row.ended_at) == (START, clock.utc(), clock.utc())


async def test_token_carries_its_limits_and_metadata(store: Store) -> None:
    _, key = await store.create_api_key("alice")
    token, _ = await store.create_client_token(
        key.id,
        expires_in=60,
        allowed_models=["mirage"],
        constraints={"realtime": {"maxSessionDuration": 30}},
        metadata={"user": "ünï", "plan": ["a", 1]},
    )
    principal = await store.authenticate(token)
    assert principal is not None and principal.key_id == key.id
    assert principal.token is not None and principal.token.metadata == {
        "user": "ünï",
        "plan": ["a", 1],
    }
    assert principal.may_use("mirage") and not principal.may_use("lucy_2_rt")
    assert principal.max_session_seconds == 30


# -- credits ------------------------------------------------------------------------------


async def test_credits_are_unlimited_until_granted(store: Store) -> None:
    _, key = await store.create_api_key("alice")
    assert await store.credits_left(key.id) is None
    assert await store.grant_credits(key.id, 5) == 5
    assert await store.grant_credits(key.id, 7) == 12
    assert (await store.get_api_key(key.id)).credit_seconds == 12  # type: ignore[union-attr]
    _, metered = await store.create_api_key("bob", credit_seconds=0)
    assert await store.credits_left(metered.id) == 0


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "10", None])
async def test_grants_must_be_whole_positive_seconds(store: Store, bad: Any) -> None:
    _, key = await store.create_api_key("alice")
    with pytest.raises(ValueError, match="whole seconds"):
        await store.grant_credits(key.id, bad)
    assert await store.credits_left(key.id) is None


async def test_granting_to_a_missing_key(store: Store) -> None:
    with pytest.raises(KeyNotFound):
        await store.grant_credits("nope", 10)
    with pytest.raises(ValueError):
        await store.create_api_key("negative", credit_seconds=-1)


# -- usage --------------------------------------------------------------------------------


async def test_usage_by_key_day_and_model(store: Store) -> None:
    _, key = await store.create_api_key("alice")
    principal = Principal(key_id=key.id)
    day1 = datetime(2025, 3, 1, 23, 59, 59, tzinfo=UTC)
    day2 = day1 + timedelta(seconds=2)
    await store.start_session_usage("s1", principal, "mirage", at=day1)
    await store.start_session_usage("s2", principal, "lucy_2_rt", at=day1)
    for at in (day1, day1, day2):
        await store.record_usage("s1", key.id, "mirage", at=at)
    await store.record_usage("s2", key.id, "lucy_2_rt", seconds=4, at=day2)
    assert await store.usage_by_day(key.id) == [
        UsageDay(date(2025, 3, 1), "mirage", 2),
        UsageDay(date(2025, 3, 2), "lucy_2_rt", 4),
        UsageDay(date(2025, 3, 2), "mirage", 1),
    ]
    assert await store.usage_by_day(key.id, since=date(2025, 3, 2)) == [
        UsageDay(date(2025, 3, 2), "lucy_2_rt", 4),
        UsageDay(date(2025, 3, 2), "mirage", 1),
    ]
    sessions = {row.id: row for row in await store.session_usage(key.id)}
    assert sessions["s1"].seconds == 3 and sessions["s2"].seconds == 4
    assert sessions["s1"].updated_at == day2 and sessions["s1"].started_at == day1


async def test_a_tokens_usage_counts_for_its_key_and_keeps_its_metadata(store: Store) -> None:
    _, key = await store.create_api_key("alice")
    _, other = await store.create_api_key("bob")
    token, _ = await store.create_client_token(key.id, 60, metadata={"user": "u-42"})
    principal = await store.authenticate(token)
    assert principal is not None
    await store.start_session_usage("s1", principal, "mirage")
    await store.record_usage("s1", principal.key_id, "mirage", seconds=3)
    await store.end_session_usage("s1", "client_disconnected")
    await store.end_session_usage("s1", "later")  # ends once
    (row,) = await store.session_usage(key.id)
    assert row.token_id == principal.token.id  # type: ignore[union-attr]
    assert row.token_metadata == {"user": "u-42"}
    assert (row.seconds, row.end_reason) == (3, "client_disconnected")
    assert row.ended_at is not None
    assert [d.seconds for d in await store.usage_by_day(key.id)] == [3]
    assert await store.usage_by_day(other.id) == []
    assert await store.session_usage(other.id) == []


async def test_usage_takes_credits_and_stops_at_zero(store: Store) -> None:
    _, key = await store.create_api_key("alice", credit_seconds=2)
    await store.start_session_usage("s1", Principal(key_id=key.id), "mirage")
    assert await store.record_usage("s1", key.id, "mirage") == 1
    assert await store.record_usage("s1", key.id, "mirage") == 0
    assert await store.record_usage("s1", key.id, "mirage") == 0, "never below zero"
    assert [d.seconds for d in await store.usage_by_day(key.id)] == [3], "usage is all kept"
    assert await store.record_usage("s1", key.id, "mirage", seconds=0) == 0


async def test_concurrent_ticks_all_count(store: Store, clock: FakeClock) -> None:
    """Sessions of one key tick at once: the daily upsert and the credit update are atomic."""
    _, key = await store.create_api_key("alice", credit_seconds=1000)
    principal = Principal(key_id=key.id)
    sessions = [f"s{i}" for i in range(8)]
    for session_id in sessions:
        await store.start_session_usage(session_id, principal, "mirage")
    ticks = [store.record_usage(s, key.id, "mirage") for s in sessions for _ in range(5)]
    await asyncio.gather(*ticks)
    assert await store.usage_by_day(key.id) == [UsageDay(clock.utc().date(), "mirage", 40)]
    assert await store.credits_left(key.id) == 960
    assert {row.seconds for row in await store.session_usage(key.id)} == {5}


async def test_keys_credits_and_usage_survive_a_reopen(store: Store) -> None:
    secret, key = await store.create_api_key("alice", credit_seconds=10)
    await store.start_session_usage("s1", Principal(key_id=key.id), "mirage")
    await store.record_usage("s1", key.id, "mirage", seconds=4)
    again = await reopened(store)
    try:
        assert await again.authenticate(secret) == Principal(key_id=key.id)
        assert await again.credits_left(key.id) == 6
        assert [d.seconds for d in await again.usage_by_day(key.id)] == [4]
    finally:
        await again.close()


# -- the meter on a real store ------------------------------------------------------------


async def test_meter_enforces_credits(store: Store) -> None:
    _, key = await store.create_api_key("alice", credit_seconds=2)
    principal = Principal(key_id=key.id)
    meter = StoreMeter(store)
    assert await meter.admits(principal)
    session = session_like("m1", principal)
    await meter.begin(session)
    results = []
    for _ in range(2):
        session.seconds += 1
        results.append(await meter.tick(session))
    assert results == [True, False], "the tick that spends the last second says stop"
    session.end_reason = "insufficient_credits"
    await meter.end(session)
    assert not await meter.admits(principal)
    (row,) = await store.session_usage(key.id)
    assert (row.seconds, row.end_reason) == (2, "insufficient_credits")
    _, unlimited = await store.create_api_key("bob")
    assert await meter.admits(Principal(key_id=unlimited.id))


async def test_meter_carries_a_failed_write_into_the_next(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key = await store.create_api_key("alice")
    meter = StoreMeter(store)
    session = session_like("m1", Principal(key_id=key.id))
    await meter.begin(session)
    real = store.record_usage
    failures = iter([True])

    async def flaky(*args: Any, **kwargs: Any) -> int | None:
        if next(failures, False):
            raise OSError("database went away")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "record_usage", flaky)
    session.seconds = 1
    assert await meter.tick(session), "a write that failed does not end the session"
    assert await store.usage_by_day(key.id) == []
    session.seconds = 2
    assert await meter.tick(session)
    assert [d.seconds for d in await store.usage_by_day(key.id)] == [2]
    session.seconds, session.end_reason = 3, "client_disconnected"
    await meter.end(session)  # the last second is flushed with the end
    (row,) = await store.session_usage(key.id)
    assert (row.seconds, row.end_reason) == (3, "client_disconnected")
