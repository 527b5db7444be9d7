"""The cluster's shared state in Redis: which nodes live, where each session runs, how many
sessions each key holds, and the rate limits every node draws from.

Everything here expires on its own. A node writes its record (`Node`) with a TTL of
`ttl` seconds and rewrites it every heartbeat, together with the entries of the sessions it
holds; a node that stops (killed, cut off) stops rewriting, and within `ttl` seconds it
and its sessions are gone from placement, from `/subscribe` lookups and from its keys'
session counts. Nothing needs cleaning up after a dead node.

Times that more than one node compares (a reservation's expiry, a bucket's refill) are
Redis's own (`TIME` inside the scripts), never a node's clock: two machines' clocks
disagree, one Redis does not.

Every call raises `ClusterUnavailable` when Redis cannot be reached or answers with an
error; the caller decides what that means (a new session: refused, transient; a
heartbeat: logged and tried again).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

#: What every key of this service starts with, so one Redis can serve other things too.
PREFIX = "livemorph:"
#: Seconds a node's record and its sessions' entries live without a heartbeat.
TTL = 5.0
#: Seconds a Redis command may take before the cluster counts as unavailable: a new
#: session waits at most this long to hear that it cannot be placed.
COMMAND_TIMEOUT = 1.0


class ClusterUnavailable(RuntimeError):
    """Redis could not be reached, or refused a command."""


@dataclass(frozen=True, slots=True)
class SessionEntry:
    """One session as the cluster sees it: enough to find it and count it, no content."""

    id: str
    model: str
    key_id: str


@dataclass(frozen=True, slots=True)
class Node:
    """A member as it describes itself each heartbeat.

    `url` is where the other nodes relay to (http or https, host and port); `room` says,
    per model this node serves, how many more sessions of it it takes now (None: no limit
    is known here beyond the others' checks)."""

    name: str
    url: str
    public_host: str
    public_port: int
    room: dict[str, int | None]
    load: float
    version: str
    started: float
    sessions: tuple[SessionEntry, ...] = field(default=())
    #: The engine serving each model here, by name without its arguments.
    engines: dict[str, str] = field(default_factory=dict)

    def takes(self, model: str) -> bool:
        """Whether this node serves `model` and has room for one more session of it."""
        if model not in self.room:
            return False
        room = self.room[model]
        return room is None or room > 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Node:
        data = json.loads(text)
        data["sessions"] = tuple(SessionEntry(**entry) for entry in data.get("sessions", ()))
        return cls(**data)


def order_for(model: str, nodes: Iterable[Node], exclude: Iterable[str] = ()) -> list[Node]:
    """The nodes that take a session of `model`, the roomiest first (None counts as the
    most), then the least loaded: where a new session should be tried, in order."""
    skip = set(exclude)
    fitting = [node for node in nodes if node.name not in skip and node.takes(model)]

    def key(node: Node) -> tuple[float, float]:
        room = node.room[model]
        return (-(float("inf") if room is None else room), node.load)

    return sorted(fitting, key=key)


# Scripts. Each runs atomically in Redis, so two nodes admitting at the same moment cannot
# both take the last place of a key's session limit, nor the last token of a bucket.

#: KEYS: the key's session set, the session's location. ARGV: session id, limit (0: none),
#: ttl ms, node name. 1 when the session is counted (and located), 0 when the key is full.
_RESERVE = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[2])
if limit > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false
   and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
redis.call('SET', KEYS[2], ARGV[4], 'PX', ttl)
return 1
"""

#: KEYS: pairs of (a key's session set, a session's location). ARGV: ttl ms, node name,
#: then the session ids in the same order. Extends what is still this node's.
_REFRESH = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS, 2 do
  local sid = ARGV[2 + (i + 1) / 2]
  redis.call('ZADD', KEYS[i], now + ttl, sid)
  redis.call('PEXPIRE', KEYS[i], ttl * 2)
  redis.call('SET', KEYS[i + 1], ARGV[2], 'PX', ttl)
end
return 1
"""

