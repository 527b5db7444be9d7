"""Admission by capacity (server/capacity.py): the rule on fake load readings, `--capacity`
read and refused, and a real server with `--capacity mirage=1` refusing a second session
while the first keeps streaming."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from aiortc import RTCPeerConnection
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from livemorph import LivemorphError, RetryPolicy, create_client
from livemorph.cli import build_parser, settings_from_args
from livemorph.config import Settings, capacity_counts
from livemorph.models import CATALOG, ModelSpec
from livemorph.server.capacity import BEHIND_AT, DEFAULT_COST, Capacity, available_cores
from livemorph.server.limits import AT_CAPACITY
from livemorph.server.state import AppState
from livemorph.testing import LiveServer, serve
from tests.media import FrameSink, SceneTrack
from tests.support import FakeClock, eventually

MIRAGE = CATALOG["mirage"]  # 25 fps
AVATAR = CATALOG["live_avatar"]  # 25 fps
CLOSE_TRY_AGAIN_LATER = 1013


@dataclass
class FakePipeline:
    frames_in: int = 0
    frames_out: int = 0


@dataclass
class FakeSession:
    spec: ModelSpec
    id: str = field(default_factory=lambda: f"s{next(_ids)}")
    pipeline: FakePipeline = field(default_factory=FakePipeline)
    pc: object | None = None  # set once its offer is answered

    def stream(self, seconds: float, fps: float | None = None, got: float = 1.0) -> None:
        """`seconds` of camera frames at `fps` (the model's), `got` of them processed."""
        frames = round(seconds * (fps or self.spec.fps))
        self.pipeline.frames_in += frames
        self.pipeline.frames_out += round(frames * got)


_ids = iter(range(1_000_000))


class Node:
    """A Capacity on a fake clock and a fake process CPU, with its sessions."""

    def __init__(self, configured: dict[str, int] | None = None, cores: float = 2.0) -> None:
        self.clock = FakeClock()
        self.cpu = 0.0
        self.idle = 0.5  # the machine's idle share, as /proc/stat would say
        self.jobs_cpu = 0.0  # the CPU seconds of the node's job processes (SCHED_IDLE)
        self.capacity = Capacity(
            configured,
            cores=cores,
            clock=self.clock,
            cpu_time=lambda: self.cpu,
            idle=lambda: self.idle,
            yielding=lambda: self.jobs_cpu,
        )
        self.sessions: list[FakeSession] = []
        self.capacity.sample(self.sessions)

    def admit(self, spec: ModelSpec) -> FakeSession | None:
        if self.capacity.refuse(spec, self.sessions) is not None:
            return None
        session = FakeSession(spec)
        self.sessions.append(session)
        return session

    def offer(self, session: FakeSession) -> bool:
        """The offer's check, as stream.py makes it: the others, without this session."""
        others = [other for other in self.sessions if other is not session]
        if self.capacity.refuse(session.spec, others) is not None:
            self.sessions.remove(session)
            return False
        session.pc = object()
        return True

    def run(
        self,
        seconds: float,
        cores_used: float,
        got: float = 1.0,
        others: float = 0.0,
        jobs: float = 0.0,
    ) -> None:
        """Every session streams for `seconds` while the process uses `cores_used`, other
        processes `others` and the node's job processes `jobs`."""
        cores = self.capacity.cores
        self.idle = max(0.0, cores - cores_used - others - jobs) / cores
        for _ in range(round(seconds)):
            for session in self.sessions:
                session.stream(1.0, got=got)
            self.cpu += cores_used
            self.jobs_cpu += jobs
            self.clock.advance(1.0)
            self.capacity.sample(self.sessions)


# -- the rule, on fake readings ------------------------------------------------------------


def test_a_configured_capacity_is_honoured_and_shared_between_models() -> None:
    node = Node({"mirage": 2, "live_avatar": 4})
    first, second = node.admit(MIRAGE), node.admit(MIRAGE)
    assert first and second, "two mirage sessions fit"
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY
    assert node.capacity.refuse(AVATAR, node.sessions) == AT_CAPACITY, "the node is full"
    node.sessions.remove(first)
    assert node.admit(AVATAR) and node.admit(AVATAR), "half the node is two avatar sessions"
    assert node.admit(AVATAR) is None
    assert node.capacity.sessions_of("mirage") == 2
    assert node.capacity.sessions_of("live_avatar") == 4


def test_configured_sessions_count_before_they_stream() -> None:
    node = Node({"mirage": 1})
    assert node.admit(MIRAGE)
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY, (
        "a configured capacity is a count of sessions, streaming or not"
    )


def test_measured_cost_decides_how_many_fit() -> None:
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    node.run(5, cores_used=0.9)  # one session, 25 of 25 fps, 0.9 of a core
    assert node.capacity.cost("mirage") == pytest.approx(0.9)
    assert node.capacity.sessions_of("mirage") == 2
    assert node.admit(MIRAGE), "room for a second"
    node.run(5, cores_used=1.8)
    assert node.capacity.cost("mirage") == pytest.approx(0.9)
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY, "a third would not fit"
    why = node.capacity.refusal(MIRAGE, node.sessions)
    assert why and "45%" in why and "90%" in why


def test_what_other_processes_take_is_not_the_nodes() -> None:
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    node.run(15, cores_used=0.9, others=0.5)
    assert node.capacity.budget == pytest.approx(1.5, abs=0.01)
    assert node.capacity.sessions_of("mirage") == 1, "0.9 + 0.9 cores > the 1.5 left"
    assert node.admit(MIRAGE) is None
    node.run(15, cores_used=0.9)
    assert node.capacity.budget == pytest.approx(2.0, abs=0.01)
    assert node.admit(MIRAGE), "the others have gone: room for a second"


def test_the_cpu_the_nodes_jobs_fill_is_still_the_sessions() -> None:
    """A job at SCHED_IDLE takes all the CPU the session leaves: the node's budget is still
    its cores, a second session still fits, and nobody is judged starved for it; the same
    load from another process leaves room for one only."""
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    node.run(15, cores_used=0.9, jobs=1.1)
    assert node.idle == 0.0
    assert node.capacity.budget == pytest.approx(2.0, abs=0.01)
    assert not node.capacity.behind(node.sessions)
    assert node.admit(MIRAGE), "room for a second beside the job"
    other = Node(cores=2.0)
    assert other.admit(MIRAGE)
    other.run(15, cores_used=0.9, others=1.1)
    assert other.capacity.budget == pytest.approx(0.9, abs=0.01)
    assert other.admit(MIRAGE) is None


def test_a_cheap_model_fits_many_and_the_cost_is_per_frame_not_per_second() -> None:
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    # a camera at 10 fps: 0.08 of a core for 10 frames is 0.2 at the model's 25
    node.idle = 0.96  # the process's 0.08 of the 2 cores busy, nothing else
    for _ in range(5):
        node.sessions[0].stream(1.0, fps=10)
        node.cpu += 0.08
        node.clock.advance(1.0)
        node.capacity.sample(node.sessions)
    assert node.capacity.cost("mirage") == pytest.approx(0.2)
    assert node.capacity.sessions_of("mirage") == 10
    for _ in range(9):
        session = node.admit(MIRAGE)
        assert session is not None
        session.stream(0.2)
    assert node.admit(MIRAGE) is None


def test_before_any_measurement_a_session_counts_as_the_default_cost() -> None:
    node = Node(cores=2.0)
    assert node.capacity.cost("mirage") == DEFAULT_COST
    first, second = node.admit(MIRAGE), node.admit(MIRAGE)
    assert first and second
    assert node.admit(MIRAGE), "sessions that have not streamed yet cost nothing"
    for session in node.sessions:
        session.stream(0.2)  # every one has camera frames now, none measured
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY
    assert node.capacity.refuse(AVATAR, node.sessions) == AT_CAPACITY


def test_a_crowd_that_connects_at_once_is_sorted_out_at_the_offer() -> None:
    node = Node(cores=2.0)
    crowd = [node.admit(MIRAGE) for _ in range(4)]
    assert all(crowd), "no session has media yet: each is let in to negotiate"
    offered = [node.offer(session) for session in crowd if session]
    assert offered == [True, True, False, False], "two unmeasured sessions fit two cores"
    node.run(3, cores_used=0.8)  # measured: 0.4 of a core each
    late = node.admit(MIRAGE)
    assert late and node.offer(late), "a third fits once the two are measured"


def test_an_empty_node_takes_a_session_even_one_it_cannot_serve_at_rate() -> None:
    node = Node(cores=1.0)
    assert node.admit(MIRAGE)
    node.run(5, cores_used=1.0, got=0.4)  # 10 of 25 fps, the whole core
    assert node.capacity.cost("mirage") == pytest.approx(2.5)
    assert node.admit(MIRAGE) is None
    node.sessions.clear()
    node.run(1, cores_used=0.0)
    assert node.admit(MIRAGE), "alone it is still served"


def test_a_node_whose_sessions_fall_behind_takes_no_more() -> None:
    node = Node({"mirage": 4}, cores=2.0)
    assert node.admit(MIRAGE) and node.admit(MIRAGE)
    node.run(5, cores_used=1.9, got=1.0)
    assert node.admit(MIRAGE), "at their rate: the configured four are allowed"
    node.run(5, cores_used=2.0, got=0.3)  # the three sink to 7.5 fps each
    assert node.capacity.behind(node.sessions) == node.sessions
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY
    node.sessions.pop()
    node.run(10, cores_used=1.8, got=1.0)  # back at their rate once one has left
    assert not node.capacity.behind(node.sessions)
    assert node.admit(MIRAGE)


def test_one_slow_second_is_not_enough_to_be_behind() -> None:
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    node.run(5, cores_used=0.5)
    node.run(1, cores_used=0.5, got=0.6)
    assert not node.capacity.behind(node.sessions), f"one reading of 0.6 (< {BEHIND_AT})"
    node.run(3, cores_used=0.5, got=0.6)
    assert node.capacity.behind(node.sessions)


def test_a_camera_slower_than_the_model_is_not_behind() -> None:
    node = Node(cores=2.0)
    assert node.admit(MIRAGE)
    for _ in range(5):
        node.sessions[0].stream(1.0, fps=10)  # all ten processed
        node.cpu += 0.2
        node.clock.advance(1.0)
        node.capacity.sample(node.sessions)
    assert not node.capacity.behind(node.sessions)


def test_a_starved_node_is_behind_though_every_decoded_frame_is_processed() -> None:
    """Short of CPU, frames are lost in the decoder, before the pipeline counts them."""
    node = Node(cores=1.0)
    assert node.admit(MIRAGE)
    for _ in range(5):
        node.sessions[0].stream(1.0, fps=11)  # 11 of 25 decoded, all 11 processed
        node.cpu += 0.4
        node.clock.advance(1.0)
        node.capacity.sample(node.sessions)
    assert not node.capacity.behind(node.sessions), "idle CPU left: the camera sends 11"
    node.idle = 0.01
    for _ in range(5):
        node.sessions[0].stream(1.0, fps=11)
        node.cpu += 0.4
        node.clock.advance(1.0)
        node.capacity.sample(node.sessions)
    assert node.capacity.behind(node.sessions), "no CPU to spare: it would get 25"
    assert node.capacity.refuse(MIRAGE, node.sessions) == AT_CAPACITY


def test_a_session_without_frames_is_not_judged_on_a_busy_machine() -> None:
    node = Node(cores=2.0)
    node.idle = 0.0
    idle, streaming = node.admit(MIRAGE), node.admit(MIRAGE)
    assert idle and streaming
    for _ in range(5):
        streaming.stream(1.0)
        node.cpu += 0.5
        node.clock.advance(1.0)
        node.capacity.sample(node.sessions)
    assert not node.capacity.behind(node.sessions)


def test_a_reading_with_several_models_leaves_their_costs_alone() -> None:
    node = Node(cores=4.0)
    assert node.admit(MIRAGE)
    node.run(3, cores_used=1.0)
    assert node.admit(AVATAR)
    node.run(3, cores_used=3.0)
    assert node.capacity.cost("mirage") == pytest.approx(1.0)
    assert "live_avatar" not in node.capacity.costs


def test_capacity_off_refuses_nothing() -> None:
    capacity = Capacity(estimate=False, cores=1.0)
    sessions = [FakeSession(MIRAGE) for _ in range(50)]
    for session in sessions:
        session.stream(1.0, got=0.1)
    assert not capacity.on
    assert capacity.refuse(MIRAGE, sessions) is None


def test_the_cores_follow_a_cgroup_quota(tmp_path: Path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert available_cores(quota) == pytest.approx(min(1.5, available_cores(tmp_path / "no")))
    quota.write_text("max 100000\n")
    assert available_cores(quota) == available_cores(tmp_path / "no")


# -- `--capacity` --------------------------------------------------------------------------


def test_capacity_is_read_from_the_flag_and_the_environment(monkeypatch) -> None:
    assert capacity_counts("auto") == {}
    assert capacity_counts("off") is None
    assert capacity_counts(" mirage=2, live_avatar=4 ") == {"mirage": 2, "live_avatar": 4}
    assert Settings().capacity == "auto"
    monkeypatch.setenv("LIVEMORPH_CAPACITY", "mirage=3")
    assert Settings.from_env().capacity == "mirage=3"
    args = build_parser().parse_args(["serve", "--capacity", "lucy_2_rt=1"])
    assert settings_from_args(args).capacity == "lucy_2_rt=1"
    state = AppState.from_settings(Settings(capacity="mirage=2"))
    try:
        assert state.capacity.configured == {"mirage": 2} and state.capacity.estimate
    finally:
        state.executor.shutdown()


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("mirage=two", "whole number"),
        ("mirage=0", "1 or more"),
        ("mirage=-1", "whole number"),
        ("mirage", "whole number"),
        ("mirage=1.5", "whole number"),
        ("miraj=2", "not a model"),
        ("mirage=2,mirage=3", "named twice"),
        ("on", "not a model"),
    ],
)
def test_a_bad_capacity_is_refused_by_name_with_what_is_wrong(
    monkeypatch, capsys, value: str, says: str
) -> None:
    monkeypatch.setenv("LIVEMORPH_CAPACITY", value)
    with pytest.raises(ValueError, match=f"LIVEMORPH_CAPACITY.*{says}"):
        Settings.from_env()
    monkeypatch.delenv("LIVEMORPH_CAPACITY")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--capacity", value])
    error = capsys.readouterr().err
    assert "--capacity" in error and says in error


