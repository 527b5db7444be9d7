"""Alembic's entry point for livemorph's migrations.

`Store.open()` runs them (storage/migrate.py) on a connection it hands over in
`config.attributes["connection"]`. Offline mode (`--sql`) prints the SQL for a URL instead,
for operators who apply schema changes by hand.
"""

from __future__ import annotations

from alembic import context

from livemorph.storage.schema import metadata


def run_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("livemorph's migrations run through Store.open() (storage/migrate.py)")
    # Batch mode lets later migrations alter columns on SQLite, which lacks most ALTERs.
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
