"""The package type-checks: mypy with the settings in pyproject.toml ([tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(300)
def test_mypy_reports_no_errors() -> None:
    # Run from the repository root so mypy reads pyproject.toml and keeps its
    # incremental cache in .mypy_cache/ there (a second run takes seconds).
    result = subprocess.run(
        [sys.executable, "-m", "mypy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"


SDK_USE = """
from livemorph.sdk import ConnectionState, RealtimeClient

def listen(rt: RealtimeClient) -> None:
    rt.on("generation_tick", lambda tick: print(tick.seconds + 1))
    rt.on("error", lambda error: print(error.code))
    def on_state(state: ConnectionState) -> None: ...
    rt.on("connection_change", on_state)
    def on_text(text: str) -> None: ...
    rt.on("generation_tick", on_text)  # wrong: a tick is no str
    rt.on("generation_tik", print)  # wrong: no such event
"""


@pytest.mark.timeout(300)
def test_the_sdk_types_its_events_for_its_users(tmp_path: Path) -> None:
    """A user's type checker knows each event's payload, and refuses an unknown event."""
    use = tmp_path / "use_sdk.py"
    use.write_text(SDK_USE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(use)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    lines = {int(line.split(":")[1]) for line in errors}
    wrong = {n for n, line in enumerate(SDK_USE.splitlines(), 1) if "# wrong" in line}
    assert len(wrong) == 2 and lines == wrong, result.stdout
