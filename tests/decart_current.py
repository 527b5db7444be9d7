"""The published Python client `decart==0.2.4`, whose realtime sessions run over LiveKit, in
a virtual environment of its own.

`decart==0.0.30` (the direct WebRTC client that tests/test_decart_client.py drives) is in
the test environment, and 0.2.4 has the same package name, so the two cannot share one.
`driver_python()` builds a second environment once per lock file, interpreter and machine,
in the user cache (`LIVEMORPH_CACHE_DIR` moves it): `pip install --require-hashes --no-deps`
of exactly what `tests/data/decart-py/requirements.txt` pins (decart[realtime] 0.2.4,
livekit 1.2.1 and everything they need, each with its hashes) from the index pip is
configured for. It is built under a scratch name and renamed into place, so test processes
that build it at once do not clash. `tests/data/decart-py/requirements.in` says how the
lock was made.

`Driver` runs `tests/data/decart-py/drive.py` there against a server: a scenario whose
events come back as JSON lines, and whose frames land as .npy files in its folder.

When the environment cannot be built (no registry reachable), the tests that need it skip,
or fail under CI=true, saying what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest

VERSION = "0.2.4"
LIVEKIT_VERSION = "1.2.1"
DATA_DIR = Path(__file__).parent / "data" / "decart-py"
LOCK = DATA_DIR / "requirements.txt"
DRIVER = DATA_DIR / "drive.py"
#: Building the environment: about 500 MB of wheels, most of it OpenCV and LiveKit's FFI.
INSTALL_TIMEOUT = 600


def _unavailable(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _cache_root() -> Path:
    configured = os.environ.get("LIVEMORPH_CACHE_DIR")
    if configured:
        return Path(configured)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("livemorph", appauthor=False))


@functools.cache
def driver_python() -> Path:
    """The interpreter of the environment with `decart[realtime]==0.2.4`, built once."""
    # A virtual environment runs on the interpreter that made it: that is part of its name.
    interpreter = f"{sys.version}\n{os.path.realpath(sys.base_prefix)}".encode()
    digest = hashlib.sha256(LOCK.read_bytes() + interpreter).hexdigest()[:16]
    target = _cache_root() / "decart-py" / f"{VERSION}-{digest}"
    python = target / "bin" / "python"
    if python.exists():
        return python
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".building-") as scratch:
        venv = Path(scratch) / "venv"
        # No pip inside: this interpreter's pip installs into it (`pip --python`), so the
        # environment holds only what the lock names, and nothing in it knows its path.
        _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], "python -m venv")
        built = venv / "bin" / "python"
        _run(
            [
                *(sys.executable, "-m", "pip", "--python", str(built), "install"),
                *("--quiet", "--no-input", "--require-hashes", "--no-deps"),
                *("--requirement", str(LOCK)),
            ],
            "pip install",
        )
        found = subprocess.run(
            [str(built), "-c", _VERSIONS],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if found != [VERSION, LIVEKIT_VERSION]:
            pytest.fail(f"the lock installed decart and livekit {found}, not {VERSION}")
        with contextlib.suppress(OSError):  # another process got there first: the same set
            venv.rename(target)
    if not python.exists():
        pytest.fail(f"no interpreter at {python} after building the environment")
    return python


_VERSIONS = "import importlib.metadata as m; print(m.version('decart'), m.version('livekit'))"


def _run(command: list[str], what: str) -> None:
    try:
        subprocess.run(command, capture_output=True, text=True, check=True, timeout=INSTALL_TIMEOUT)
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or error.stdout or "").strip()[-1500:]
        _unavailable(
            f"{what} failed for decart[realtime]=={VERSION} (is the Python package index "
            f"reachable? the environment installs {LOCK.name} from it):\n{tail}"
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{what} for decart[realtime]=={VERSION} took over {INSTALL_TIMEOUT} s")


class Driver:
    """drive.py running one scenario: its events as they come, its stderr in `out/driver.log`.

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
            return event

    def until(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        """Read events up to the first `name` (a failed step's event ends the wait too:
        the assertion shows it)."""
        deadline = time.monotonic() + timeout
        while (event := self._next(deadline)) is not None:
            if event["event"] == name or event.get("ok") is False or event["event"] == "crashed":
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
