"""Run a real livemorph server in a subprocess: for tests and benchmarks of apps built on it.

with serve(data_dir, "--engine", "passthrough") as server:
    client = create_client(api_key=server.api_key, base_url=server.base_url)
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    ws_url: str
    api_key: str
    data_dir: Path
    process: subprocess.Popen[str]
    #: What an https:// server's certificate is checked against (None: plain http).
    ssl: ssl.SSLContext | None = None

    @property
    def log(self) -> str:
        return (self.data_dir / "server.log").read_text()

    def active_sessions(self) -> int:
        response = httpx.get(f"{self.base_url}/healthz", verify=self.ssl or True)
        return int(response.json()["active_sessions"])

    def wait_sessions(self, count: int, timeout: float = 10.0) -> int:
        """Poll until `count` sessions run here (or `timeout` passes); the last count seen."""
        deadline = time.monotonic() + timeout
        while (current := self.active_sessions()) != count and time.monotonic() < deadline:
            time.sleep(0.1)
        return current


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `livemorph ARGS` with this interpreter; its stdout."""
    result = subprocess.run(
        [sys.executable, "-m", "livemorph.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout


def start_server(
    data_dir: Path,
    *flags: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    https: Path | None = None,
    program: Sequence[str] = (sys.executable, "-m", "livemorph.cli"),
) -> LiveServer:
    """Mint a key, start `livemorph serve` on a free port, return once /healthz answers.

    `https`: the server serves HTTPS (its flags say how) with this certificate, which may
    not exist until the server has made it (`--tls self-signed`); it is trusted alone.
    `program`: what runs the CLI (a script that adds engines to it, say)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # Same env as the server, so a LIVEMORPH_DATABASE_URL there puts the key in that database.
    output = run_cli("keys", "create", "--data-dir", str(data_dir), "--name", "testing", env=env)
    api_key = output.strip().splitlines()[-1]
    port = port or free_port()
    with open(data_dir / "server.log", "a") as log:
        process = subprocess.Popen(
            [
                *program,
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
    scheme = "https" if https else "http"
    server = LiveServer(
        f"{scheme}://127.0.0.1:{port}",
        f"{'wss' if https else 'ws'}://127.0.0.1:{port}",
        api_key,
        data_dir,
        process,
    )
    # Generous: an engine that loads at start (diffusion) on a busy machine takes a while.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"livemorph serve exited:\n{server.log}")
        if https is not None and server.ssl is None:
            if not https.is_file():
                time.sleep(0.1)
                continue
            server = dataclasses.replace(server, ssl=ssl.create_default_context(cafile=https))
        try:
            health = httpx.get(f"{server.base_url}/healthz", timeout=1, verify=server.ssl or True)
            if health.status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"livemorph serve did not become healthy:\n{server.log}")


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


@contextmanager
def serve(data_dir: Path, *flags: str, **options: object) -> Iterator[LiveServer]:
    server = start_server(data_dir, *flags, **options)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        stop_server(server)
