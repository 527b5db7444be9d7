"""`GET /metrics`: Prometheus text that parses, counters that move during a real session, the
bearer-token guard, and a registry per app."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from livemorph import LivemorphError, RetryPolicy, create_client
from livemorph.config import Settings
from livemorph.server import create_app
from livemorph.server.metrics import Metrics
from livemorph.testing import LiveServer, run_cli, serve
from tests.inprocess import serve_in_process
from tests.media import FrameSink, SceneTrack
from tests.support import eventually

#: Would be retried by a default policy: a refusal the test expects must fail at once.
PATIENT = RetryPolicy(attempts=5, base_delay=30.0, max_delay=30.0)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels): the parser is the test that it is valid."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels` (0 when none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= set(found))


def scrape(server: LiveServer) -> Samples:
    response = httpx.get(f"{server.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture(scope="module")
def metered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server whose test key has credits, so debits show too."""
    with serve(tmp_path_factory.mktemp("metrics"), "--engine", "passthrough") as live:
        run_cli("credits", "grant", "testing", "600", "--data-dir", str(live.data_dir))
        yield live


async def watch(server: LiveServer, check: Any, within: float = 20.0) -> Samples:
    """Scrape until `check(samples)` holds; the last samples."""
    seen: list[Samples] = []

    def holds() -> bool:
        seen.append(scrape(server))
        return bool(check(seen[-1]))

    await eventually(holds, within=within)
    return seen[-1]


@pytest.mark.slow
async def test_counters_move_during_a_session(metered: LiveServer) -> None:
    before = scrape(metered)
    started = value(before, "livemorph_sessions_started_total", model="mirage")
    ended = value(before, "livemorph_sessions_ended_total", model="mirage")
    sent_before = value(before, "livemorph_frames_sent_total", model="mirage")

    async with create_client(api_key=metered.api_key, base_url=metered.base_url) as client:
        rt = await client.realtime.connect(
            SceneTrack(640, 352), model="mirage", initial_state={"prompt": "anime"}
        )
        output = FrameSink(rt.video_track)
        ticks: list[int] = []
        rt.on("generation_tick", lambda tick: ticks.append(tick.seconds))
        try:
            await output.fresh()
            with pytest.raises(LivemorphError, match="refused by moderation"):
                await rt.set_prompt("N.U.D.E beach")
            assert rt.subscribe_token is not None
            viewer = await client.realtime.subscribe(rt.subscribe_token)
            await eventually(lambda: len(ticks) >= 1, within=10)
            live = await watch(
                metered,
                lambda s: (
                    value(s, "livemorph_viewers", model="mirage") == 1
                    and value(s, "livemorph_generation_seconds_total", model="mirage") >= 1
                ),
            )
            await viewer.disconnect()
        finally:
            await output.close()
            await rt.disconnect()

    active = ("livemorph_sessions_active", (("engine", "passthrough"), ("model", "mirage")))
    assert live[active] == 1
    assert value(live, "livemorph_sessions_started_total", model="mirage") == started + 1
    for name in ("received", "processed", "sent"):
        assert value(live, f"livemorph_frames_{name}_total", model="mirage") > 0, name
    assert value(live, "livemorph_frames_sent_total", model="mirage") > sent_before
    assert value(live, "livemorph_engine_seconds_count", model="mirage") > 0
    assert value(live, "livemorph_frame_latency_seconds_count", model="mirage") > 0
    assert value(live, "livemorph_credits_debited_seconds_total", model="mirage") >= 1
    assert value(live, "livemorph_refusals_total", reason="moderation") >= 1
    assert value(live, "livemorph_websocket_messages_total", direction="in", type="prompt") >= 2
    assert value(live, "livemorph_websocket_messages_total", direction="out", type="session_id")
    assert value(live, "livemorph_websocket_messages_total", direction="in", type="offer") >= 2

    after = await watch(
        metered,
        lambda s: (
            value(s, "livemorph_sessions_active", model="mirage") == 0
            and value(s, "livemorph_sessions_ended_total", model="mirage") == ended + 1
        ),
    )
    # what the ended session counted stays in the counters
    for name in ("received", "processed", "sent"):
        total = f"livemorph_frames_{name}_total"
        assert value(after, total, model="mirage") >= value(live, total, model="mirage"), name
    assert value(after, "livemorph_viewers", model="mirage") == 0

    async with create_client(api_key="lm_wrong", base_url=metered.base_url) as bad:
        with pytest.raises(LivemorphError):
            async with asyncio.timeout(10):
                await bad.realtime.connect(SceneTrack(320, 176), model="mirage", retry=PATIENT)
    refused = scrape(metered)
    assert value(refused, "livemorph_refusals_total", reason="invalid_key") >= 1


