"""Admission by capacity: a node takes a session only if its sessions keep their frame rate.

Four `mirage` sessions on a 2-core node, all admitted, got about 4 fps each where one alone
gets 21-25: every session sank together. So each session takes a share of the node, and a
new one is refused (`Server at capacity, try again shortly`, close 1013: the SDKs retry)
when its share would not fit beside the others':

- **Configured** (`--capacity mirage=2,live_avatar=4`): a session of a named model takes
  1/N of the node, from the moment it is admitted, streaming or not. A node with one
  `mirage` session has room for two `live_avatar` sessions here.
- **Estimated** (every model not named, `--capacity auto`, the default): a session takes
  cost / budget, where the budget is the cores this node can have: its CPU affinity or
  cgroup quota (`available_cores`), less what other processes take (the process's own CPU
  plus the idle share of those cores, from /proc/stat; a running mean). On a machine it
  shares, a node gets what the others leave: bench/capacity.py's 1-core node got 0.25 to
  0.79 of its core while other processes kept the machine busy. The cost is the CPU
  (cores) one session of its model uses at the model's frame rate, measured from the
  sessions that run: each second, the process's CPU time over that second divided by the
  frames its sessions processed, times the model's fps.
  Frames, not seconds, so a session held back by its camera or by the machine is costed at
  its full rate. CPU time is the whole process's (decoding, the engine, encoding, RTP, the
  event loop), not the engine's alone: on a 2-core machine the neural network took 23.6 ms
  of the 40 ms interval, yet decoding and encoding left no CPU for more (scaler.py). A second
  in which sessions of several models ran says nothing about one model alone, so it only
  updates the node's behind check below. Estimates are running means (`SMOOTHING`).
  A session counts once its offer has been answered (or it has camera frames): one that has
  not negotiated media costs nothing yet, and the offer is checked again (stream.py), so
  sessions that connect at the same moment are let in and sorted out at their offers.
  Before a model has been measured on this node, its session counts as `DEFAULT_COST`
  cores: one `mirage` session on the neural engine used 0.88-0.94 of a core on the bench
  machine (README), the most of any CPU engine measured, so a 2-core node takes two
  unmeasured sessions, which is what it served at rate there (23.2 and 24.6 fps).
- **Behind**: whatever the figures say, a node one of whose sessions is getting under
  `BEHIND_AT` of the frames it could takes no new session until it recovers: that session
  is short of CPU (or GPU) already. What it could is its camera's decoded frames (at most
  the model's fps) while the machine has CPU to spare, and the model's fps while it has
  not (under `SPARE_AT` of the node's cores idle, from /proc/stat): a starved node loses
  frames before the engine, in the decoder, where counting only decoded frames does not
  see them. Measured with bench/capacity.py on a 1-core node of a machine other processes
  kept busy: three `mirage` sessions each got 11 fps of their 25, and each processed every
  frame it decoded. One `mirage` session alone on the slowest 2-core machine measured got
  21.3 of 25 fps (0.85); the four that sank got 0.16.

A node with no session of any weight takes one whatever the figures say: a model that
cannot reach its rate even alone is still served, and is measured only by running.
`--max-sessions` stays a hard cap over all of this (`Limits`). `--capacity off` switches
admission by capacity off.

The costs are the process's CPU (`time.process_time`), not the machine's: what other
processes take is not this node's sessions' cost; it shows in the budget, and in the behind
check once the machine has no CPU left. On a GPU node the CPU says little of the GPU's
load: there, configure `--capacity` from `bench/diffusion.py`'s figures; the behind check
still holds.

The node's batch jobs run in processes of their own at `SCHED_IDLE` (job_process.py): the
kernel gives a session any CPU they hold the moment it wants it. So the CPU they use counts
as idle here (`yielding`, their CPU seconds so far): a node busy with a job alone still has
its cores for sessions, and a session is not judged starved for the CPU a job fills.

The clock, the process's CPU, the machine's idle share and the cores are injectable, so
tests feed readings rather than race time.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..config import Settings, capacity_counts
from ..models import CATALOG, ModelSpec
from .limits import AT_CAPACITY

logger = logging.getLogger(__name__)

#: Cores one session of a model not yet measured here counts for (see the module's text).
DEFAULT_COST = 1.0
#: A session getting under this share of the frames it could puts the node behind.
BEHIND_AT = 0.8
#: Seconds between two load readings.
SAMPLE_EVERY = 1.0
#: Weight of the newest reading in the running means of costs and frame shares: about
#: three readings' memory, so one slow second (a garbage collection, a neighbour's burst)
#: does not refuse sessions on its own, and a real overload shows within a few seconds.
SMOOTHING = 0.3
#: Frames a reading needs before it says anything: fewer make the costs noise.
MIN_FRAMES = 10
#: Frames a session must have been able to process in a reading before it is judged.
MIN_EXPECTED = 5
#: Under this share of the node's cores idle, the machine has no CPU to spare: the same
#: threshold at which the neural engine's scaler steps a session down (SPARE_DOWN).
SPARE_AT = 0.05
#: The rounding slack of a full node (three shares of 1/3 add up to 1.0000000000000002).
EPSILON = 1e-9

Clock = Callable[[], float]


class Pipeline(Protocol):
    @property
    def frames_in(self) -> int: ...
    @property
    def frames_out(self) -> int: ...


class Running(Protocol):
    """What capacity reads of a session: its id, model and frame counts."""

    @property
    def id(self) -> str: ...
    @property
    def spec(self) -> ModelSpec: ...
    @property
    def pipeline(self) -> Pipeline: ...


def available_cores(
    cgroup: Path = Path("/sys/fs/cgroup/cpu.max"),
) -> float:
    """The cores this process may use: its CPU affinity, or its cgroup's quota if lower (a
    container started with `--cpus 2` on a 64-core host has 2)."""
    try:
        cores = float(len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = float(os.cpu_count() or 1)
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return max(cores, 0.1)


class IdleCpu:
    """The idle share (0..1) of the cores this process may use, from /proc/stat's per-core
    lines, since the previous call; 1.0 the first time and where /proc/stat is missing."""

    def __init__(self, path: Path = Path("/proc/stat")) -> None:
        self._path = path
        try:
            self._cores = {f"cpu{core}" for core in os.sched_getaffinity(0)}
        except AttributeError:
            self._cores = set()
        self._last: tuple[int, int] | None = None

    def _read(self) -> tuple[int, int] | None:
        idle = total = 0
        try:
            lines = self._path.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            name, *values = line.split()
            if name in self._cores or (not self._cores and name == "cpu"):
                ticks = [int(value) for value in values[:8]]
                idle += ticks[3] + ticks[4]  # idle + iowait
                total += sum(ticks)
        return (idle, total) if total else None

    def __call__(self) -> float:
        reading = self._read()
        last, self._last = self._last, reading
        if reading is None or last is None or reading[1] <= last[1]:
            return 1.0
        return (reading[0] - last[0]) / (reading[1] - last[1])


@dataclass(slots=True)
class _Seen:
    frames_in: int
    frames_out: int
    #: Running mean of the share of the frames it could have processed that it did.
    share: float | None = None


class Capacity:
    """The node's admission by capacity: `sample` reads the load, `refuse` decides."""

    def __init__(
        self,
        configured: dict[str, int] | None = None,
        *,
        estimate: bool = True,
        cores: float | None = None,
        clock: Clock = time.monotonic,
        cpu_time: Clock = time.process_time,
        idle: Clock | None = None,
        default_cost: float = DEFAULT_COST,
        yielding: Clock | None = None,
    ) -> None:
        self.configured = dict(configured or {})
        if any(count < 1 for count in self.configured.values()):
            raise ValueError("a configured capacity is 1 session or more")
        self.estimate = estimate
        self.cores = cores if cores is not None else available_cores()
        #: The cores this node's sessions can have: its own CPU plus what lies idle, at
        #: most `cores` (running mean); `cores` until the first reading.
        self.budget = self.cores
        self.default_cost = default_cost
        self._clock = clock
        self._cpu_time = cpu_time
        self._idle = idle if idle is not None else IdleCpu()
        #: CPU seconds used so far by processes that yield to this one's (the node's jobs).
        self.yielding: Clock = yielding if yielding is not None else _nothing
        # (when, process CPU seconds, yielding processes' CPU seconds)
        self._last: tuple[float, float, float] | None = None
        self._seen: dict[str, _Seen] = {}
        #: Measured cores per session at full rate, by model (running means).
        self.costs: dict[str, float] = {}

    @classmethod
    def from_settings(cls, settings: Settings, **options: object) -> Capacity:
        counts = capacity_counts(settings.capacity)
        if counts is None:
            return cls(estimate=False, **options)  # type: ignore[arg-type]
        return cls(counts, **options)  # type: ignore[arg-type]

    @property
    def on(self) -> bool:
        return self.estimate or bool(self.configured)

    # -- reading the load -------------------------------------------------------------

    def sample(self, sessions: Iterable[Running]) -> None:
        """Read the process's CPU and each session's frames since the last reading."""
        now, cpu, yielded = self._clock(), self._cpu_time(), self.yielding()
        idle = self._idle()
        last, self._last = self._last, (now, cpu, yielded)
        if last is not None and now > last[0] and yielded >= last[2]:
            # what the jobs used was there for the sessions' taking
            idle = min(1.0, idle + (yielded - last[2]) / (now - last[0]) / self.cores)
        starved = idle < SPARE_AT
        sessions = list(sessions)
        seen: dict[str, _Seen] = {}
        processed: dict[str, int] = {}  # frames processed by model, this reading
        for session in sessions:
            pipeline = session.pipeline
            before = self._seen.get(session.id) or _Seen(0, 0)
            now_seen = seen[session.id] = _Seen(pipeline.frames_in, pipeline.frames_out)
            now_seen.share = before.share
            if last is None:
                continue
            came = pipeline.frames_in - before.frames_in
            done = pipeline.frames_out - before.frames_out
            processed[session.spec.name] = processed.get(session.spec.name, 0) + done
            rate = session.spec.fps * (now - last[0])
            could = rate if starved else min(float(came), rate)
            # judged only over a whole reading of streaming: not while it starts or pauses
            if before.frames_in > 0 and came > 0 and could >= MIN_EXPECTED:
                share = min(1.0, done / could)
                now_seen.share = _mean(before.share, share)
        self._seen = seen
        if last is not None and now > last[0] and cpu >= last[1]:
            own = (cpu - last[1]) / (now - last[0])
            self.budget = _mean(self.budget, min(self.cores, own + idle * self.cores))
        if last is None or len(processed) != 1:
            return
        [(model, frames)] = processed.items()
        if frames >= MIN_FRAMES and cpu >= last[1]:
            fps = next(s.spec.fps for s in sessions if s.spec.name == model)
            self.costs[model] = _mean(self.costs.get(model), (cpu - last[1]) / frames * fps)

    async def run(self, sessions: Callable[[], Iterable[Running]]) -> None:
        """Sample every `SAMPLE_EVERY` seconds until cancelled (AppState starts this)."""
        while True:
            self.sample(sessions())
            await asyncio.sleep(SAMPLE_EVERY)

    # -- deciding ---------------------------------------------------------------------

    def cost(self, model: str) -> float:
        """Cores one session of an estimated model takes at its rate: measured, or the
        default until it has been."""
        return self.costs.get(model, self.default_cost)

    def share(self, model: str) -> float:
        """The share of this node one streaming session of `model` takes."""
        if model in self.configured:
            return 1.0 / self.configured[model]
        return self.cost(model) / max(self.budget, 0.01) if self.estimate else 0.0

    def sessions_of(self, model: str) -> int | None:
        """How many sessions of `model` alone this node takes (None: no limit here)."""
        share = self.share(model)
        return max(1, math.floor(1.0 / share + EPSILON)) if share > 0 else None

    def _weight(self, session: Running) -> float:
        model = session.spec.name
        if model in self.configured:
            return self.share(model)  # counted from admission, as a count of sessions is
        return self.share(model) if _has_media(session) else 0.0

    def load(self, sessions: Iterable[Running]) -> float:
        """The share of the node its sessions take now (1.0: full)."""
        return sum(self._weight(session) for session in sessions)

    def behind(self, sessions: Iterable[Running]) -> list[Running]:
        """The sessions now getting under `BEHIND_AT` of the frames they could."""
        return [
            session
            for session in sessions
            if (seen := self._seen.get(session.id)) is not None
            and seen.share is not None
            and seen.share < BEHIND_AT
        ]

    def refusal(self, spec: ModelSpec, sessions: Iterable[Running]) -> str | None:
        """Why a new session of `spec` does not fit now, in words for the log; None: it fits."""
        if not self.on:
            return None
        sessions = list(sessions)
        load = self.load(sessions)
        if load <= 0.0:
            return None  # an empty node takes one session, to serve and to measure it
        if slow := self.behind(sessions):
            lowest = min(self._seen[session.id].share or 0.0 for session in slow)
            return (
                f"{len(slow)} session(s) below their frame rate already "
                f"(the lowest getting {lowest:.0%} of the frames it could)"
            )
        share = self.share(spec.name)
        if load + share > 1.0 + EPSILON:
            return (
                f"a {spec.name} session takes {share:.0%} of the node "
                f"and {load:.0%} is taken ({len(sessions)} sessions)"
            )
        return None

    def refuse(self, spec: ModelSpec, sessions: Iterable[Running]) -> str | None:
        """`AT_CAPACITY` when a new session of `spec` does not fit now (the reason is
        logged), else None. Synchronous: the caller adds the session before anything else
        can be admitted."""
        why = self.refusal(spec, sessions)
        if why is None:
            return None
        logger.info("at capacity for %s: %s", spec.name, why, extra={"model": spec.name})
        return AT_CAPACITY