# -- a real server ----------------------------------------------------------------------


async def refusal(url: str) -> tuple[str, int | None]:
    """The `error` a refused session gets, and the close code that follows it."""
    async with connect(url) as ws:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert message["type"] == "error", message
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    return message["error"], closed.value.rcvd.code if closed.value.rcvd else None


def at_capacity_refusals(server: LiveServer) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "livemorph_refusals_total"
        and sample.labels.get("reason") == "at_capacity"
    )


async def test_a_session_past_the_configured_capacity_is_refused_and_the_first_streams_on(
    tmp_path: Path,
) -> None:
    with serve(tmp_path, "--engine", "passthrough", "--capacity", "mirage=1") as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
            rt = await client.realtime.connect(SceneTrack(320, 176), model="mirage")
            output = FrameSink(rt.video_track)
            try:
                await output.fresh()
                assert await refusal(url) == (AT_CAPACITY, CLOSE_TRY_AGAIN_LATER)
                assert await asyncio.to_thread(at_capacity_refusals, server) == 1
                before = output.count
                await eventually(lambda: output.count > before + 10)
                assert rt.is_connected(), "the running session kept streaming"
                assert await asyncio.to_thread(server.active_sessions) == 1
            finally:
                await output.close()
                await rt.disconnect()
        assert await asyncio.to_thread(server.wait_sessions, 0) == 0
        async with connect(url) as ws:  # the place is free again
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert message["type"] == "session_id", message
        assert "at capacity for mirage" in server.log
        exposition = (await asyncio.to_thread(httpx.get, f"{server.base_url}/metrics")).text
        assert 'livemorph_capacity_sessions{model="mirage",source="configured"} 1.0' in exposition
        assert 'source="estimated"' in exposition, "the other models are estimated"
        assert "Traceback" not in server.log


