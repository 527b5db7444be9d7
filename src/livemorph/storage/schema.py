"""Tables, as SQLAlchemy Core metadata, so the same code runs on SQLite and PostgreSQL.

This is the schema at the newest migration (storage/migrations/versions/); change both
together. Only portable types: strings, integers, dates, timezone-aware datetimes, JSON.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    # Seconds of generation left; NULL means unlimited (no credits were ever granted).
    Column("credit_seconds", BigInteger, nullable=True),
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

# Seconds of generation per key, UTC day and model: what `GET /v1/usage` reads.
usage_daily = Table(
    "usage_daily",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("day", Date, primary_key=True),
    Column("model", String(64), primary_key=True),
    Column("seconds", BigInteger, nullable=False),
)

# One row per session, so a client token's metadata stays with the usage it caused.
usage_sessions = Table(
    "usage_sessions",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("token_id", String(32), nullable=True),
    Column("token_metadata", JSON, nullable=True),
    Column("model", String(64), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Column("seconds", Integer, nullable=False),
    Column("ended_at", DateTime(timezone=True), nullable=True),
    Column("end_reason", String(64), nullable=True),
)

Index("ix_usage_sessions_key_started", usage_sessions.c.key_id, usage_sessions.c.started_at)

# Batch jobs: one row per job, its input and output files in the jobs directory (paths
# relative to it). Nodes claim pending jobs from here (storage/jobs.py) and hold them by a
# lease they renew; a job whose lease ran out is its dead node's, and goes back to pending.
jobs = Table(
    "jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("model", String(64), nullable=False),
    # pending | processing | completed | failed
    Column("status", String(16), nullable=False),
    Column("params", JSON, nullable=True),
    Column("input_path", String(1024), nullable=False),
    Column("input_bytes", BigInteger, nullable=False),
    Column("output_path", String(1024), nullable=True),
    Column("output_bytes", BigInteger, nullable=True),
    Column("error", Text, nullable=True),
    # How many times a node has started it.
    Column("attempts", Integer, nullable=False),
    Column("claimed_by", String(200), nullable=True),
    Column("lease_until", DateTime(timezone=True), nullable=True),
    # Seconds taken off the key's credits when it completed; NULL until then, so never twice.
    Column("charged_seconds", BigInteger, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=True),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    # When its files and row are deleted: set when it finishes, by the retention setting.
    Column("expires_at", DateTime(timezone=True), nullable=True),
    # The share (0..1) of its frames done while it runs, as its node last wrote it.
    Column("progress", Float, nullable=True),
)

Index("ix_jobs_status_created", jobs.c.status, jobs.c.created_at)
Index("ix_jobs_key_created", jobs.c.key_id, jobs.c.created_at)
Index("ix_jobs_expires_at", jobs.c.expires_at)

# Uploaded files (`/v1/files`): one row per file, its bytes in the jobs directory (the path
# relative to it), seen only by the key that uploaded it, deleted once `expires_at` passes
# (NULL: kept until the key deletes it).
files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    # The name the client gave it, if any.
    Column("name", String(255), nullable=True),
    Column("content_type", String(255), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("path", String(1024), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
)

Index("ix_files_expires_at", files.c.expires_at)
