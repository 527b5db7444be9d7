"""Node-to-node WebSocket relays: a signaling socket one node accepted, carried to the node
that serves the session.

Only signaling is relayed. Media never passes through the relaying node: the serving node's
`answer` holds its own candidates and its `session_id` names it, so the client's peer
connection goes straight to it.

A relay is signed with the cluster secret (`sign`): an HMAC-SHA256 over a timestamp and the
request's path and query, sent in `RELAY_HEADER`. The secret itself never travels. What a
valid signature grants is small: the serving node does not spend the key's new-session rate
token a second time (the relaying node spent it) and does not relay further. The client
still authenticates with its own key on the serving node; a signature does not stand in for
one. A signature is good for `WINDOW` seconds, to allow for clocks a little apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ..protocol import Error, serialise

logger = logging.getLogger(__name__)

RELAY_HEADER = "x-livemorph-relay"
#: Seconds either side of now a signature's timestamp may be.
WINDOW = 30.0
#: Seconds to open a relay (TCP, TLS, the WebSocket handshake): a node that takes longer is
#: passed over for the next one.
OPEN_TIMEOUT = 3.0
#: The close code a client hears when the node serving its session went away: 1011, as for
#: any server-side failure; the text sent before it is transient, so clients reconnect.
NODE_LOST_CODE = 1011
#: The close code of a connection that ended without a close frame.
ABNORMAL = 1006
NODE_LOST = "session lost: the node serving it went away, try again"


def sign(secret: str, target: str, now: float | None = None) -> str:
    """The `RELAY_HEADER` value for a relay to `target` (path and query, as sent)."""
    stamp = str(int(time.time() if now is None else now))
    return f"{stamp}.{_mac(secret, stamp, target)}"


def verify(
    secret: str, signature: str, target: str, now: float | None = None, window: float = WINDOW
) -> bool:
    """Whether `signature` was made by `sign` with `secret` for `target`, within `window`."""
    stamp, dot, mac = signature.partition(".")
    if not dot or not stamp.isdigit():
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamp)) > window:
        return False
    return hmac.compare_digest(mac, _mac(secret, stamp, target))


def _mac(secret: str, stamp: str, target: str) -> str:
    message = f"{stamp}\n{target}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class RelayFailed(ConnectionError):
    """The relay could not be opened: the node is down, unreachable or refused it."""


async def open_relay(
    base_url: str,
    target: str,
    secret: str,
    *,
    max_size: int | None,
    open_timeout: float = OPEN_TIMEOUT,
) -> ClientConnection:
    """A WebSocket to `target` on the node at `base_url` (http or https), signed."""
    url = base_url.replace("http", "ws", 1) + target
    try:
        return await connect(
            url,
            additional_headers={RELAY_HEADER: sign(secret, target)},
            max_size=max_size,
            open_timeout=open_timeout,
            # The client has its own keepalive with the relaying node; these find a node
            # that vanished without closing its sockets.
            ping_interval=5.0,
            ping_timeout=5.0,
            compression=None,
        )
    except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
        raise RelayFailed(f"cannot relay to {base_url}: {exc!r}") from exc


@dataclass(slots=True)
class Downstream:
    """The client's side of a relay, as callables: the server's WebSocket, without
    importing the server. `receive` returns None once the client has gone."""

    receive: Callable[[], Awaitable[str | bytes | None]]
    send: Callable[[str | bytes], Awaitable[None]]
    close: Callable[[int], Awaitable[None]]


async def pump(downstream: Downstream, upstream: ClientConnection) -> int | None:
    """Carry messages both ways until either side closes; the serving node's close code
    (None when the client left first). When the serving node goes away without a close,
    the client hears `NODE_LOST` and the socket closes with `NODE_LOST_CODE`."""

    async def up() -> None:
        while (message := await downstream.receive()) is not None:
            try:
                await upstream.send(message)
            except ConnectionClosed:
                return

    async def down() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for message in upstream:
                await downstream.send(message)

    client = asyncio.create_task(up(), name="relay-up")
    server = asyncio.create_task(down(), name="relay-down")
    try:
        done, _ = await asyncio.wait({client, server}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (client, server):
            task.cancel()
        await asyncio.gather(client, server, return_exceptions=True)
    client_left = server not in done
    await upstream.close()  # if the client left: ends the session on the serving node
    if client_left:
        return None
    code = upstream.close_code
    if code is None or code == ABNORMAL:
        await downstream.send(serialise(Error(NODE_LOST)))
        await downstream.close(NODE_LOST_CODE)
        return None
    await downstream.close(code)
    return code
