"""The published browser SDK, `@decartai/sdk@0.0.46`, as one ES module a test page can load.

The package is an ES module that imports three npm packages (zod, mitt, p-retry, and p-retry a
CommonJS one), so a page cannot load its `dist/` as it is: esbuild bundles it, changing
nothing else. `npm ci` installs exactly what `tests/data/decart-js/package-lock.json` pins
(the SDK, its dependencies and esbuild, each checked against its integrity hash) from the
registry npm is configured for, into the user cache (`LIVEMORPH_CACHE_DIR` moves it), once per
lockfile. The bundle still talks to Decart's hosted service: `published_sdk(url)` rewrites
its one hard-coded realtime base URL to a test server's and nothing else.

Without npm (Node.js), or when the registry cannot be reached, the tests that need it skip,
or fail under CI=true, saying what to install, as the tests that need Chromium do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

PACKAGE = "@decartai/sdk"
VERSION = "0.0.46"
#: The realtime base URL the published bundle has hard-coded (`createDecartClient`).
HOSTED_REALTIME_URL = "wss://api3.decart.ai"
LOCK_DIR = Path(__file__).parent / "data" / "decart-js"


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
def published_bundle() -> str:
    """The bundled text of `@decartai/sdk@0.0.46`, built once per lockfile and machine."""
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(
            f"npm not found: the test of the published {PACKAGE}@{VERSION} needs Node.js and "
            "npm (scripts/install-system-deps.sh installs Debian's when there are none)"
        )
    files = [LOCK_DIR / "package.json", LOCK_DIR / "package-lock.json"]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in files)).hexdigest()[:16]
    target = _cache_root() / "decart-js" / f"{VERSION}-{digest}"
    bundle = target / "decart-sdk.js"
    if bundle.exists():
        return bundle.read_text()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        work = Path(scratch)
        for path in files:
            shutil.copy(path, work / path.name)
        # Scripts stay off: esbuild finds its binary in its platform package without them.
        _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], work, "npm ci")
        installed = work / "node_modules" / "@decartai" / "sdk" / "package.json"
        if f'"version": "{VERSION}"' not in installed.read_text():
            pytest.fail(f"npm installed another version than {PACKAGE}@{VERSION}")
        (work / "entry.js").write_text(f'export * from "{PACKAGE}";\n')
        esbuild = work / "node_modules" / ".bin" / "esbuild"
        args = ["entry.js", "--bundle", "--format=esm", "--platform=browser"]
        _run([str(esbuild), *args, "--outfile=decart-sdk.js"], work, "esbuild")
        staged = work / "staged"
        staged.mkdir()
        shutil.move(work / "decart-sdk.js", staged / "decart-sdk.js")
        with contextlib.suppress(OSError):  # another process got there first: same bytes
            staged.rename(target)
    return bundle.read_text()


def _run(command: list[str], cwd: Path, what: str) -> None:
    try:
        subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True, timeout=300)
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or error.stdout or "").strip()[-1500:]
        _unavailable(
            f"{what} failed for {PACKAGE}@{VERSION} (is the npm registry reachable?):\n{tail}"
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{what} for {PACKAGE}@{VERSION} took over 300 s")


def published_sdk(realtime_url: str) -> str:
    """The published SDK as one ES module whose realtime sessions go to `realtime_url`
    (`ws://HOST:PORT`) instead of Decart's service: that one string is all that changes."""
    text = published_bundle()
    found = text.count(f'"{HOSTED_REALTIME_URL}"')
    assert found == 1, f"expected {HOSTED_REALTIME_URL} once in the bundle, found it {found} times"
    return text.replace(f'"{HOSTED_REALTIME_URL}"', f'"{realtime_url}"')
