"""Credits per key, usage per key/day/model, and one usage row per session.

Revision ID: 0002
Revises: 0001
Create Date: 2025-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("api_keys", sa.Column("credit_seconds", sa.BigInteger, nullable=True))
    op.create_table(
        "usage_daily",
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("day", sa.Date, primary_key=True),
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("seconds", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "usage_sessions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("token_metadata", sa.JSON, nullable=True),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seconds", sa.Integer, nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_reason", sa.String(64), nullable=True),
    )
    op.create_index("ix_usage_sessions_key_started", "usage_sessions", ["key_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_usage_sessions_key_started", table_name="usage_sessions")
    op.drop_table("usage_sessions")
    op.drop_table("usage_daily")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("credit_seconds")
