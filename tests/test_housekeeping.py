"""A node with no session gives its memory back (server/housekeeping.py)."""

from __future__ import annotations

import asyncio
import gc

from livemorph.server import housekeeping
from livemorph.server.housekeeping import IdleTidy
from tests.support import eventually


async def test_an_idle_node_is_tidied_once_it_stays_idle() -> None:
    running = [0]
    tidy = IdleTidy(lambda: running[0], delay=0.05)
    tidy.poke()
    tidy.poke()  # one tidy for a burst of ends
    await eventually(lambda: tidy.runs == 1)
    await asyncio.sleep(0.1)
    assert tidy.runs == 1

    running[0] = 1
    tidy.poke()  # a session still runs: nothing to do
    await asyncio.sleep(0.1)
    assert tidy.runs == 1

    running[0] = 0
    tidy.poke()
    running[0] = 1  # a session started before the delay was over: left alone
    await asyncio.sleep(0.1)
    assert tidy.runs == 1
    await tidy.close()


async def test_tidying_collects_cycles_and_trims_the_heap(monkeypatch) -> None:
    trims: list[None] = []
    monkeypatch.setattr(housekeeping, "malloc_trim", lambda: trims.append(None))

    class Node:
        pass

    gc.disable()
    try:
        cycle = Node()
        cycle.self = cycle  # type: ignore[attr-defined]
        del cycle
        before = sum(type(o) is Node for o in gc.get_objects())
        IdleTidy(lambda: 0).tidy()
        after = sum(type(o) is Node for o in gc.get_objects())
    finally:
        gc.enable()
    assert (before, after) == (1, 0)
    assert trims == [None]


def test_glibcs_trim_is_found_here() -> None:
    """This project's machines run glibc; elsewhere `malloc_trim` is None and skipped."""
    assert housekeeping.malloc_trim is not None
    housekeeping.malloc_trim()