class CapacityMetrics(Collector):
    """`/metrics`' view of it, read at scrape time: the share of the node taken, how many
    sessions of each model the node takes, and the measured costs."""

    def __init__(self, capacity: Capacity, sessions: Callable[[], Iterable[Running]]) -> None:
        self._capacity = capacity
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        capacity = self._capacity
        load = GaugeMetricFamily(
            "livemorph_capacity_load",
            "Share of this node its sessions take (1: full; admission by capacity)",
        )
        load.add_metric([], capacity.load(self._sessions()))
        yield load
        sessions = GaugeMetricFamily(
            "livemorph_capacity_sessions",
            "Sessions of each model this node takes, alone: configured or estimated",
            labels=["model", "source"],
        )
        for model in CATALOG:
            count = capacity.sessions_of(model)
            if count is not None:
                source = "configured" if model in capacity.configured else "estimated"
                sessions.add_metric([model, source], count)
        yield sessions
        costs = GaugeMetricFamily(
            "livemorph_capacity_cost_cores",
            "Measured CPU cores one session of a model takes at its frame rate",
            labels=["model"],
        )
        for model, cost in sorted(capacity.costs.items()):
            costs.add_metric([model], cost)
        yield costs


def _nothing() -> float:
    return 0.0


def _has_media(session: Running) -> bool:
    """Whether a session has negotiated media (its offer answered) or has camera frames."""
    return session.pipeline.frames_in > 0 or getattr(session, "pc", None) is not None


def _mean(previous: float | None, value: float) -> float:
    return value if previous is None else previous + SMOOTHING * (value - previous)


__all__ = ["BEHIND_AT", "DEFAULT_COST", "Capacity", "CapacityMetrics", "available_cores"]
