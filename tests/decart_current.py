"""The published Python client `decart==0.2.4`, whose realtime sessions run over LiveKit, in
a virtual environment of its own, for the tests.

`decart==0.0.30` (the direct WebRTC client that tests/test_decart_client.py drives) is in
the test environment, and 0.2.4 has the same package name, so the two cannot share one.
bench/decart_venv.py knows where that environment is and builds it, once per lock file,
interpreter and machine, from exactly what `tests/data/decart-py/requirements.txt` pins;
the benches use it too. `driver_python()` is its interpreter, for a test.

`Driver` runs `tests/data/decart-py/drive.py` there against a server: a scenario whose
events come back as JSON lines, and whose frames land as .npy files in its folder.

When the environment cannot be built (no registry reachable), the tests that need it skip,
or fail under CI=true, saying what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path
from typing import IO, Any, NoReturn

import numpy as np
import pytest
from bench import decart_venv

DATA_DIR = Path(__file__).parent / "data" / "decart-py"
DRIVER = DATA_DIR / "drive.py"


def _unavailable(message: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@functools.cache
def driver_python() -> Path:
    """The interpreter of the environment with `decart[realtime]==0.2.4`, built once."""
    try:
        return decart_venv.python()
    except decart_venv.Unavailable as error:
        _unavailable(str(error))
    except decart_venv.Broken as error:
        pytest.fail(str(error))


class Driver:
    """drive.py running one scenario: its events as they come (also kept in
    `out/events.jsonl`), its stderr in `out/driver.log`.

    with Driver(out, "--scenario", "session", ...) as driver:
        driver.until("checkpoint")   # the event dict; fails with the log if it never comes
        driver.resume()              # past a --pause-at checkpoint
    driver.events                    # all of them, once the process has ended
    """

    def __init__(self, out: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.events: list[dict[str, Any]] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log = open(out / "driver.log", "w")  # noqa: SIM115 (closed in close())
        self.process = subprocess.Popen(
            [str(driver_python()), str(DRIVER), "--out", str(out), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.process.stdout is not None
        threading.Thread(target=self._read, args=(self.process.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next(self, deadline: float) -> dict[str, Any] | None:
        """The next event (None once the process has closed stdout)."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"drive.py said nothing in time\n{self.report()}") from None
            if line is None:
                return None
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not one of ours: something printed to stdout
            self.events.append(event)
            with open(self.out / "events.jsonl", "a") as kept:  # evidence, beside the log
                kept.write(line)
            return event

    def until(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Read events up to the first `name`. A step that failed and stopped the scenario
        ends the wait too, with an assertion that shows it; one that the scenario went on
        after is only recorded (`step()` checks it)."""
        deadline = time.monotonic() + timeout
        while (event := self._next(deadline)) is not None:
            stopped = event.get("ok") is False and event.get("fatal", True)
            if event["event"] in (name, "crashed") or stopped:
                assert event["event"] == name and event.get("ok", True), self.report()
                return event
        raise AssertionError(f"drive.py ended before {name!r}\n{self.report()}")

    def resume(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def finish(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Every event, once drive.py has ended; it must have ended well."""
        deadline = time.monotonic() + timeout
        while self._next(deadline) is not None:
            pass
        code = self.process.wait(max(1.0, deadline - time.monotonic()))
        assert code == 0 and self.events[-1]["event"] == "done", self.report()
        return self.events

    def event(self, name: str) -> dict[str, Any]:
        for event in self.events:
            if event["event"] == name:
                return event
        raise AssertionError(f"no {name!r} event\n{self.report()}")

    def step(self, name: str) -> dict[str, Any]:
        """The event of the step `name`, which must have been reached and gone well."""
        event = self.event(name)
        assert event.get("ok", True), f"step {name!r} failed\n{self.report()}"
        return event

    def frame(self, name: str) -> np.ndarray:
        return np.load(self.out / name)

    def report(self) -> str:
        """The events so far and the end of drive.py's log, for an assertion's message."""
        if not self._log.closed:
            self._log.flush()
        log = (self.out / "driver.log").read_text(errors="replace")
        events = "\n".join(json.dumps(event)[:3000] for event in self.events)
        return f"events:\n{events}\ndrive.py's log (end):\n{log[-6000:]}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._log.close()
