"""The server the benches measure: `livemorph serve`, with the bench's own engines added.

    python bench/bench_server.py serve --engine stamped:neural --port 8000

Run as a script it is the livemorph CLI, with one more engine factory in the registry:
`stamped:<engine>` (stamp.py), which keeps the latency stamp in the corner of whatever the
wrapped engine paints. The factory is added here, before the app is built, so nothing in
the package knows of it. `serving()` starts that script as a subprocess the way
`livemorph.testing.serve` starts `livemorph serve`: the server's CPU is its own process's,
apart from the client's, which is what the e2e figures report.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import framecode
import stamp
from livemorph.cli import main
from livemorph.engines.registry import ENGINE_FACTORIES
from livemorph.testing import LiveServer, start_server, stop_server

SCRIPT = Path(__file__).resolve()


def register() -> None:
    """Add the bench's engines to this process's registry."""
    ENGINE_FACTORIES[stamp.NAME] = stamp.factory(framecode.WIDTH, framecode.HEIGHT)


@contextlib.contextmanager
def serving(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """A key minted, this script serving `flags` on a free port until the block ends."""
    server = start_server(data_dir, *flags, env=env, program=(sys.executable, str(SCRIPT)))
    try:
        yield server
    finally:
        stop_server(server)


if __name__ == "__main__":
    register()
    sys.exit(main())