async def test_a_node_whose_session_is_below_its_rate_refuses_the_next(tmp_path: Path) -> None:
    """Estimated, not configured: the `sleep` engine takes 100 ms a frame, so the one
    session gets 10 of mirage's 25 fps, and the node takes no second one."""
    flags = ("--engine", "sleep:100", "--capacity", "auto")
    with serve(tmp_path, *flags) as server:
        url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
        async with create_client(api_key=server.api_key, base_url=server.base_url) as client:
            rt = await client.realtime.connect(SceneTrack(320, 176), model="mirage")
            output = FrameSink(rt.video_track)
            try:
                await output.fresh()
                refused: tuple[str, int | None] | None = None
                async with asyncio.timeout(30):
                    while refused is None:  # admitted until the readings show it behind
                        async with connect(url) as ws:
                            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                            if message["type"] == "error":
                                with pytest.raises(ConnectionClosed) as closed:
                                    await asyncio.wait_for(ws.recv(), 10)
                                code = closed.value.rcvd.code if closed.value.rcvd else None
                                refused = (message["error"], code)
                        await asyncio.sleep(0.5)
                assert refused == (AT_CAPACITY, CLOSE_TRY_AGAIN_LATER)
                before = output.count
                await eventually(lambda: output.count > before + 5)
                assert rt.is_connected()
            finally:
                await output.close()
                await rt.disconnect()
        assert "at capacity for mirage" in server.log


