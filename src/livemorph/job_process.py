"""One batch job in a process of its own, below the node's realtime sessions.

The node's worker (job_worker.py) starts `python -m livemorph.job_process` for each
job, writes the job to its stdin as one JSON object (`JobSpec`), and reads JSON lines from
its stdout: `{"done": n, "total": m}` now and then, then `{"frames": n, "duration": s}` when
the output is written, or `{"error": reason}` when the input cannot be transformed (exit
status 2). Any other end (a crash, a signal) leaves no line and the worker says so.

Why a process rather than a task of the server's:

- **Realtime sessions come first.** The process asks the kernel to run it only when no
  other thread of the machine wants the CPU (`SCHED_IDLE`; `nice 19` where that is
  refused), and every thread it starts (the engine's, the decoder's, the encoder's)
  inherits that. A job then fills the CPU a node's sessions leave, and a session keeps its
  frame rate beside one (bench/jobs.py measures it). In the server's process the engine's
  native threads could not be told apart from the sessions'.
- **A job cannot take the node down.** An input that crashes a decoder or exhausts memory
  ends this process; the worker fails the job with a reason and goes on.
- **A job stops at once** when its lease is lost or the server stops: a process can be
  killed, a thread cannot. And it dies with the server (`PR_SET_PDEATHSIG`), so a server
  killed mid-job leaves no orphan still writing the job's files.

It runs `transform.transform_local`, as `livemorph transform` does, on the engine the node
serves the job's model with (named in the job: `JobSpec.engine`), with the node's prompt
policy settings, which it receives in the environment as `LIVEMORPH_*` variables
(`settings_env`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from .config import Settings, options
from .transform import Job, Progress, TimedPrompt, TransformError, transform_local

#: The node's settings a job's process is given: the prompt policy, and where the text
#: encoder's weights are (the engine itself is named in the job).
JOB_SETTINGS = (
    "text_model",
    "moderation_blocklist",
    "moderation_url",
    "moderation_timeout",
    "enhancer_url",
    "enhancer_model",
    "enhancer_api_key",
    "enhancer_timeout",
)
#: The exit status of a job whose input cannot be transformed (its line says why).
BAD_INPUT = 2
#: Seconds between progress lines.
PROGRESS_EVERY = 0.5
#: The niceness asked for where `SCHED_IDLE` is refused: the lowest priority there is.
LOWEST_NICE = 19


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What the worker asks of the process: paths are absolute, the model a realtime one."""

    input: str
    output: str
    model: str
    prompt: str | None
    image: str | None
    enhance: bool
    #: The worker's process id: the job's process ends at once if it is no longer its parent.
    parent: int
    #: The engine spec the node serves `model` with (`neural`, `diffusion:model=DIR`...);
    #: None: the model's default.
    engine: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls(**json.loads(text))


def settings_env(settings: Settings) -> dict[str, str]:
    """`settings`' JOB_SETTINGS as the `LIVEMORPH_*` variables `Settings.from_env` reads;
    unset ones are left out."""
    env: dict[str, str] = {}
    for option in options():
        if option.name in JOB_SETTINGS:
            value = getattr(settings, option.name)
            if value is not None:
                env[option.env] = str(value)
    return env


def yield_cpu() -> str:
    """Ask to run only on CPU nobody else wants; what was granted, for the log."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined,unused-ignore]
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        with contextlib.suppress(OSError):
            os.nice(LOWEST_NICE - os.nice(0))
        return f"nice {os.nice(0)}"


def die_with(parent: int) -> None:
    """End this process when `parent` ends (Linux's `PR_SET_PDEATHSIG`), and now if it
    already has."""
    name = ctypes.util.find_library("c")
    if name is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            pr_set_pdeathsig = 1
            ctypes.CDLL(name, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _Lines(Progress):
    """Progress as JSON lines on `out`, at most every PROGRESS_EVERY seconds."""

    def __init__(self, out: TextIO) -> None:
        super().__init__(None, stream=out, interactive=False)
        self._sent = -float("inf")

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        if now - self._sent >= PROGRESS_EVERY:
            self._sent = now
            say(self.stream, {"done": done, "total": self.total})


def say(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def run(spec: JobSpec, settings: Settings, out: TextIO) -> int:
    job = Job(
        input=Path(spec.input),
        output=Path(spec.output),
        model=spec.model,
        prompts=[TimedPrompt(0.0, spec.prompt)] if spec.prompt else [],
        image=spec.image,
        enhance=spec.enhance,
    )
    settings = replace(settings, engine=spec.engine, model_engines=None)
    try:
        result = asyncio.run(transform_local(job, settings, _Lines(out)))
    except TransformError as exc:
        say(out, {"error": str(exc)})
        return BAD_INPUT
    say(out, {"frames": result.frames, "duration": result.duration, "seconds": result.seconds})
    return 0


def main() -> int:
    spec = JobSpec.from_json(sys.stdin.readline())
    die_with(spec.parent)
    yield_cpu()
    # stdout carries the protocol alone: anything else a library prints goes to stderr
    out = sys.stdout
    sys.stdout = sys.stderr
    return run(spec, Settings.from_env(), out)


if __name__ == "__main__":
    sys.exit(main())
