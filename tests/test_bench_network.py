"""bench/network.py runs end to end with the least it can do: one short run per client at
2% loss with its dropout; each prints a row of figures, and the picture came back."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import require_chromium

pytestmark = [pytest.mark.slow, pytest.mark.browser]

BENCH = Path(__file__).resolve().parent.parent / "bench" / "network.py"
NUMBER = r"(\d+(?:\.\d+)?)"


def test_the_network_bench_prints_both_clients() -> None:
    require_chromium()
    result = subprocess.run(
        [sys.executable, str(BENCH), "--loss", "2", "--seconds", "5", "--dropout-at", "1.5"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {
        match.group(1): match
        for match in re.finditer(
            rf"^(chromium|sdk)\s+loss\s+2%\s+fps\s+{NUMBER}.*?longest stall\s+{NUMBER} ms.*?"
            rf"back (never|{NUMBER} ms) after the dropout",
            result.stdout,
            re.M,
        )
    }
    assert set(rows) == {"chromium", "sdk"}, result.stdout
    for row in rows.values():
        assert float(row.group(2)) > 0, result.stdout
        assert row.group(4) != "never", f"the picture never came back: {result.stdout}"
    assert re.search(rf"^sdk .*p50\s+{NUMBER} ms\s+p95\s+{NUMBER} ms", result.stdout, re.M)
