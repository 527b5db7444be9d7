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
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

import framecode
import stamp
from livemorph.cli import main
from livemorph.engines.registry import ENGINE_FACTORIES
from livemorph.testing import LiveServer, free_port, run_cli, stop_server

SCRIPT = Path(__file__).resolve()


def register() -> None:
    """Add the bench's engines to this process's registry."""
    ENGINE_FACTORIES[stamp.NAME] = stamp.factory(framecode.WIDTH, framecode.HEIGHT)


@contextlib.contextmanager
def serving(data_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[LiveServer]:
    """A key minted, this script serving `flags` on a free port until the block ends."""
    data_dir.mkdir(parents=True, exist_ok=True)
    output = run_cli("keys", "create", "--data-dir", str(data_dir), "--name", "bench", env=env)
    api_key = output.strip().splitlines()[-1]
    port = free_port()
    with open(data_dir / "server.log", "a") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                str(SCRIPT),
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
                *flags,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
    server = LiveServer(
        f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", api_key, data_dir, process
    )
    try:
        _wait_healthy(server)
        yield server
    finally:
        stop_server(server)


def _wait_healthy(server: LiveServer, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the bench server exited:\n{server.log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/healthz", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the bench server did not become healthy:\n{server.log}")


if __name__ == "__main__":
    register()
    sys.exit(main())
