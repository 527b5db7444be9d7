"""Durable state: API keys, client tokens, credits, usage and batch jobs (SQLite or
PostgreSQL), and the jobs' files."""

from .job_files import DiskBudgetExceeded, JobFiles
from .jobs import Job, JobStatus, JobStore
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
    "DiskBudgetExceeded",
    "Job",
    "JobFiles",
    "JobStatus",
    "JobStore",
    "KeyNotFound",
    "Principal",
    "SessionUsage",
    "Store",
    "UsageDay",
    "async_database_url",
]
