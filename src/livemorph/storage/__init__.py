"""Durable state: API keys, client tokens, credits and usage (SQLite or PostgreSQL)."""

from .store import (
    AmbiguousKey,
    ApiKey,
    ClientToken,
    KeyNotFound,
    Principal,
    SessionUsage,
    Store,
    UsageDay,
    async_database_url,
)

__all__ = [
    "AmbiguousKey",
    "ApiKey",
    "ClientToken",
    "KeyNotFound",
    "Principal",
    "SessionUsage",
    "Store",
    "UsageDay",
    "async_database_url",
]
