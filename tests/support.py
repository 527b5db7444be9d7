"""Small async helpers shared by the tests, and a clock they move by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait until `condition()` holds, polling; fail after `within` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the state belongs to code we don't own
            await asyncio.sleep(0.05)


class FakeClock:
    """Time that passes only when the test says so, for code that takes a clock.

    `clock()` reads monotonic seconds (what the rate limits take), `clock.utc()` the same
    moment as an aware UTC datetime (what the store takes); `advance(seconds)` moves both.
    A test that expires a token or refills a bucket this way waits for nothing, so it
    neither takes real seconds nor fails when a loaded machine is slow.
    """

    def __init__(self, start: datetime = datetime(2030, 1, 1, 12, tzinfo=UTC)) -> None:
        self.start = start
        self.elapsed = 0.0

    def __call__(self) -> float:
        return 1000.0 + self.elapsed

    def utc(self) -> datetime:
        return self.start + timedelta(seconds=self.elapsed)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.elapsed += seconds
