"""Every Prometheus metric the server exposes at `GET /metrics`, defined here and nowhere else.

Each app has a registry of its own (not prometheus_client's global one), so several apps in
one process (the tests) count apart. What the frame path pays is kept small:

- frames received, processed, dropped and sent are the counts each session's pipeline keeps
  anyway (plain integer additions); they are read when /metrics is scraped, summed over the
  live sessions plus what ended sessions left behind. So are the active sessions, viewers
  and network sizes: nothing is counted twice, and a session that ends by any path stops
  counting as active without any bookkeeping;
- engine time and latency are observed once per processed or sent frame, on children
  resolved once per session (`FrameTimings`), from clock reads the pipeline makes.

The scrape runs on the event loop (the route is async), where the sessions and their
counts change, so it always sees a session either live or retired, never both or neither.
"""

from __future__ import annotations

import hmac
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._version import __version__
from ..protocol import CLIENT_MESSAGES, SERVER_MESSAGES
from ..sessions.pipeline import FrameTimings
from .limits import (
    AT_CAPACITY,
    CLUSTER_UNAVAILABLE,
    TOO_MANY_MESSAGES,
    TOO_MANY_NEW_SESSIONS,
    TOO_MANY_SESSIONS,
)

if TYPE_CHECKING:
    from ..engines import EngineRegistry
    from ..sessions import Session, SessionRegistry

PREFIX = "livemorph"

#: Refusal reasons, a label with few values: what an operator alerts on.
AT_CAPACITY_REASON = "at_capacity"
KEY_LIMIT_REASON = "key_session_limit"
KEY_JOB_LIMIT_REASON = "key_job_limit"
RATE_LIMIT_REASON = "rate_limit"
INVALID_KEY_REASON = "invalid_key"
MODERATION_REASON = "moderation"
CREDITS_REASON = "insufficient_credits"
CLUSTER_REASON = "cluster_unavailable"
_LIMIT_REASONS = {
    AT_CAPACITY: AT_CAPACITY_REASON,
    TOO_MANY_SESSIONS: KEY_LIMIT_REASON,
    TOO_MANY_NEW_SESSIONS: RATE_LIMIT_REASON,
    TOO_MANY_MESSAGES: RATE_LIMIT_REASON,
    CLUSTER_UNAVAILABLE: CLUSTER_REASON,
}

#: Message types as the protocol names them; anything else a client sends is "unknown",
#: so a client cannot grow the label set.
KNOWN_TYPES = frozenset(CLIENT_MESSAGES) | frozenset(SERVER_MESSAGES)
UNKNOWN_TYPE = "unknown"

#: An engine step: a cheap colour grade is ~1 ms, the neural engine 10-40 ms on a CPU, a
#: diffusion step tens to hundreds of ms on a GPU.
ENGINE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.25, 0.5, 1, 2)
#: Received to sent: one engine step plus the waits for the loop and a worker thread.
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2)
#: A batch job's wait and run: seconds for a clip, up to the half hour a long one may take.
JOB_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)