#: KEYS: the bucket. ARGV: rate per second, burst. Returns the seconds to wait, as text
#: ("0" when a token was taken): Lua numbers reach Python as integers otherwise.
_TAKE = """
local t = redis.call('TIME')
local now = t[1] + t[2] / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'stamp', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class Directory:
    """The cluster's records in one Redis (`from_url`), under `prefix`."""

    def __init__(self, client: aioredis.Redis, *, ttl: float = TTL, prefix: str = PREFIX) -> None:
        self.redis = client
        self.ttl = ttl
        self.prefix = prefix
        self._reserve = client.register_script(_RESERVE)
        self._refresh = client.register_script(_REFRESH)
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> Directory:
        """A directory on the Redis at `url`. Commands fail fast (`COMMAND_TIMEOUT`, no
        retries): a client waiting to be placed hears of an outage in about a second."""
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, **options)

    async def close(self) -> None:
        await self.redis.aclose()

    # -- keys --------------------------------------------------------------------------

    def _node_key(self, name: str) -> str:
        return f"{self.prefix}node:{name}"

    @property
    def _members_key(self) -> str:
        return f"{self.prefix}nodes"

    def _session_key(self, session_id: str) -> str:
        return f"{self.prefix}session:{session_id}"

    def _key_sessions_key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}:sessions"

    @property
    def _ttl_ms(self) -> int:
        return max(1, round(self.ttl * 1000))

    # -- nodes -------------------------------------------------------------------------

    async def announce(self, node: Node) -> None:
        """Write `node`'s record (and extend its sessions' entries) for another `ttl`."""
        keys: list[str] = []
        ids: list[str] = []
        for entry in node.sessions:
            keys += [self._key_sessions_key(entry.key_id), self._session_key(entry.id)]
            ids.append(entry.id)
        async with _guard("announce"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self._node_key(node.name), node.to_json(), px=self._ttl_ms)
            pipe.sadd(self._members_key, node.name)
            await pipe.execute()
            if keys:
                await self._refresh(keys=keys, args=[self._ttl_ms, node.name, *ids])

    async def leave(self, node: Node) -> None:
        """Take `node` and its sessions out now (a clean stop), not `ttl` seconds later."""
        async with _guard("leave"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.delete(self._node_key(node.name))
            pipe.srem(self._members_key, node.name)
            for entry in node.sessions:
                pipe.zrem(self._key_sessions_key(entry.key_id), entry.id)
                pipe.delete(self._session_key(entry.id))
            await pipe.execute()

    async def nodes(self) -> list[Node]:
        """The live members, by name; members whose record expired are forgotten here."""
        async with _guard("nodes"):
            names = sorted(_text(name) for name in await self.redis.smembers(self._members_key))
            if not names:
                return []
            records = await self.redis.mget([self._node_key(name) for name in names])
            gone = [name for name, record in zip(names, records, strict=True) if record is None]
            if gone:
                await self.redis.srem(self._members_key, *gone)
        live = []
        for name, record in zip(names, records, strict=True):
            if record is None:
                continue
            try:
                live.append(Node.from_json(record))
            except (ValueError, TypeError, KeyError):
                logger.warning("ignored node %s: its record cannot be read", name)
        return live

    async def node(self, name: str) -> Node | None:
        async with _guard("node"):
            record = await self.redis.get(self._node_key(name))
        return None if record is None else Node.from_json(record)

    # -- sessions ----------------------------------------------------------------------

    async def reserve(self, node: str, entry: SessionEntry, limit: int | None) -> bool:
        """Count `entry` for its key and record that it runs on `node`: False (nothing
        written) when the key already holds `limit` sessions across the cluster."""
        async with _guard("reserve"):
            done = await self._reserve(
                keys=[self._key_sessions_key(entry.key_id), self._session_key(entry.id)],
                args=[entry.id, limit or 0, self._ttl_ms, node],
            )
        return bool(int(cast(int, done)))

    async def release(self, entry: SessionEntry) -> None:
        """The session ended: it no longer counts for its key, nor can viewers find it."""
        async with _guard("release"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(self._key_sessions_key(entry.key_id), entry.id)
            pipe.delete(self._session_key(entry.id))
            await pipe.execute()

    async def locate(self, session_id: str) -> Node | None:
        """The live node that holds `session_id`, or None."""
        async with _guard("locate"):
            name = await self.redis.get(self._session_key(session_id))
        return None if name is None else await self.node(_text(name))

    async def key_sessions(self, key_id: str) -> int:
        """Sessions `key_id` holds across the cluster now."""
        async with _guard("key_sessions"):
            now_s, now_us = await self.redis.time()
            now_ms = int(now_s) * 1000 + int(now_us) // 1000
            return int(await self.redis.zcount(self._key_sessions_key(key_id), now_ms, "+inf"))

    # -- rate limits -------------------------------------------------------------------

    async def take(self, bucket: str, rate: float, burst: float) -> float:
        """0.0 when `bucket` had a token (now spent), else the seconds until it has one."""
        async with _guard("take"):
            wait = await self._take(keys=[f"{self.prefix}rate:{bucket}"], args=[rate, burst])
        return float(_text(cast(bytes, wait)))


class RedisRateLimiter:
    """Token buckets shared by the cluster (server/limits.py's `RateLimiter`): the same
    figures as the in-memory ones, but a key's tokens are spent wherever it connects."""

    def __init__(self, directory: Directory, purpose: str, rate: float, burst: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.directory = directory
        self.purpose = purpose
        self.rate = rate
        self.burst = float(burst)

    async def acquire(self, name: str) -> float:
        return await self.directory.take(f"{self.purpose}:{name}", self.rate, self.burst)


@contextlib.asynccontextmanager
async def _guard(doing: str) -> AsyncIterator[None]:
    """Turns Redis's failures into `ClusterUnavailable`, saying what was being done."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise ClusterUnavailable(f"redis: {doing}: {exc}") from exc


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
