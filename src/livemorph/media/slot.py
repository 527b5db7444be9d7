"""A one-item hand-off that keeps only the newest value.

Between a producer that runs at camera rate and a consumer that may be slower (the
engine, an encoder), a queue would let latency grow without bound. A slot overwrites:
the consumer always gets the newest item and stale ones are dropped and counted.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds at most one item; `put` replaces, `get` waits for an item and takes it."""

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def put(self, item: T) -> None:
        if self._closed:
            return
        if self._item is not None:
            self.dropped += 1
        self._item = item
        self._full.set()

    def take_nowait(self) -> T | None:
        item, self._item = self._item, None
        self._full.clear()
        return item

    async def get(self) -> T:
        """Wait for an item and take it; raises `SlotClosed` once closed and empty."""
        while self._item is None:
            if self._closed:
                raise SlotClosed
            await self._full.wait()
        item = self.take_nowait()
        assert item is not None
        return item

    @property
    def ready(self) -> asyncio.Event:
        """Set while an item is waiting (or the slot is closed)."""
        return self._full

    def close(self) -> None:
        self._closed = True
        self._full.set()

    @property
    def closed(self) -> bool:
        return self._closed


class SlotClosed(Exception):
    """The slot was closed: no more items will come."""
