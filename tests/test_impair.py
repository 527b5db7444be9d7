"""bench/impair.py: loss, bursts, delay, jitter, order and dropouts on two real aioice
connections over loopback, impaired on one side only."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import AsyncIterator

import pytest
from aioice import Candidate, Connection
from bench.impair import Impairment, Link

pytestmark = pytest.mark.timeout(60)


async def _pair() -> tuple[Connection, Connection]:
    a = Connection(ice_controlling=True, components=1)
    b = Connection(ice_controlling=False, components=1)
    for one in (a, b):
        await one.gather_candidates()
    for one, other in ((a, b), (b, a)):
        for candidate in other.local_candidates:
            if candidate.host.startswith("127.") or candidate.host == "::1":
                await one.add_remote_candidate(candidate)
        if not one.remote_candidates:  # no loopback candidate gathered: take them all
            for candidate in other.local_candidates:
                await one.add_remote_candidate(Candidate.from_sdp(candidate.to_sdp()))
        await one.add_remote_candidate(None)
        one.remote_username, one.remote_password = other.local_username, other.local_password
    await asyncio.gather(a.connect(), b.connect())
    return a, b


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Connection, Connection]]:
    a, b = await _pair()
    yield a, b
    await a.close()
    await b.close()


async def _exchange(
    sender: Connection, receiver: Connection, count: int, every: float = 0.0
) -> list[tuple[int, float]]:
    """Send `count` numbered datagrams; what arrived: (number, seconds after its send)."""
    got: list[tuple[int, float]] = []

    async def receive() -> None:
        while True:
            data = await receiver.recv()
            number, sent = struct.unpack("!Id", data[:12])
            got.append((number, time.monotonic() - sent))

    reader = asyncio.create_task(receive())
    for number in range(count):
        await sender.send(struct.pack("!Id", number, time.monotonic()) + bytes(100))
        await asyncio.sleep(every)
    await asyncio.sleep(0.3)
    reader.cancel()
    return got


def _only(connection: Connection):  # type: ignore[no-untyped-def]
    return lambda other: other is connection


async def test_loss_drops_its_share_on_the_side_it_impairs(
    pair: tuple[Connection, Connection],
) -> None:
    a, b = pair
    with Impairment(send=Link(loss=0.3), seed=1, applies=_only(a)) as link:
        got = await _exchange(a, b, 2000)
        back = await _exchange(b, a, 300)
    assert len(got) == link.sent.passed and link.sent.lost == 2000 - len(got)
    assert 0.25 < link.sent.lost / 2000 < 0.35
    assert len(back) == 300, "the other way is not impaired"


async def test_losses_come_in_bursts_of_the_mean_length_asked(
    pair: tuple[Connection, Connection],
) -> None:
    a, b = pair
    with Impairment(send=Link(loss=0.1, burst=4.0), seed=2, applies=_only(a)):
        got = await _exchange(a, b, 3000)
    arrived = {number for number, _ in got}
    runs, run = [], 0
    for number in range(3000):
        if number in arrived:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    assert 0.07 < (3000 - len(arrived)) / 3000 < 0.13
    assert 3.0 < sum(runs) / len(runs) < 5.0, runs[:20]


async def test_delay_and_jitter_keep_the_order_unless_told(
    pair: tuple[Connection, Connection],
) -> None:
    a, b = pair
    with Impairment(receive=Link(delay=0.03, jitter=0.02), applies=_only(b)):
        got = await _exchange(a, b, 200, every=0.002)
    assert [number for number, _ in got] == list(range(200))
    delays = sorted(delay for _, delay in got)
    assert delays[0] >= 0.009 and delays[len(delays) // 2] >= 0.02
    with Impairment(receive=Link(delay=0.03, jitter=0.02, reorder=True), applies=_only(b)):
        got = await _exchange(a, b, 200, every=0.002)
    numbers = [number for number, _ in got]
    assert sorted(numbers) == list(range(200)) and numbers != list(range(200))


async def test_a_dropout_cuts_both_ways_then_the_path_comes_back(
    pair: tuple[Connection, Connection],
) -> None:
    a, b = pair
    with Impairment(applies=_only(a)) as link:
        link.dropout(0.3)
        during = await asyncio.gather(_exchange(a, b, 20), _exchange(b, a, 20))
        assert during == [[], []] and link.sent.cut == 20 and link.received.cut == 20
        assert not link.cut
        after = await _exchange(a, b, 20)
    assert len(after) == 20


async def test_one_impairment_at_a_time_and_the_class_is_restored() -> None:
    send, received = Connection.sendto, Connection.data_received
    with Impairment(), pytest.raises(RuntimeError, match="one at a time"):
        Impairment().install()
    assert (Connection.sendto, Connection.data_received) == (send, received)
    with pytest.raises(ValueError, match="jitter"):
        Link(delay=0.01, jitter=0.02)


def test_no_served_process_can_reach_it() -> None:
    """It lives in bench/, outside the package: the server never imports it."""
    import subprocess
    import sys

    code = (
        "import sys, livemorph.server, livemorph.cli; "
        "print([name for name in sys.modules if name.startswith('bench')])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
