"""Where the published Python client `decart==0.2.4` (LiveKit transport) has its virtual
environment, and building it: for the tests (tests/decart_current.py) and the benches
(bench/livekit_latency.py) alike, neither importing the other's folder for it.

`decart==0.0.30` (the direct WebRTC client) is in the test environment, and 0.2.4 has the
same package name, so the two cannot share one. `python()` builds a second environment once
per lock file, interpreter and machine, in the user cache (`LIVEMORPH_CACHE_DIR` moves it):
`pip install --require-hashes --no-deps` of exactly what `tests/data/decart-py/requirements.txt`
pins (decart[realtime] 0.2.4, livekit 1.2.1 and everything they need, each with its hashes)
from the index pip is configured for. It is built under a scratch name and renamed into
place, so processes that build it at once do not clash. `requirements.in` beside the lock
says how the lock was made.

Nothing here needs pytest: a build that cannot happen (no registry reachable, too slow)
raises `Unavailable`, one that installs the wrong thing raises `Broken`; the tests turn the
first into a skip (a failure under CI=true), the benches into an error message.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.2.4"
LIVEKIT_VERSION = "1.2.1"
LOCK = Path(__file__).resolve().parent.parent / "tests" / "data" / "decart-py" / "requirements.txt"
#: Building the environment: about 500 MB of wheels, most of it OpenCV and LiveKit's FFI.
INSTALL_TIMEOUT = 600


class Unavailable(RuntimeError):
    """The environment could not be built here: the package index unreachable, or too slow."""


class Broken(RuntimeError):
    """The environment was built but is not what the lock asks for."""


def cache_root() -> Path:
    configured = os.environ.get("LIVEMORPH_CACHE_DIR")
    if configured:
        return Path(configured)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("livemorph", appauthor=False))


def location() -> Path:
    """The environment's folder for this lock and this interpreter (built or not)."""
    # A virtual environment runs on the interpreter that made it: that is part of its name.
    interpreter = f"{sys.version}\n{os.path.realpath(sys.base_prefix)}".encode()
    digest = hashlib.sha256(LOCK.read_bytes() + interpreter).hexdigest()[:16]
    return cache_root() / "decart-py" / f"{VERSION}-{digest}"


@functools.cache
def python() -> Path:
    """The interpreter of the environment with `decart[realtime]==0.2.4`, built once."""
    target = location()
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
            raise Broken(f"the lock installed decart and livekit {found}, not {VERSION}")
        with contextlib.suppress(OSError):  # another process got there first: the same set
            venv.rename(target)
    if not python.exists():
        raise Broken(f"no interpreter at {python} after building the environment")
    return python


_VERSIONS = "import importlib.metadata as m; print(m.version('decart'), m.version('livekit'))"


def _run(command: list[str], what: str) -> None:
    try:
        subprocess.run(command, capture_output=True, text=True, check=True, timeout=INSTALL_TIMEOUT)
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or error.stdout or "").strip()[-1500:]
        raise Unavailable(
            f"{what} failed for decart[realtime]=={VERSION} (is the Python package index "
            f"reachable? the environment installs {LOCK.name} from it):\n{tail}"
        ) from None
    except subprocess.TimeoutExpired:
        raise Unavailable(
            f"{what} for decart[realtime]=={VERSION} took over {INSTALL_TIMEOUT} s"
        ) from None
