"""Fixtures: a real `livemorph serve` process on a free port, and media helpers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass(frozen=True)
class LiveServer:
    base_url: str
    ws_url: str
    api_key: str
    data_dir: Path
    process: subprocess.Popen[str]

    def active_sessions(self) -> int:
        return int(httpx.get(f"{self.base_url}/healthz").json()["active_sessions"])

    def wait_sessions(self, count: int, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while (current := self.active_sessions()) != count and time.monotonic() < deadline:
            time.sleep(0.1)
        return current


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_cli(*args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "livemorph.cli", *args],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    )
    return result.stdout


def start_server(data_dir: Path, *extra: str) -> LiveServer:
    key = run_cli("keys", "create", "--data-dir", str(data_dir), "--name", "tests")
    api_key = key.strip().splitlines()[-1]
    port = free_port()
    log = open(data_dir / "server.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livemorph.cli",
            "serve",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {(data_dir / 'server.log').read_text()}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("server did not become healthy")
    return LiveServer(base_url, f"ws://127.0.0.1:{port}", api_key, data_dir, process)


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with the cheap colour-grade engine on every restyle model (the default)."""
    live = start_server(tmp_path_factory.mktemp("server"))
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def passthrough_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("passthrough"), "--engine", "passthrough")
    yield live
    stop_server(live)
