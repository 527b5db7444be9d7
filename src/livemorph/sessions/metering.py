"""Metering: every second of generation counted against the key, and credits enforced.

Session knows only the `Meter` seam; `StoreMeter` writes through the storage layer. A
client token's seconds count for the key that minted it, and its metadata is kept with
the session's usage row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..storage import Principal, Store

if TYPE_CHECKING:
    from .session import Session

logger = logging.getLogger(__name__)

#: The `error` a session hears when its key has no credits left. "permission denied" makes
#: clients give up at once (docs/protocol.md, Error texts): retrying cannot bring credits back.
INSUFFICIENT_CREDITS = (
    "permission denied: insufficient credits, this key has no generation time left"
)

#: The `generation_ended` reason when credits run out mid-session.
INSUFFICIENT_CREDITS_REASON = "insufficient_credits"


class Meter(Protocol):
    async def admits(self, principal: Principal) -> bool:
        """Whether this principal may open a session now (it has credits left)."""
        ...

    async def begin(self, session: Session) -> None:
        """A session was opened."""
        ...

    async def tick(self, session: Session) -> bool:
        """`session.seconds` grew by one; False when the key's credits have run out."""
        ...

    async def end(self, session: Session) -> None:
        """The session ended (`session.end_reason` says why); nothing more will be counted."""
        ...


class Unmetered:
    """Counts nothing, refuses nothing: for sessions outside any server (tests, tools)."""

    async def admits(self, principal: Principal) -> bool:
        return True

    async def begin(self, session: Session) -> None:
        return None

    async def tick(self, session: Session) -> bool:
        return True

    async def end(self, session: Session) -> None:
        return None


class StoreMeter:
    """Writes each second as it is generated, in one transaction with the credit it costs.

    A failed write is logged and its seconds are carried into the next one, so a database
    hiccup delays the record rather than losing it. A write is never cut in half by the
    session ending: `end` waits for the one under way.
    """

    def __init__(
        self, store: Store, on_recorded: Callable[[str, int, bool], None] | None = None
    ) -> None:
        """`on_recorded(model, seconds, metered)` hears each write that went through
        (`metered`: the key has credits, so they were taken off them): the metrics."""
        self._store = store
        self._on_recorded = on_recorded
        self._recorded: dict[str, int] = {}
        self._writes: dict[str, asyncio.Future[bool]] = {}

    async def admits(self, principal: Principal) -> bool:
        left = await self._store.credits_left(principal.key_id)
        return left is None or left > 0

    async def begin(self, session: Session) -> None:
        await self._store.start_session_usage(session.id, session.principal, session.spec.name)
        self._recorded[session.id] = 0

    async def tick(self, session: Session) -> bool:
        write = asyncio.ensure_future(self._record(session))
        self._writes[session.id] = write
        return await asyncio.shield(write)

    async def end(self, session: Session) -> None:
        write = self._writes.pop(session.id, None)
        if write is not None:
            await asyncio.gather(write, return_exceptions=True)
        try:
            if session.seconds > self._recorded.get(session.id, 0):
                await self._record(session)
            await self._store.end_session_usage(session.id, session.end_reason or "ended")
        except Exception:
            logger.exception("session %s: its end could not be recorded", session.id)
        finally:
            self._recorded.pop(session.id, None)

    async def _record(self, session: Session) -> bool:
        seconds = session.seconds
        pending = seconds - self._recorded.get(session.id, 0)
        try:
            left = await self._store.record_usage(
                session.id, session.principal.key_id, session.spec.name, pending
            )
        except Exception:
            logger.exception(
                "session %s: %ss of usage not recorded yet; retrying next second",
                session.id,
                pending,
            )
            return True
        self._recorded[session.id] = seconds
        if self._on_recorded is not None and pending > 0:
            self._on_recorded(session.spec.name, pending, left is not None)
        return left is None or left > 0
