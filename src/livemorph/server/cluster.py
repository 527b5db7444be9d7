"""This node as a member of a cluster (`--redis-url`): it announces itself, places the
sessions it has no room for on other members, and relays their signaling there.

A node with room serves a session itself. One without (`--max-sessions`, its capacity, its
engine's own limit) relays the client's WebSocket to the roomiest member that serves the
model (`order_for`), trying the next one when a member turns out to be full since its last
heartbeat; when none has room the client hears `Server at capacity, try again shortly`, as
from a single node. Viewers (`/subscribe/{id}`) reach the session's node the same way, found
by the session's id in Redis.

Shared limits: the key's session count is reserved in Redis before a session starts
(atomically, so two nodes cannot both take a key's last place), and the new-session and
token-mint rate limits are Redis token buckets (AppState puts them in `Limits`). Credits
were already shared: they are rows in the one database every member uses, debited by the
node that serves the session, each second once.

When Redis cannot be reached, new sessions are refused with `CLUSTER_UNAVAILABLE` (a
transient refusal: clients retry) and running sessions, and their relays, go on: nothing on
the media path or in a relay waits on Redis. Heartbeats keep trying; the outage and its
end are logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import socket
import time
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from .._version import __version__
from ..cluster import (
    ClusterUnavailable,
    Directory,
    Node,
    RedisRateLimiter,
    SessionEntry,
    order_for,
)
from ..cluster.relay import Downstream, RelayFailed, open_relay, pump, verify
from ..config import Settings
from ..engines import Engine, EngineRegistry
from ..models import CATALOG, ModelSpec
from ..protocol import Error as ErrorMessage
from ..protocol import parse_server
from ..sessions import SessionRegistry
from .capacity import EPSILON, Capacity
from .limits import (
    AT_CAPACITY,
    TOO_MANY_NEW_SESSIONS,
    TOO_MANY_SESSIONS,
    Limits,
)

logger = logging.getLogger(__name__)

#: Seconds between heartbeats; a record lives `Directory.ttl` (5 s) without one.
HEARTBEAT = 1.0
#: Seconds a relayed node has to say its first word (`session_id`, or why not) before the
#: next member is tried.
FIRST_REPLY_TIMEOUT = 10.0


def node_name(settings: Settings) -> str:
    """`--node-name`, else this machine's name and a random suffix (a restarted node is a
    new member: its old sessions are gone with it)."""
    return settings.node_name or f"{socket.gethostname()}-{secrets.token_hex(3)}"


def node_url(settings: Settings) -> str:
    """Where the other members reach this node: its public address, in its own scheme."""
    scheme = "https" if (settings.tls_cert or settings.tls) else "http"
    host = settings.public_host or settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{scheme}://{host}:{settings.public_port or settings.port}"


def settings_problem(settings: Settings) -> str | None:
    """Why these settings cannot make a cluster member (`serve` says it and exits 2)."""
    if not settings.redis_url:
        return None
    if not settings.cluster_secret:
        return "--redis-url needs --cluster-secret (or LIVEMORPH_CLUSTER_SECRET)"
    if settings.public_host is None and settings.host in ("0.0.0.0", "::", ""):
        return (
            "--redis-url with --host on every address needs --public-host: the address "
            "clients and the other nodes reach this one at"
        )
    return None


class ClusterMember:
    """This node's part in the cluster: heartbeat, admission, placement and relays."""

    def __init__(
        self,
        directory: Directory,
        settings: Settings,
        sessions: SessionRegistry,
        engines: EngineRegistry,
        capacity: Capacity,
        limits: Limits,
    ) -> None:
        if not settings.cluster_secret:
            raise ValueError("a cluster member needs a cluster secret")
        self.directory = directory
        self.secret = settings.cluster_secret
        self.name = node_name(settings)
        self.url = node_url(settings)
        self.public_host = settings.public_host or settings.host
        self.public_port = settings.public_port or settings.port
        self.max_message_bytes = settings.max_message_bytes or None
        self.sessions = sessions
        self.engines = engines
        self.capacity = capacity
        self.limits = limits
        self.started = time.time()
        #: Called with "stream" or "subscribe" for each socket relayed to another member.
        self.on_relay: Callable[[str], None] = lambda kind: None
        self._wake = asyncio.Event()
        self._heart: asyncio.Task[None] | None = None
        self._reachable = True

    # -- what this node says of itself -------------------------------------------------

    def room(self, spec: ModelSpec, engine: Engine | None = None) -> int | None:
        """How many more sessions of `spec` this node takes now (None: no limit here)."""
        running = self.sessions.all()
        counts: list[int] = []
        if self.sessions.max_sessions is not None:
            counts.append(max(0, self.sessions.max_sessions - len(running)))
        if self.capacity.on:
            if self.capacity.refusal(spec, running) is not None:
                return 0
            share, load = self.capacity.share(spec.name), self.capacity.load(running)
            if share > 0:
                fits = math.floor((1.0 - load) / share + EPSILON)
                # an empty node takes one whatever the figures say (Capacity.refusal)
                counts.append(max(1 if load <= 0 else 0, fits))
        engine = engine or self.engines.loaded(spec.name)
        if engine is not None and engine.full():
            return 0
        return min(counts) if counts else None

    def snapshot(self) -> Node:
        """This node's record as the others read it."""
        engines = self.engines.engine_names()
        running = self.sessions.all()
        return Node(
            name=self.name,
            url=self.url,
            public_host=self.public_host,
            public_port=self.public_port,
            room={name: self.room(CATALOG[name]) for name in engines},
            load=round(self.capacity.load(running), 4) if self.capacity.on else len(running),
            version=__version__,
            started=self.started,
            sessions=tuple(SessionEntry(s.id, s.spec.name, s.principal.key_id) for s in running),
            engines=engines,
        )

    # -- heartbeat ---------------------------------------------------------------------

    async def start(self) -> None:
        await self._announce()
        self._heart = asyncio.create_task(self._beat(), name="cluster-heartbeat")
        logger.info("joined the cluster as %s (%s)", self.name, self.url)

    async def stop(self) -> None:
        if self._heart is not None:
            self._heart.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heart
            self._heart = None
        with contextlib.suppress(ClusterUnavailable):
            await self.directory.leave(self.snapshot())
        await self.directory.close()

    def changed(self) -> None:
        """A session started or ended here: tell the others now, not at the next beat."""
        self._wake.set()

    async def _beat(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), HEARTBEAT)
            self._wake.clear()
            await self._announce()

    async def _announce(self) -> None:
        try:
            await self.directory.announce(self.snapshot())
        except ClusterUnavailable as exc:
            if self._reachable:
                logger.warning("cluster: cannot reach redis, new sessions are refused: %s", exc)
            self._reachable = False
            return
        if not self._reachable:
            logger.warning("cluster: redis is back")
        self._reachable = True

    # -- admission ---------------------------------------------------------------------

    def is_relay(self, ws: WebSocket, signature: str) -> bool:
        """Whether `signature` is a member's, for this very request."""
        return verify(self.secret, signature, _target(ws))

    async def admit(
        self, key_id: str, spec: ModelSpec, engine: Engine, session_id: str, relayed: bool
    ) -> str | None:
        """Why session `session_id` may not start here now (a transient text), or None:
        then it is reserved for `key_id` across the cluster and `release` must follow.
        `AT_CAPACITY` for a client's own request means: try the others (`relay_stream`).
        Raises ClusterUnavailable."""
        if not relayed and await self.limits.new_sessions.acquire(key_id):
            return TOO_MANY_NEW_SESSIONS
        if self.room(spec, engine) == 0:
            return AT_CAPACITY
        entry = SessionEntry(session_id, spec.name, key_id)
        if not await self.directory.reserve(self.name, entry, self.limits.max_sessions_per_key):
            return TOO_MANY_SESSIONS
        if self.room(spec, engine) == 0:  # another session took the place while this awaited
            await self.directory.release(entry)
            return AT_CAPACITY
        self.changed()
        return None

    async def release(self, session_id: str, model: str, key_id: str) -> None:
        with contextlib.suppress(ClusterUnavailable):
            await self.directory.release(SessionEntry(session_id, model, key_id))
        self.changed()

    # -- relays ------------------------------------------------------------------------

    async def relay_stream(self, ws: WebSocket, model: str) -> bool:
        """Carry this `/v1/stream` socket to a member with room for `model`, until it ends;
        False when no member could take it. Raises ClusterUnavailable."""
        nodes = order_for(model, await self.directory.nodes(), exclude={self.name})
        for node in nodes:
            if await self._relay(ws, node, model):
                return True
        return False

    async def relay_subscribe(self, ws: WebSocket, session_id: str) -> bool:
        """Carry this `/subscribe/{id}` socket to the member holding the session; False
        when no live member does. Raises ClusterUnavailable."""
        node = await self.directory.locate(session_id)
        if node is None or node.name == self.name:
            return False
        return await self._relay(ws, node, None)

    async def _relay(self, ws: WebSocket, node: Node, model: str | None) -> bool:
        started = time.perf_counter()
        try:
            upstream = await open_relay(
                node.url, _target(ws), self.secret, max_size=self.max_message_bytes
            )
        except RelayFailed as exc:
            logger.warning("cluster: passed over node %s: %s", node.name, exc)
            return False
        downstream = _downstream(ws)
        if model is not None:  # a publisher hears first (`session_id`, or why not)
            try:
                first = await asyncio.wait_for(upstream.recv(), FIRST_REPLY_TIMEOUT)
            except Exception as exc:  # closed, timed out: the node cannot take it
                logger.warning("cluster: node %s did not answer a relay: %r", node.name, exc)
                await upstream.close()
                return False
            if _says_at_capacity(first):
                await upstream.close()  # full since its last heartbeat: try the next
                return False
            await downstream.send(first)
        self.on_relay("subscribe" if model is None else "stream")
        logger.info(
            "relayed %s to node %s (%.0f ms)",
            ws.scope["path"],
            node.name,
            (time.perf_counter() - started) * 1000,
        )
        await pump(downstream, upstream)
        return True


