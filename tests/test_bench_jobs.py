"""bench/jobs.py runs end to end with the least it can do: two 1 s clips through one job
worker, a session of 3 s alone and beside the jobs; its lines of figures parse."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "bench" / "jobs.py"
NUMBER = r"(\d+(?:\.\d+)?)"
RATIO = r"(\d+\.\d+|nan)"


def test_the_jobs_bench_prints_its_figures() -> None:
    tiny = ["--clips", "2", "--clip-seconds", "1", "--workers", "1"]
    tiny += ["--seconds", "2", "--warmup", "0.5", "--capacity", "off", "--engine", "grade"]
    result = subprocess.run(
        [sys.executable, str(BENCH), *tiny],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=BENCH.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = result.stdout.split("==== bench/jobs.py ====", 1)[1]
    batch = re.search(
        rf"^throughput --job-workers 1: 2 jobs in {NUMBER} s\s+jobs/min {NUMBER}\s+"
        rf"video s/s {NUMBER}\s+submit->completed p50 {NUMBER} s\s+p95 {NUMBER} s$",
        report,
        re.M,
    )
    assert batch is not None, report
    wall, per_minute, video, p50, p95 = (float(batch.group(i)) for i in range(1, 6))
    assert wall > 0 and per_minute > 0 and video > 0, report
    assert 0 < p50 <= p95 <= wall, report
    for label in ("session alone mirage", "session \\+ jobs mirage"):
        pattern = rf"^{label}\s+first\s+{NUMBER} ms\s+p50\s+{NUMBER}.*fps\s+{NUMBER}"
        row = re.search(pattern, report, re.M)
        assert row is not None, report
        assert float(row.group(3)) > 0, report
    summary = re.search(
        rf"^beside jobs \(--job-workers 1 --capacity off, \d+ jobs finished\): "
        rf"session fps {NUMBER} -> {NUMBER} \(ratio {RATIO}\)\s+"
        rf"p50 {NUMBER} -> {NUMBER} ms \(ratio {RATIO}\)\s+p95 {NUMBER} -> {NUMBER} ms\s+"
        rf"jobs video s/s {NUMBER} -> {NUMBER} \(ratio {RATIO}\)$",
        report,
        re.M,
    )
    assert summary is not None, report
    assert float(summary.group(1)) > 0 and float(summary.group(2)) > 0, report
