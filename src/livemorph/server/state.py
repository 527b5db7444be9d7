"""What the request handlers share: settings, storage, engines, sessions, worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import Settings
from ..engines import EngineRegistry
from ..engines.registry import parse_model_engines
from ..policy import EngineEnhancer, Enhancer, Moderator, PolicyModerator, policy_from_settings
from ..sessions import SessionRegistry
from ..sessions.metering import Meter, StoreMeter, Unmetered
from ..storage import Store
from ..storage.store import WallClock, utcnow
from .capacity import Capacity, CapacityMetrics
from .cluster import ClusterMember, member_from_settings, node_name
from .housekeeping import IdleTidy
from .job_worker import JobWorker
from .limits import Clock, Limits
from .metrics import Metrics
from .queue import AdmissionQueue
from .rooms import Rooms

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AppState:
    settings: Settings
    store: Store
    engines: EngineRegistry
    sessions: SessionRegistry
    executor: ThreadPoolExecutor
    moderator: Moderator = field(default_factory=PolicyModerator)
    enhancer: Enhancer = field(default_factory=EngineEnhancer)
    meter: Meter = field(default_factory=Unmetered)
    limits: Limits = field(default_factory=lambda: Limits.from_settings(Settings()))
    metrics: Metrics = field(default_factory=Metrics)
    capacity: Capacity = field(default_factory=lambda: Capacity(estimate=False))
    #: This node's membership of a cluster (`--redis-url`); None for a single node.
    cluster: ClusterMember | None = None
    #: When this node started (seconds since the epoch).
    started: float = field(default_factory=time.time)
    #: The LiveKit rooms of this node's sessions (`/rtc`, server/rtc.py).
    rooms: Rooms = field(default_factory=Rooms)
    #: LiveKit clients waiting for room on a full node (server/queue.py).
    queue: AdmissionQueue = field(default_factory=lambda: AdmissionQueue(0, 0.0))
    _sampler: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    #: Runs the batch video jobs (server/jobs.py); made and started by `open`.
    job_worker: JobWorker | None = field(default=None, init=False, repr=False)
    #: Gives memory back once the node has no session (server/housekeeping.py).
    tidy: IdleTidy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tidy = IdleTidy(lambda: len(self.sessions))

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        wall_clock: WallClock = utcnow,
        monotonic_clock: Clock = time.monotonic,
    ) -> AppState:
        """The state `settings` describe. The clocks are for tests: the store's (token
        expiry, usage days) and the rate limits' (bucket refills)."""
        store = (
            Store(settings.database_url, wall_clock)
            if settings.database_url
            else Store.in_data_dir(settings.data_dir, wall_clock)
        )
        moderator, enhancer = policy_from_settings(settings)
        engines = EngineRegistry(settings.engine, parse_model_engines(settings.model_engines))
        sessions = SessionRegistry(max_sessions=settings.max_sessions or None)
        metrics = Metrics(sessions, engines)
        capacity = Capacity.from_settings(settings)
        if capacity.on:
            metrics.registry.register(CapacityMetrics(capacity, sessions.all))
        limits = Limits.from_settings(settings, monotonic_clock)
        cluster = member_from_settings(settings, sessions, engines, capacity, limits)
        if cluster is not None:
            cluster.on_relay = metrics.relayed
        return cls(
            settings=settings,
            store=store,
            engines=engines,
            sessions=sessions,
            executor=ThreadPoolExecutor(
                max_workers=settings.engine_threads, thread_name_prefix="engine"
            ),
            moderator=moderator,
            enhancer=enhancer,
            meter=StoreMeter(store, on_recorded=metrics.usage_recorded),
            limits=limits,
            metrics=metrics,
            capacity=capacity,
            cluster=cluster,
            rooms=Rooms(node=cluster.name if cluster is not None else node_name(settings)),
            queue=AdmissionQueue(settings.queue_size, settings.queue_wait),
        )

    async def open(self) -> None:
        await self.store.open()
        if self.capacity.on:
            self._sampler = asyncio.create_task(
                self.capacity.run(self.sessions.all), name="capacity"
            )
        if self.cluster is not None:
            await self.cluster.start()
        self.job_worker = JobWorker(self)
        self.capacity.yielding = self.job_worker.cpu_seconds
        if self.cluster is not None and self.settings.jobs_dir is None:
            logger.warning(
                "jobs: this cluster member keeps batch jobs' files in its own data folder; "
                "another node cannot run the jobs submitted here: give every node the same "
                "--jobs-dir (a shared file system)"
            )
        self.job_worker.start()

    async def close(self) -> None:
        if self.job_worker is not None:
            await self.job_worker.stop()
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
            self._sampler = None
        await self.sessions.close_all("server_shutdown")
        await self.tidy.close()
        if self.cluster is not None:
            await self.cluster.stop()
        self.engines.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        await self.moderator.aclose()
        await self.enhancer.aclose()
        await self.store.close()