def _target(ws: WebSocket) -> str:
    """The request's path and query as they came: what a relay signature covers."""
    query = ws.scope.get("query_string", b"").decode("latin-1")
    return ws.scope["path"] + (f"?{query}" if query else "")


def _says_at_capacity(first: str | bytes) -> bool:
    try:
        message = parse_server(first if isinstance(first, str) else first.decode())
    except Exception:
        return False
    return isinstance(message, ErrorMessage) and message.error == AT_CAPACITY


def _downstream(ws: WebSocket) -> Downstream:
    async def receive() -> str | bytes | None:
        try:
            event = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            return None
        if event["type"] == "websocket.disconnect":
            return None
        text = event.get("text")
        return text if text is not None else event.get("bytes") or b""

    async def send(data: str | bytes) -> None:
        if ws.application_state is not WebSocketState.CONNECTED:
            return
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            if isinstance(data, str):
                await ws.send_text(data)
            else:
                await ws.send_bytes(data)

    async def close(code: int) -> None:
        if ws.application_state is WebSocketState.CONNECTED:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                await ws.close(code)

    return Downstream(receive, send, close)


def member_from_settings(
    settings: Settings,
    sessions: SessionRegistry,
    engines: EngineRegistry,
    capacity: Capacity,
    limits: Limits,
) -> ClusterMember | None:
    """The member `--redis-url` makes of this node (its rate limits moved to Redis), or
    None for a single node."""
    if not settings.redis_url:
        return None
    directory = Directory.from_url(settings.redis_url)
    if settings.new_session_rate > 0:
        limits.new_sessions = RedisRateLimiter(
            directory,
            "new-session",
            settings.new_session_rate,
            max(1.0, settings.new_session_burst),
        )
    if settings.token_mint_rate > 0:
        burst = max(1.0, settings.token_mint_burst)
        limits.token_mints = RedisRateLimiter(
            directory, "token-mint", settings.token_mint_rate, burst
        )
    return ClusterMember(directory, settings, sessions, engines, capacity, limits)


__all__ = [
    "ClusterMember",
    "member_from_settings",
    "node_name",
    "node_url",
    "settings_problem",
]
