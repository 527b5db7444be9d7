"""Limits that keep one client from taking a node: session counts, rates, message floods.

The rate limits are token buckets held in this process's memory, one per key and purpose,
behind the small `RateLimiter` interface: a deployment with several nodes can put a shared
one (Redis, say) in its place without touching the request handlers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..config import Settings
from ..sessions import SessionRegistry

#: Transient refusals: clients retry them, so none may contain a permanent marker.
AT_CAPACITY = "Server at capacity, try again shortly"
TOO_MANY_SESSIONS = "Too many sessions for this key, try again shortly"
TOO_MANY_NEW_SESSIONS = "Too many new sessions for this key, try again shortly"
TOO_MANY_MESSAGES = "rate limit: too many messages, slow down"
#: A cluster member that cannot reach Redis places no session (server/cluster.py).
CLUSTER_UNAVAILABLE = "Cluster unavailable, try again shortly"

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; each event takes one."""

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._tokens

    def take(self) -> float:
        """0.0 when the event may go ahead (a token is spent), else seconds until it may."""
        tokens = self._refill()
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        return (1.0 - tokens) / self.rate

    @property
    def full(self) -> bool:
        """True when the bucket has refilled completely: it can be forgotten."""
        return self._refill() >= self.burst


class RateLimiter(Protocol):
    """Rate limits by name (a key id, say); async so a networked store can implement it."""

    async def acquire(self, name: str) -> float:
        """0.0 when one more event for `name` may go ahead, else seconds to wait."""
        ...


class Unlimited:
    """The limiter of a limit that is switched off."""

    async def acquire(self, name: str) -> float:
        return 0.0


class MemoryRateLimiter:
    """One token bucket per name, in this process; buckets that refill are dropped."""

    #: Sweep idle buckets once this many exist, so memory tracks active names only.
    SWEEP_AT = 1024

    def __init__(self, rate: float, burst: float, clock: Clock = time.monotonic) -> None:
        TokenBucket(rate, burst, clock)  # validates the figures up front
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    async def acquire(self, name: str) -> float:
        bucket = self._buckets.get(name)
        if bucket is None:
            if len(self._buckets) >= self.SWEEP_AT:
                self._sweep()
            bucket = self._buckets[name] = TokenBucket(self.rate, self.burst, self._clock)
        return bucket.take()

    def _sweep(self) -> None:
        for name in [name for name, bucket in self._buckets.items() if bucket.full]:
            del self._buckets[name]


def rate_limiter(rate: float, burst: float, clock: Clock = time.monotonic) -> RateLimiter:
    """An in-memory limiter, or none at all when `rate` is 0 (the limit is off)."""
    return MemoryRateLimiter(rate, max(1.0, burst), clock) if rate > 0 else Unlimited()


def retry_after(wait: float) -> int:
    """Whole seconds for a `Retry-After` header: never 0 for a refusal."""
    return max(1, math.ceil(wait))


@dataclass(slots=True)
class Limits:
    """The per-node and per-key limits `livemorph serve` enforces (see Settings).

    `clock` (monotonic seconds) is what every bucket here refills by, the message gates'
    included, so a test can refill one by moving a clock instead of waiting."""

    max_sessions_per_key: int | None
    new_sessions: RateLimiter
    token_mints: RateLimiter
    message_rate: float
    message_burst: float
    clock: Clock = time.monotonic

    @classmethod
    def from_settings(cls, settings: Settings, clock: Clock = time.monotonic) -> Limits:
        return cls(
            max_sessions_per_key=settings.max_sessions_per_key or None,
            new_sessions=rate_limiter(settings.new_session_rate, settings.new_session_burst, clock),
            token_mints=rate_limiter(settings.token_mint_rate, settings.token_mint_burst, clock),
            message_rate=settings.message_rate,
            message_burst=settings.message_burst,
            clock=clock,
        )

    async def refuse_session(self, key_id: str, sessions: SessionRegistry) -> str | None:
        """Why a new session of `key_id` may not start now (a transient text), or None.

        Checked again after the rate limiter, which may yield: the caller adds the session
        without awaiting anything in between, so two sessions cannot slip past one place.
        """
        if refusal := self._over_count(key_id, sessions):
            return refusal
        if await self.new_sessions.acquire(key_id):
            return TOO_MANY_NEW_SESSIONS
        return self._over_count(key_id, sessions)

    def _over_count(self, key_id: str, sessions: SessionRegistry) -> str | None:
        if sessions.full:
            return AT_CAPACITY
        limit = self.max_sessions_per_key
        if limit is not None and sessions.count_for_key(key_id) >= limit:
            return TOO_MANY_SESSIONS
        return None

    def message_gate(self) -> MessageGate:
        return MessageGate(self.message_rate, self.message_burst, self.clock)


class MessageGate:
    """One session's incoming message rate. Excess messages are dropped, unread; the client
    hears why once per flood (at most once every `notice_every` seconds), so a flood costs
    the server little and the answer to it is not a flood of its own."""

    def __init__(
        self, rate: float, burst: float, clock: Clock = time.monotonic, notice_every: float = 5.0
    ) -> None:
        self._bucket = TokenBucket(rate, max(1.0, burst), clock) if rate > 0 else None
        self._clock = clock
        self._notice_every = notice_every
        self._noticed: float | None = None
        self.dropped = 0

    def admit(self) -> tuple[bool, bool]:
        """(handle this message, tell the client that messages are being dropped)."""
        if self._bucket is None or self._bucket.take() == 0.0:
            return True, False
        self.dropped += 1
        now = self._clock()
        if self._noticed is not None and now - self._noticed < self._notice_every:
            return False, False
        self._noticed = now
        return False, True


__all__ = [
    "AT_CAPACITY",
    "CLUSTER_UNAVAILABLE",
    "TOO_MANY_MESSAGES",
    "TOO_MANY_NEW_SESSIONS",
    "TOO_MANY_SESSIONS",
    "Limits",
    "MemoryRateLimiter",
    "MessageGate",
    "RateLimiter",
    "TokenBucket",
    "Unlimited",
    "rate_limiter",
    "retry_after",
]
