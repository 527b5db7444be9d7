"""Fixtures: a real `livemorph serve` process on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from livemorph.testing import LiveServer, serve


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with the default engines (the neural engine on every restyle model)."""
    with serve(tmp_path_factory.mktemp("server")) as live:
        yield live
