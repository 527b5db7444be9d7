"""Versioned schema migrations (Alembic), run by `Store.open()` so `livemorph serve` migrates
on start. The scripts live in storage/migrations/versions/; schema.py is their sum.

A database created before migrations existed (tables, no `alembic_version`) is stamped at
the first revision, then upgraded like any other.

To write a new migration: edit schema.py, then
`python -c "from alembic import command; from livemorph.storage.migrate import alembic_config;
command.revision(alembic_config(), 'what changed', rev_id='0003')"` and fill in the script.
"""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

logger = logging.getLogger(__name__)

#: The revision whose tables existed before livemorph had migrations.
BASELINE = "0001"

#: Any constant: PostgreSQL nodes starting together take turns migrating.
_PG_LOCK_ID = 0x6C6D6967


def alembic_config(url: str | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", "livemorph.storage:migrations")
    if url:
        config.set_main_option("sqlalchemy.url", url)
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade(connection: Connection, revision: str = "head") -> None:
    """Bring the schema on `connection` up to `revision`, inside the caller's transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
    config = alembic_config()
    config.attributes["connection"] = connection
    tables = set(inspect(connection).get_table_names())
    if "api_keys" in tables and "alembic_version" not in tables:
        logger.info("stamping a database made before migrations at revision %s", BASELINE)
        command.stamp(config, BASELINE)
    before = current_revision(connection)
    command.upgrade(config, revision)
    after = current_revision(connection)
    if after != before:
        logger.info("database schema migrated from %s to %s", before or "empty", after)
