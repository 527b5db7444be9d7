"""bench/cluster.py runs end to end with the least it can do: two nodes on redis-server and
the database, one placement run of each kind, one viewer through the node without the
session; it prints both tables."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "cluster.py"


def test_the_cluster_bench_prints_its_tables() -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is missing: run scripts/install-system-deps.sh")
    tiny = ["--nodes", "2", "--runs", "1", "--viewers", "1", "--seconds", "1", "--warmup", "1"]
    result = subprocess.run(
        [sys.executable, str(BENCH), *tiny, "--modes", "shared"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=BENCH.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout.split("==== bench/cluster.py ====", 1)[1]
    for placement in ("served by the entry node", "relayed to another node"):
        for measure in ("session_id", "first frame"):
            assert re.search(rf"^{measure}\s+{placement}(\s+\d+\.\d){{4}}$", report, re.M), report
    assert re.search(r"^relay overhead", report, re.M), report
    # the one viewer, relayed, got frames: its row has a CPU share and a frame rate
    row = re.search(r"^shared\s+1\s+(\d+\.\d)%\s+\S+\s+\S+\s+\S+\s+(\d+\.\d)", report, re.M)
    assert row is not None, report
    assert float(row.group(2)) > 0, report
