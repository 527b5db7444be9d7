"""A lossy network inside one process: loss, delay, jitter and dropouts on ICE's data path.

The machines livemorph is tested on have no `netem`, and loopback loses nothing. So this
impairs WebRTC where every packet of a peer connection in this process passes, under DTLS
and SRTP: aioice's `Connection.sendto` (every datagram a connection sends) and
`Connection.data_received` (every datagram it receives). Those two carry data alone: STUN
(connectivity and consent checks) goes its own way in aioice, so a connection under a
dropout keeps its consent, as a real one keeps it across a short Wi-Fi stall with a
working path.

    with Impairment(send=Link(loss=0.02, delay=0.03, jitter=0.01),
                    receive=Link(loss=0.02, delay=0.03, jitter=0.01)) as link:
        ...                     # a session served in this process
        link.dropout(1.0)       # nothing passes either way for a second

Each direction is a `Link`: the chance a datagram is lost (in bursts of a mean length,
Gilbert-Elliott, as Wi-Fi loses them; 1 for independent losses), a one-way delay and a
uniform jitter around it. Datagrams keep their order (a later one never overtakes an
earlier one), as on most real paths, unless `reorder` lets jitter reorder them.

This is a test and bench tool: it lives in bench/, outside the package, so no served
process can reach it. It patches the aioice class while installed; `applies` picks the
connections it impairs (all by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aioice import Connection

Clock = Callable[[], float]


@dataclass(frozen=True)
class Link:
    """One direction of the path."""

    #: The share of datagrams lost, 0 to 1.
    loss: float = 0.0
    #: The mean length of a run of lost datagrams: 1 loses each on its own.
    burst: float = 1.0
    #: One-way delay, seconds.
    delay: float = 0.0
    #: Each datagram's delay varies uniformly by up to this, either way, seconds.
    jitter: float = 0.0
    #: Let jitter reorder datagrams; otherwise each waits for the one before it.
    reorder: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss is a share from 0 to under 1, not {self.loss}")
        if self.burst < 1.0:
            raise ValueError(f"a loss burst is 1 datagram or more, not {self.burst}")
        if self.delay < 0 or self.jitter < 0 or self.jitter > self.delay:
            raise ValueError("delay and jitter are 0 or more, jitter at most the delay")


@dataclass
class Counts:
    """What one direction did with its datagrams."""

    passed: int = 0
    lost: int = 0
    #: Dropped by a dropout.
    cut: int = 0


@dataclass
class _Direction:
    link: Link
    rng: random.Random
    counts: Counts = field(default_factory=Counts)
    losing: bool = False
    #: When the last datagram was (or will be) delivered, on the loop's clock.
    last: float = 0.0

    def lose(self) -> bool:
        """Gilbert-Elliott: a run of losses of mean length `burst`, `loss` of all."""
        link = self.link
        if link.loss <= 0.0:
            return False
        if self.losing:
            self.losing = self.rng.random() >= 1.0 / link.burst
        else:
            self.losing = self.rng.random() < link.loss / (link.burst * (1.0 - link.loss))
        return self.losing

    def when(self, now: float) -> float:
        """The moment a datagram sent `now` arrives."""
        link = self.link
        at = now + link.delay + (self.rng.uniform(-link.jitter, link.jitter) if link.jitter else 0)
        if not link.reorder:
            # strictly after the one before: the loop's timer heap keeps no order among
            # equal times
            at = max(at, self.last + 1e-6)
        self.last = max(self.last, at)
        return at


class Impairment:
    """Impairs the data path of every matching aioice connection in this process while
    installed (a context manager). `send` is what the process sends, `receive` what it
    receives."""

    def __init__(
        self,
        send: Link | None = None,
        receive: Link | None = None,
        *,
        seed: int = 0,
        applies: Callable[[Connection], bool] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        rng = random.Random(seed)
        self.sending = _Direction(send or Link(), random.Random(rng.random()))
        self.receiving = _Direction(receive or Link(), random.Random(rng.random()))
        self.applies = applies or (lambda connection: True)
        self.clock = clock
        self._cut_until = -1.0
        self._saved: tuple[Any, Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sent(self) -> Counts:
        return self.sending.counts

    @property
    def received(self) -> Counts:
        return self.receiving.counts

    def dropout(self, seconds: float) -> None:
        """Nothing passes either way from now for `seconds`."""
        self._cut_until = self.clock() + seconds

    @property
    def cut(self) -> bool:
        return self.clock() < self._cut_until

    def set_links(self, send: Link | None = None, receive: Link | None = None) -> None:
        """Change the links from now on (a run that steps through loss rates)."""
        if send is not None:
            self.sending.link = send
        if receive is not None:
            self.receiving.link = receive

    # -- installing ---------------------------------------------------------------------

    def install(self) -> None:
        if self._saved is not None:
            raise RuntimeError("this impairment is installed already")
        if getattr(Connection, "_impaired", False):
            raise RuntimeError("another impairment is installed: one at a time")
        original_send, original_received = Connection.sendto, Connection.data_received
        self._saved = (original_send, original_received)
        impairment = self

        async def sendto(connection: Connection, data: bytes, component: int) -> None:
            if not impairment.applies(connection):
                return await original_send(connection, data, component)
            at = impairment._decide(impairment.sending)
            if at is None:
                return None
            if at <= 0.0:
                return await original_send(connection, data, component)
            impairment._later(at, lambda: _send(original_send, connection, data, component))
            return None

        def data_received(connection: Connection, data: bytes, component: int) -> None:
            if not impairment.applies(connection):
                return original_received(connection, data, component)
            at = impairment._decide(impairment.receiving)
            if at is None:
                return None
            if at <= 0.0:
                return original_received(connection, data, component)
            asyncio.get_running_loop().call_at(at, original_received, connection, data, component)
            return None

        Connection.sendto = sendto  # type: ignore[method-assign]
        Connection.data_received = data_received  # type: ignore[method-assign]
        Connection._impaired = True  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        if self._saved is None:
            return
        Connection.sendto, Connection.data_received = self._saved  # type: ignore[method-assign]
        Connection._impaired = False  # type: ignore[attr-defined]
        self._saved = None
        for task in self._tasks:
            task.cancel()

    def __enter__(self) -> Impairment:
        self.install()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.uninstall()

    # -- one datagram ------------------------------------------------------------------

    def _decide(self, direction: _Direction) -> float | None:
        """None: the datagram is dropped; 0.0: it passes now; else when it arrives, on the
        loop's clock."""
        if self.cut:
            direction.counts.cut += 1
            return None
        if direction.lose():
            direction.counts.lost += 1
            return None
        direction.counts.passed += 1
        if direction.link.delay <= 0.0:
            return 0.0
        return direction.when(asyncio.get_running_loop().time())

    def _later(self, at: float, send: Callable[[], Any]) -> None:
        def start() -> None:
            if self._saved is None:
                return  # uninstalled meanwhile
            task = asyncio.ensure_future(send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        asyncio.get_running_loop().call_at(at, start)


async def _send(original: Any, connection: Connection, data: bytes, component: int) -> None:
    # closed while the datagram was on its way: lost, as on a real path
    with contextlib.suppress(ConnectionError):
        await original(connection, data, component)