async def test_the_token_guards_metrics(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine="passthrough", metrics_token="scrape-me")
    async with serve_in_process(settings) as server, httpx.AsyncClient() as http:
        url = f"{server.base_url}/metrics"
        refused = await http.get(url)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        wrong = await http.get(url, headers={"Authorization": "Bearer scrape-you"})
        assert wrong.status_code == 401
        assert (await http.get(url, headers={"Authorization": "scrape-me"})).status_code == 401
        allowed = await http.get(url, headers={"Authorization": "Bearer scrape-me"})
        assert allowed.status_code == 200
        assert "livemorph_sessions_active" in allowed.text
        parse(allowed.text)


async def test_no_metrics_means_no_route(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, engine="passthrough", metrics=False)
    async with serve_in_process(settings) as server, httpx.AsyncClient() as http:
        assert (await http.get(f"{server.base_url}/metrics")).status_code == 404


def test_each_app_has_a_registry_of_its_own(tmp_path: Path) -> None:
    """Two apps in one process: no duplicate registration, and counts kept apart."""
    first = create_app(Settings(data_dir=tmp_path / "a", engine="passthrough"))
    second = create_app(Settings(data_dir=tmp_path / "b", engine="passthrough"))
    first.state.livemorph.metrics.refused("invalid_key")
    assert value(parse(exposition(first)), "livemorph_refusals_total", reason="invalid_key") == 1
    assert value(parse(exposition(second)), "livemorph_refusals_total") == 0


def exposition(app: Any) -> str:
    return app.state.livemorph.metrics.exposition().decode()


def fake_session(model: str, size: tuple[int, int] | None, viewers: int = 0) -> Any:
    pipeline = SimpleNamespace(
        frames_in=10,
        frames_out=8,
        frames_dropped=2,
        frames_sent=7,
        engine=SimpleNamespace(network_size=size),
    )
    return SimpleNamespace(
        spec=SimpleNamespace(name=model),
        pipeline=pipeline,
        viewers=set(range(viewers)),
        end_reason="client_disconnected",
    )


def test_network_sizes_viewers_and_retired_counts_are_read_at_scrape() -> None:
    sessions = [fake_session("mirage", (224, 124), 2), fake_session("mirage", (224, 124))]
    sessions.append(fake_session("mirage", None))
    registry = SimpleNamespace(all=lambda: list(sessions))
    engines = SimpleNamespace(engine_name=lambda model: "neural")
    metrics = Metrics(registry, engines)  # type: ignore[arg-type]
    samples = parse(metrics.exposition().decode())
    sizes = "livemorph_network_size_sessions"
    assert value(samples, sizes, model="mirage", size="224x124") == 2
    assert value(samples, sizes) == 2, "an engine without a scaler has no size"
    assert value(samples, "livemorph_viewers", model="mirage") == 2
    assert value(samples, "livemorph_sessions_active", engine="neural") == 3
    assert value(samples, "livemorph_frames_received_total", model="mirage") == 30

    gone = sessions.pop()
    metrics.session_ended(gone)
    samples = parse(metrics.exposition().decode())
    assert value(samples, "livemorph_frames_received_total", model="mirage") == 30
    assert value(samples, "livemorph_frames_dropped_total", model="mirage") == 6
    assert value(samples, "livemorph_sessions_active") == 2
    reason = {"model": "mirage", "reason": "client_disconnected"}
    assert value(samples, "livemorph_sessions_ended_total", **reason) == 1


def test_message_types_are_the_protocols_own() -> None:
    metrics = Metrics()
    metrics.message("in", "prompt")
    metrics.message("in", "made_up_by_a_client")
    metrics.message("in", "x" * 10_000)
    samples = parse(metrics.exposition().decode())
    messages = "livemorph_websocket_messages_total"
    assert value(samples, messages, type="prompt") == 1
    assert value(samples, messages, type="unknown") == 2
    assert {dict(labels)["type"] for (name, labels) in samples if name == messages} == {
        "prompt",
        "unknown",
    }


def test_the_dashboard_shows_only_metrics_the_server_has() -> None:
    """docs/grafana-dashboard.json queries names that /metrics gives, and shows each one."""
    dashboard = json.loads(
        (Path(__file__).parent.parent / "docs/grafana-dashboard.json").read_text()
    )
    queried = set(re.findall(r"\b((?:livemorph|process)_[a-z_]+)", json.dumps(dashboard)))
    families = {
        family.name: family.type
        for family in text_string_to_metric_families(Metrics(registry_of([])).exposition().decode())
    }
    suffixes = ("_total", "_bucket", "_count", "_sum")
    for name in queried:
        base = next((name[: -len(s)] for s in suffixes if name.endswith(s)), name)
        assert name in families or base in families, f"the dashboard asks for {name}"
    shown = {next((n[: -len(s)] for s in suffixes if n.endswith(s)), n) for n in queried}
    missing = {name for name in families if name.startswith("livemorph_")} - shown
    assert not missing, f"the dashboard does not show {missing}"


def registry_of(sessions: list[Any]) -> Any:
    return SimpleNamespace(all=lambda: list(sessions))
