"""Tables, as SQLAlchemy Core metadata, so the same code runs on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Index, MetaData, String, Table

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
)

client_tokens = Table(
    "client_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("allowed_models", JSON, nullable=True),
    Column("constraints", JSON, nullable=True),
    Column("metadata", JSON, nullable=True),
)

Index("ix_client_tokens_key_id", client_tokens.c.key_id)
