"""Fixtures: a real `livemorph serve` process on a free port."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from livemorph.testing import LiveServer, serve
from tests.postgres import PostgresServer, postgres_server

#: Admission by capacity (server/capacity.py) refuses new sessions while a node's sessions
#: are short of frames; the suite's servers share a busy 2-core machine with their clients
#: (so they are short often) and open sessions that never stream beside ones that do. It is
#: off for the servers `livemorph.testing.serve` starts unless a test asks for it
#: (`--capacity` wins over the variable): tests/test_capacity.py does.
os.environ.setdefault("LIVEMORPH_CAPACITY", "off")


@pytest.fixture(scope="session", autouse=True)
def text_model() -> None:
    """The prompt encoder's weights, fetched once (into the user cache) before any server
    starts, so a first run on a fresh machine does not spend a server's start-up deadline
    on the download. Offline, the tests that need them fail with the fetch's own error."""
    from livemorph.engines.neural import weights

    with contextlib.suppress(weights.WeightsUnavailable):
        weights.resolve()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with the default engines (the neural engine on every restyle model)."""
    with serve(tmp_path_factory.mktemp("server")) as live:
        yield live


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (Debian's binaries) for this test run; skipped without
    them, failed under CI=true. Each test takes a fresh database: `postgres.new_database()`."""
    with postgres_server() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """A fresh, empty database on each backend, as a plain URL (the store maps drivers)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'livemorph.db'}"
    return request.getfixturevalue("postgres").new_database()
