"""The published browser SDK, `@decartai/sdk`, as one ES module a test page can load.

Two releases are tested, each unchanged:

- `0.0.46` (tests/data/decart-js): direct WebRTC to `/v1/stream`. Its realtime base URL is
  hard-coded, so `published_sdk(url)` rewrites that one string to a test server's and
  nothing else.
- `0.1.20` (tests/data/decart-js-0.1.20): LiveKit rooms (`livekit_join` on `/v1/stream`,
  then `livekit-client` to the room). `createDecartClient` takes `baseUrl` and
  `realtimeBaseUrl` options, as an app pointing it at its own server would pass them, so
  its bundle is used as built (`published_bundle("0.1.20")`); its telemetry is off when a
  page passes `telemetry: false`.

The packages are ES modules that import other npm packages (zod, mitt, p-retry, and for
0.1.20 livekit-client), so a page cannot load their `dist/` as it is: esbuild bundles each,
changing nothing else. `npm ci` installs exactly what the release's `package-lock.json` pins
(the SDK, its dependencies and esbuild, each checked against its integrity hash) from the
registry npm is configured for, into the user cache (`LIVEMORPH_CACHE_DIR` moves it), once
per lockfile.

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
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "@decartai/sdk"
DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Release:
    """One published release of the SDK and how a page gets it."""

    version: str
    #: Holds the package.json and package-lock.json that pin it.
    lock_dir: Path
    #: The module esbuild bundles: the SDK's exports, and whatever else the tests need.
    entry: str


#: The direct-WebRTC SDK; its realtime base URL is hard-coded (`createDecartClient`).
VERSION = "0.0.46"
#: The LiveKit SDK, which takes `baseUrl` and `realtimeBaseUrl`.
LIVEKIT_VERSION = "0.1.20"
#: The realtime base URL 0.0.46's bundle has hard-coded.
HOSTED_REALTIME_URL = "wss://api3.decart.ai"
LOCK_DIR = DATA / "decart-js"

RELEASES = {
    VERSION: Release(VERSION, LOCK_DIR, f'export * from "{PACKAGE}";\n'),
    # livekit-client is the copy the SDK itself uses (one module in the bundle): its
    # setLogLevel lets a test page see what the room does, its version which one it is.
    LIVEKIT_VERSION: Release(
        LIVEKIT_VERSION,
        DATA / "decart-js-0.1.20",
        f'export * from "{PACKAGE}";\n'
        "export { setLogLevel as setLiveKitLogLevel, version as liveKitVersion } "
        'from "livekit-client";\n',
    ),
}


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
def published_bundle(version: str = VERSION) -> str:
    """The bundled text of `@decartai/sdk@VERSION`, built once per lockfile and machine."""
    release = RELEASES[version]
    npm = shutil.which("npm")
    if npm is None:
        _unavailable(
            f"npm not found: the test of the published {PACKAGE}@{version} needs Node.js and "
            "npm (scripts/install-system-deps.sh installs Debian's when there are none)"
        )
    files = [release.lock_dir / "package.json", release.lock_dir / "package-lock.json"]
    pinned = b"".join(path.read_bytes() for path in files)
    if version != VERSION:  # 0.0.46's cache key is what it always was
        pinned += release.entry.encode()
    digest = hashlib.sha256(pinned).hexdigest()[:16]
    target = _cache_root() / "decart-js" / f"{version}-{digest}"
    bundle = target / "decart-sdk.js"
    if bundle.exists():
        return bundle.read_text()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        work = Path(scratch)
        for path in files:
            shutil.copy(path, work / path.name)
        # Scripts stay off: esbuild finds its binary in its platform package without them.
        _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], work, "npm ci", version)
        installed = work / "node_modules" / "@decartai" / "sdk" / "package.json"
        if f'"version": "{version}"' not in installed.read_text():
            pytest.fail(f"npm installed another version than {PACKAGE}@{version}")
        (work / "entry.js").write_text(release.entry)
        esbuild = work / "node_modules" / ".bin" / "esbuild"
        args = ["entry.js", "--bundle", "--format=esm", "--platform=browser"]
        _run([str(esbuild), *args, "--outfile=decart-sdk.js"], work, "esbuild", version)
        staged = work / "staged"
        staged.mkdir()
        shutil.move(work / "decart-sdk.js", staged / "decart-sdk.js")
        with contextlib.suppress(OSError):  # another process got there first: same bytes
            staged.rename(target)
    return bundle.read_text()


def _run(command: list[str], cwd: Path, what: str, version: str) -> None:
    try:
        subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True, timeout=300)
    except subprocess.CalledProcessError as error:
        tail = (error.stderr or error.stdout or "").strip()[-1500:]
        _unavailable(
            f"{what} failed for {PACKAGE}@{version} (is the npm registry reachable?):\n{tail}"
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{what} for {PACKAGE}@{version} took over 300 s")


def published_sdk(realtime_url: str) -> str:
    """The published 0.0.46 SDK as one ES module whose realtime sessions go to `realtime_url`
    (`ws://HOST:PORT`) instead of Decart's service: that one string is all that changes."""
    text = published_bundle(VERSION)
    found = text.count(f'"{HOSTED_REALTIME_URL}"')
    assert found == 1, f"expected {HOSTED_REALTIME_URL} once in the bundle, found it {found} times"
    return text.replace(f'"{HOSTED_REALTIME_URL}"', f'"{realtime_url}"')


def published_livekit_sdk() -> str:
    """The published 0.1.20 SDK (LiveKit transport) as one ES module, exactly as built: a page
    points it at a server with `createDecartClient({baseUrl, realtimeBaseUrl})`."""
    return published_bundle(LIVEKIT_VERSION)
