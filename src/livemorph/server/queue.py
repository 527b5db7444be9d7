"""The line a client waits in while a node is full.

Decart's current clients (those that send `livekit_join`) wait for room instead of failing:
they hear `queue_position` while they wait and carry on when `livekit_room_info` arrives,
the browser one without a timeout while it is told its place. A full node keeps them in
one first-come, first-served line, bounded in length (`--queue-size`) and in time
(`--queue-wait`); past either, a client hears the same at-capacity refusal as a client of
the direct protocol, which has no way to wait.

Only the head of the line is admitted: it asks again whenever a session ends (`poke`) and
once a second besides, because room also comes back without a session ending (capacity's
estimate, an engine that was full). Everyone behind it hears their place when it changes.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

from .limits import AT_CAPACITY

#: How often the head of the line asks again without being poked.
RECHECK = 1.0


class AdmissionQueue:
    """Clients waiting for a session on this node, in the order they came."""

    def __init__(self, size: int, wait: float) -> None:
        self.size = size
        self.wait = wait
        self._line: list[object] = []
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._line)

    @property
    def open(self) -> bool:
        """Whether one more client may join the line."""
        return self.wait > 0 and len(self._line) < self.size

    def poke(self) -> None:
        """Something changed (a session ended, someone left the line): everyone looks."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_turn(
        self,
        admit: Callable[[], Awaitable[str | None]],
        tell: Callable[[int, int], Awaitable[None]],
        gone: asyncio.Event,
    ) -> str | None:
        """Wait in line until `admit` (asked only at the head) returns None: admitted.
        Returns the refusal that ends the wait instead: one other than at-capacity
        (waiting would not help), at-capacity when the wait ran out, or None-and-`gone`
        when the client left. `tell(position, length)` is called whenever either changes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        ticket = object()
        self._line.append(ticket)
        told: tuple[int, int] | None = None
        try:
            while not gone.is_set():
                place = (self._line.index(ticket) + 1, len(self._line))
                if place != told:
                    await tell(*place)
                    told = place
                if place[0] == 1:
                    refused = await admit()
                    if refused != AT_CAPACITY:
                        return refused
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return AT_CAPACITY
                changed = asyncio.ensure_future(self._changed.wait())
                left = asyncio.ensure_future(gone.wait())
                await asyncio.wait(
                    {changed, left},
                    timeout=min(remaining, RECHECK),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                changed.cancel()
                left.cancel()
            return None
        finally:
            self._line.remove(ticket)
            self.poke()


class Inbox:
    """A socket's frames, read ahead of the loop that handles them: a client waiting in
    line keeps talking (the browser client sends its initial state at once), and its
    leaving must be noticed while it waits. Frames read are handled later, in order;
    past `limit` unhandled frames, reading pauses."""

    def __init__(self, frames: AsyncIterator[str | bytes], limit: int = 32) -> None:
        self.gone = asyncio.Event()
        self._frames: deque[str | bytes] = deque()
        self._limit = limit
        self._arrived = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._task = asyncio.create_task(self._read(frames), name="inbox")

    async def _read(self, frames: AsyncIterator[str | bytes]) -> None:
        try:
            async for frame in frames:
                self._frames.append(frame)
                self._arrived.set()
                if len(self._frames) >= self._limit:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self.gone.set()
            self._arrived.set()

    def unread(self, frame: str | bytes) -> None:
        """Put a frame back, to be the next one taken."""
        self._frames.appendleft(frame)
        self._arrived.set()

    async def next(self) -> str | bytes | None:
        """The next frame; None once the socket has closed and every frame was taken."""
        while not self._frames:
            if self.gone.is_set():
                return None
            self._arrived.clear()
            await self._arrived.wait()
        self._room.set()
        return self._frames.popleft()

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while (frame := await self.next()) is not None:
            yield frame

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