class Metrics:
    """The metrics of one app, and the hooks the server calls to move them."""

    def __init__(
        self, sessions: SessionRegistry | None = None, engines: EngineRegistry | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.sessions_started = Counter(
            f"{PREFIX}_sessions_started", "Sessions started", ["model", "engine"], registry=reg
        )
        self.sessions_ended = Counter(
            f"{PREFIX}_sessions_ended",
            "Sessions ended, by the reason generation_ended gave",
            ["model", "reason"],
            registry=reg,
        )
        self.refusals = Counter(
            f"{PREFIX}_refusals",
            "Sessions, inputs, messages and tokens refused, by reason",
            ["reason"],
            registry=reg,
        )
        self.messages = Counter(
            f"{PREFIX}_websocket_messages",
            "WebSocket messages by direction (in: from clients) and protocol type",
            ["direction", "type"],
            registry=reg,
        )
        self.relays = Counter(
            f"{PREFIX}_relays",
            "Sockets this cluster member relayed to the member serving them: stream, subscribe",
            ["kind"],
            registry=reg,
        )
        self.engine_seconds = Histogram(
            f"{PREFIX}_engine_seconds",
            "Engine time per processed frame",
            ["model"],
            buckets=ENGINE_BUCKETS,
            registry=reg,
        )
        self.latency_seconds = Histogram(
            f"{PREFIX}_frame_latency_seconds",
            "From a decoded camera frame reaching the pipeline to its output going to the encoder",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.generation_seconds = Counter(
            f"{PREFIX}_generation_seconds",
            "Seconds of generation recorded",
            ["model"],
            registry=reg,
        )
        self.credits_debited = Counter(
            f"{PREFIX}_credits_debited_seconds",
            "Seconds of generation taken off the credits of metered keys",
            ["model"],
            registry=reg,
        )
        self.jobs_finished = Counter(
            f"{PREFIX}_jobs_finished",
            "Batch jobs this node finished, by model and status (completed, failed)",
            ["model", "status"],
            registry=reg,
        )
        self.job_run_seconds = Histogram(
            f"{PREFIX}_job_run_seconds",
            "Wall time of a batch job on this node, from its start to its result",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=reg,
        )
        self.job_wait_seconds = Histogram(
            f"{PREFIX}_job_wait_seconds",
            "Time a batch job this node started had waited since it was submitted",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=reg,
        )
        self.jobs_running = Gauge(
            f"{PREFIX}_jobs_running", "Batch jobs running on this node", registry=reg
        )
        self.jobs = Gauge(
            f"{PREFIX}_jobs",
            "Batch jobs in the database by state (every node of a cluster reads the same "
            "table), as of the worker's last look",
            ["state"],
            registry=reg,
        )
        info = Gauge(
            f"{PREFIX}_info", "Always 1: the server's version, by label", ["version"], registry=reg
        )
        info.labels(__version__).set(1)
        # the process's CPU, memory and open files (Linux), as every Prometheus client has
        ProcessCollector(registry=reg)
        self._live = _LiveSessions(sessions, engines)
        if sessions is not None:
            reg.register(self._live)

    # -- hooks ------------------------------------------------------------------------

    def frame_timings(self, model: str) -> FrameTimings:
        """The per-frame observers of one session, resolved once for its model."""
        return FrameTimings(
            engine=self.engine_seconds.labels(model).observe,
            latency=self.latency_seconds.labels(model).observe,
        )

    def session_started(self, model: str, engine: str | None) -> None:
        self.sessions_started.labels(model, engine or "none").inc()

    def session_ended(self, session: Session) -> None:
        """Call when the session leaves the registry, without awaiting in between: its frame
        counts move from live to retired in one step."""
        self.sessions_ended.labels(session.spec.name, session.end_reason or "ended").inc()
        self._live.retire(session)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def refused_by_limit(self, text: str) -> None:
        """A refusal by one of server/limits.py's texts."""
        self.refused(_LIMIT_REASONS.get(text, RATE_LIMIT_REASON))

    def relayed(self, kind: str) -> None:
        self.relays.labels(kind).inc()

    def message(self, direction: str, kind: str) -> None:
        self.messages.labels(direction, kind if kind in KNOWN_TYPES else UNKNOWN_TYPE).inc()

    def usage_recorded(self, model: str, seconds: int, metered: bool) -> None:
        """The meter wrote `seconds` of generation; `metered`: the key has credits."""
        self.generation_seconds.labels(model).inc(seconds)
        if metered:
            self.credits_debited.labels(model).inc(seconds)

    def job_finished(self, model: str, status: str, run: float, charged: int) -> None:
        """A job this node ran ended `status` after `run` seconds, `charged` seconds billed."""
        self.jobs_finished.labels(model, status).inc()
        self.job_run_seconds.labels(model).observe(run)
        if charged:
            self.generation_seconds.labels(model).inc(charged)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


FRAME_COUNTS = (
    ("received", "Camera frames that reached a session's pipeline"),
    ("processed", "Frames the engine processed"),
    ("dropped", "Frames dropped: stale, over the model's frame rate, or failed in the engine"),
    ("sent", "Output frames handed to the encoder"),
)


def _frame_counts(session: Session) -> tuple[int, int, int, int]:
    pipeline = session.pipeline
    return (
        pipeline.frames_in,
        pipeline.frames_out,
        pipeline.frames_dropped,
        pipeline.frames_sent,
    )


class _LiveSessions(Collector):
    """Read at scrape time from the session registry: sessions, viewers, frame counts and
    network sizes."""

    def __init__(self, sessions: SessionRegistry | None, engines: EngineRegistry | None) -> None:
        self._sessions = sessions
        self._engines = engines
        #: Frame counts of ended sessions, by model.
        self._retired: dict[str, list[int]] = {}

    def retire(self, session: Session) -> None:
        totals = self._retired.setdefault(session.spec.name, [0, 0, 0, 0])
        for index, count in enumerate(_frame_counts(session)):
            totals[index] += count

    def _engine(self, model: str) -> str:
        if self._engines is None:
            return "unknown"
        try:
            return self._engines.engine_name(model) or "none"
        except LookupError:
            return "unknown"

    def _live(self) -> Iterable[Session]:
        return list(self._sessions.all()) if self._sessions is not None else []

    def collect(self) -> Iterator[Metric]:
        live = self._live()
        active = GaugeMetricFamily(
            f"{PREFIX}_sessions_active", "Sessions running now", labels=["model", "engine"]
        )
        for (model, engine), count in sorted(
            Tally((s.spec.name, self._engine(s.spec.name)) for s in live).items()
        ):
            active.add_metric([model, engine], count)
        yield active

        viewers = GaugeMetricFamily(
            f"{PREFIX}_viewers", "Viewers watching sessions now", labels=["model"]
        )
        watching: Tally[str] = Tally()
        for session in live:
            watching[session.spec.name] += len(session.viewers)
        for model, count in sorted(watching.items()):
            viewers.add_metric([model], count)
        yield viewers

        totals = {model: list(counts) for model, counts in self._retired.items()}
        for session in live:
            counts = totals.setdefault(session.spec.name, [0, 0, 0, 0])
            for index, count in enumerate(_frame_counts(session)):
                counts[index] += count
        for index, (name, help) in enumerate(FRAME_COUNTS):
            family = CounterMetricFamily(f"{PREFIX}_frames_{name}", help, labels=["model"])
            for model, counts in sorted(totals.items()):
                family.add_metric([model], counts[index])
            yield family

        sizes = GaugeMetricFamily(
            f"{PREFIX}_network_size_sessions",
            "Sessions by the network size their engine's scaler chose (WxH)",
            labels=["model", "size"],
        )
        chosen: Tally[tuple[str, str]] = Tally()
        for session in live:
            network = session.pipeline.engine.network_size
            if network is not None:
                chosen[(session.spec.name, f"{network[0]}x{network[1]}")] += 1
        for (model, size), count in sorted(chosen.items()):
            sizes.add_metric([model, size], count)
        yield sizes


# -- the route ------------------------------------------------------------------------

router = APIRouter()


def _authorised(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@router.get("/metrics", tags=["service"], response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (text format); with `--metrics-token`, send it as a bearer token."""
    state = request.app.state.livemorph
    if not _authorised(request, state.settings.metrics_token):
        return JSONResponse(
            {"error": "invalid metrics token: send Authorization: Bearer <--metrics-token>"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    return Response(state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
