"""The sessions this node hosts, by id."""

from __future__ import annotations

import asyncio

from .session import Session


class SessionRegistry:
    """Sessions by id, and how many each key runs (a client token counts for its key)."""

    def __init__(self, max_sessions: int | None = None) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._per_key: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def full(self) -> bool:
        return self.max_sessions is not None and len(self._sessions) >= self.max_sessions

    def count_for_key(self, key_id: str) -> int:
        return self._per_key.get(key_id, 0)

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session
        key_id = session.principal.key_id
        self._per_key[key_id] = self._per_key.get(key_id, 0) + 1

    def remove(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        key_id = session.principal.key_id
        left = self._per_key.get(key_id, 0) - 1
        if left > 0:
            self._per_key[key_id] = left
        else:
            self._per_key.pop(key_id, None)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self._sessions.values())))