async def test_sessions_that_connect_at_once_are_sorted_out_at_their_offers(
    tmp_path: Path,
) -> None:
    """Sessions count once their offer is answered, so a crowd connecting together is let
    in and the offers past the capacity are refused: with nothing measured (no media ever
    flows here), a session counts as DEFAULT_COST cores of the cores left to the node."""
    fits = math.floor(available_cores() / DEFAULT_COST)
    offerer = RTCPeerConnection()
    offerer.addTrack(SceneTrack(320, 176))
    await offerer.setLocalDescription(await offerer.createOffer())
    offer = json.dumps({"type": "offer", "sdp": offerer.localDescription.sdp})
    flags = ("--engine", "passthrough", "--capacity", "auto")
    try:
        with serve(tmp_path, *flags) as server:
            url = f"{server.ws_url}/v1/stream?api_key={server.api_key}&model=mirage"
            async with contextlib.AsyncExitStack() as stack:
                crowd = [await stack.enter_async_context(connect(url)) for _ in range(fits + 1)]
                for ws in crowd:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert message["type"] == "session_id", "all are let in to negotiate"
                answered = 0
                for ws in crowd:  # at most `fits` answers: fewer if other processes are busy
                    await ws.send(offer)
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message["type"] != "answer":
                        break
                    answered += 1
                assert 1 <= answered <= fits, "the empty node answers one; the crowd is cut"
                assert message == {"type": "error", "error": AT_CAPACITY}
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 10)
                assert closed.value.rcvd and closed.value.rcvd.code == CLOSE_TRY_AGAIN_LATER
                async with create_client(
                    api_key=server.api_key, base_url=server.base_url
                ) as client:
                    with pytest.raises(LivemorphError) as error:
                        await client.realtime.connect(
                            SceneTrack(320, 176),
                            model="mirage",
                            retry=RetryPolicy(attempts=2, base_delay=0.1),
                        )
                assert "capacity" in error.value.message and not error.value.permanent
            assert await asyncio.to_thread(at_capacity_refusals, server) == 3, (
                "the SDK took the refusal of its offer as transient and tried again"
            )
    finally:
        await offerer.close()
