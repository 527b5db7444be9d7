"""Uploaded files in the database (`/v1/files`): a key uploads a file once and names it by
id afterwards, until it expires or the key deletes it.

A file is a row of `files` (schema.py); its bytes live in the jobs directory
(storage/job_files.py, a folder named by the file's id), the path here relative to it, and
count toward the same disk budget as the jobs' files. A file is seen only with the key that
uploaded it: another key's file is None here, as a missing one.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, select

from ..protocol import FILE_ID_PREFIX
from .schema import files
from .store import Store, _aware, _maybe_aware


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    key_id: str
    name: str | None
    content_type: str
    bytes: int
    #: Relative to the jobs directory.
    path: str
    created_at: datetime
    #: None: kept until deleted.
    expires_at: datetime | None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _file(row: Any) -> StoredFile:
    return StoredFile(
        id=row.id,
        key_id=row.key_id,
        name=row.name,
        content_type=row.content_type,
        bytes=int(row.bytes),
        path=row.path,
        created_at=_aware(row.created_at),
        expires_at=_maybe_aware(row.expires_at),
    )


def new_file_id() -> str:
    return FILE_ID_PREFIX + secrets.token_hex(12)


class FileStore:
    """Files on a `Store`'s database and clock."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine = store._engine

    def now(self) -> datetime:
        return self.store.clock()

    async def create(
        self,
        file_id: str,
        key_id: str,
        name: str | None,
        content_type: str,
        size: int,
        path: str,
        ttl: timedelta | None,
    ) -> StoredFile:
        """A file whose bytes are already written at `path`; kept `ttl` (None: until
        deleted)."""
        now = self.now()
        values: dict[str, Any] = {
            "id": file_id,
            "key_id": key_id,
            "name": name,
            "content_type": content_type,
            "bytes": size,
            "path": path,
            "created_at": now,
            "expires_at": None if ttl is None else now + ttl,
        }
        async with self._engine.begin() as conn:
            await conn.execute(files.insert().values(**values))
            row = (await conn.execute(select(files).where(files.c.id == file_id))).one()
        return _file(row)

    async def get(self, file_id: str, key_id: str) -> StoredFile | None:
        """The file, if `key_id` uploaded it (expired or not: see `StoredFile.expired`)."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(files).where(and_(files.c.id == file_id, files.c.key_id == key_id))
                )
            ).first()
        return None if row is None else _file(row)

    async def delete(self, file_id: str, key_id: str | None = None) -> StoredFile | None:
        """Forget the file (its bytes are the caller's to delete), if `key_id` uploaded it
        (None: whoever did); the row it was, or None when there was none."""
        condition = files.c.id == file_id
        if key_id is not None:
            condition = and_(condition, files.c.key_id == key_id)
        async with self._engine.begin() as conn:
            row = (await conn.execute(delete(files).where(condition).returning(files))).first()
        return None if row is None else _file(row)

    async def expired(self, limit: int = 100) -> list[StoredFile]:
        """Files past their expiry, oldest first: delete their bytes, then `delete` them."""
        async with self._engine.connect() as conn:
            rows = await conn.execute(
                select(files)
                .where(files.c.expires_at <= self.now())
                .order_by(files.c.expires_at, files.c.id)
                .limit(limit)
            )
            return [_file(row) for row in rows]

    async def bytes_in_use(self) -> int:
        """Bytes the files in the database hold, for the disk budget."""
        async with self._engine.connect() as conn:
            total = (
                await conn.execute(select(func.coalesce(func.sum(files.c.bytes), 0)))
            ).scalar_one()
        return int(total)
