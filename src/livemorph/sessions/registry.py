"""The sessions this node hosts, by id."""

from __future__ import annotations

import asyncio

from .session import Session


class SessionRegistry:
    """Sessions by id, and how many each key runs (a client token counts for its key)."""

    def __init__(self, max_sessions: int | None = None) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def all(self) -> list[Session]:
        """The sessions now, as a list: safe to keep while sessions come and go."""
        return list(self._sessions.values())

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    @property
    def full(self) -> bool:
        return self.max_sessions is not None and len(self._sessions) >= self.max_sessions

    def count_for_key(self, key_id: str) -> int:
        return sum(1 for s in self._sessions.values() if s.principal.key_id == key_id)

    def add(self, session: Session) -> None:
        self._sessions[session.id] = session

    def remove(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self._sessions.values())))
