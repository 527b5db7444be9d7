"""A throwaway PostgreSQL server from the system's packages, for the storage tests.

`initdb` + `pg_ctl` from /usr/lib/postgresql/*/bin (Debian's `postgresql` package, see
scripts/install-system-deps.sh) into a temporary directory, on a free port, trusting only
loopback. PostgreSQL refuses to run as root, so under root it runs as the `postgres` user
(or `nobody`) via `runuser`. Without the binaries the tests that need it are skipped, but
fail when CI=true: there they must run.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from livemorph.testing import free_port

SUPERUSER = "livemorph"


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL server binaries here ($LIVEMORPH_PG_BIN wins)."""
    if configured := os.environ.get("LIVEMORPH_PG_BIN"):
        return Path(configured)
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda path: int(Path(path).parent.parent.name or 0),
    )
    if candidates:
        return Path(candidates[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def require_bin_dir() -> Path:
    """The binaries, or skip (fail under CI) with what to install."""
    found = find_bin_dir()
    if found is not None and (found / "pg_ctl").exists():
        return found
    message = (
        "PostgreSQL server binaries (initdb, pg_ctl) not found: run "
        "scripts/install-system-deps.sh (Debian package `postgresql`) or set LIVEMORPH_PG_BIN"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _run_as() -> str | None:
    """The user to run the server as: None for the current one, unless that is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no `postgres` or `nobody` user to run PostgreSQL as")


@dataclass(frozen=True)
class PostgresServer:
    port: int
    directory: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(require_bin_dir() / "psql"), "-X", "-q", "-At", "-c", sql, self.url(database)],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    def new_database(self) -> str:
        """A fresh, empty database; its plain `postgresql://` URL."""
        name = "test_" + secrets.token_hex(6)
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _command(user: str | None, *argv: str) -> list[str]:
    return ["runuser", "-u", user, "--", *argv] if user else list(argv)


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = require_bin_dir()
    user = _run_as()
    # Not under pytest's tmp dir: that one is private to root, and the server may not be.
    directory = Path(tempfile.mkdtemp(prefix="livemorph-pg-"))
    data = directory / "data"
    if user:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    port = free_port()
    log = directory / "server.log"
    subprocess.run(
        _command(
            user,
            str(bin_dir / "initdb"),
            "-D",
            str(data),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={directory}"
        " -c fsync=off -c full_page_writes=off -c max_connections=200"
    )
    pg_ctl = (str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options)
    started = subprocess.run(
        _command(user, *pg_ctl, "-w", "-t", "60", "start"),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        detail = log.read_text() if log.exists() else started.stderr
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"PostgreSQL did not start:\n{started.stdout}{detail}")
    try:
        yield PostgresServer(port=port, directory=directory)
    finally:
        subprocess.run(
            _command(user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"),
            capture_output=True,
            check=False,
        )
        shutil.rmtree(directory, ignore_errors=True)
