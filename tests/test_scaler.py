"""The network size follows the CPU: up with time to spare, down when frames run late."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from av import VideoFrame

from livemorph.engines.base import Controls
from livemorph.engines.neural.engine import NeuralEngine
from livemorph.engines.neural.scaler import (
    DOWN_AT,
    DROPS_DOWN,
    LADDER,
    RETRY_AFTER,
    SPARE_DOWN,
    SPARE_UP,
    START,
    UP_AT,
    WARM_UP_FRAMES,
    CpuMeter,
    NetworkScaler,
)
from livemorph.models import CATALOG

from .media import photo

INTERVAL = 0.040  # 25 fps


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class IdleMachine:
    """A CPU meter that always reads an idle machine."""

    def spare(self) -> float:
        return 1.0


def cost(size: tuple[int, int], per_pixel: float) -> float:
    return size[0] * size[1] * per_pixel


def run(scaler: NetworkScaler, per_pixel: float, frames: int, clock: Clock) -> list[int]:
    """Feed `frames` frames whose time grows with the pixels of the size in use."""
    indices = []
    for _ in range(frames):
        scaler.record(cost(scaler.size, per_pixel))
        clock.now += INTERVAL
        indices.append(scaler.index)
    return indices


def fastest_allowed_index(per_pixel: float) -> int:
    """The largest ladder step whose frames cost under UP_AT of the interval."""
    fits = [i for i, size in enumerate(LADDER) if cost(size, per_pixel) < UP_AT * INTERVAL]
    return max(fits, default=0)


@pytest.mark.parametrize("ms_at_smallest", [2.0, 6.0, 12.0, 20.0, 40.0])
def test_settles_on_the_largest_size_with_time_to_spare(ms_at_smallest: float) -> None:
    per_pixel = ms_at_smallest / 1000 / (LADDER[0][0] * LADDER[0][1])
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, clock=clock)
    indices = run(scaler, per_pixel, 2000, clock)
    settled = fastest_allowed_index(per_pixel)
    assert indices[-1] == settled
    assert indices == sorted(indices), "steady costs: it only ever steps up"
    if settled > 0:
        assert cost(scaler.size, per_pixel) < DOWN_AT * INTERVAL


def test_starts_small_and_waits_before_stepping_up() -> None:
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, frames_before_up=50, clock=clock)
    assert scaler.size == LADDER[0]
    indices = run(scaler, 1e-9, 50 + WARM_UP_FRAMES, clock)
    assert indices[-2] == 0 and indices[-1] == 1


def test_steps_down_when_the_machine_gets_busy_and_waits_before_trying_again() -> None:
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, clock=clock)
    fast = 6.0 / 1000 / (LADDER[0][0] * LADDER[0][1])
    run(scaler, fast, 1000, clock)
    top = scaler.index
    assert top >= 2

    # Another session arrives: every frame now takes three times as long.
    busy = run(scaler, 3 * fast, 200, clock)
    assert busy[-1] < top
    assert cost(scaler.size, 3 * fast) < DOWN_AT * INTERVAL, "down to a size that keeps up"
    falls = [i for i, (a, b) in enumerate(itertools.pairwise(busy)) if b < a]
    assert len(falls) == top - busy[-1], "straight down, no bouncing on the way"

    # It leaves: the size it fell from last comes back, but only after its back-off.
    last_fall = clock.now - (len(busy) - 1 - falls[-1]) * INTERVAL
    recovered = run(scaler, fast, int(4 * RETRY_AFTER / INTERVAL), clock)
    first_up = next(i for i, index in enumerate(recovered) if index > busy[-1])
    assert (clock.now - (len(recovered) - first_up) * INTERVAL) - last_fall >= RETRY_AFTER
    assert recovered[-1] == top


def test_no_oscillation_at_a_boundary() -> None:
    """A cost right where one step fits and the next does not: it settles and stays."""
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, clock=clock)
    # The third size costs exactly UP_AT * 0.99 of the interval.
    per_pixel = 0.99 * UP_AT * INTERVAL / (LADDER[2][0] * LADDER[2][1])
    indices = run(scaler, per_pixel, 3000, clock)
    settled_from = indices.index(2)
    assert set(indices[settled_from:]) == {2}


def test_a_noisy_machine_does_not_flap() -> None:
    """Frame times jitter by +-40 %: the running mean keeps the size still."""
    rng = np.random.default_rng(3)
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, clock=clock)
    per_pixel = 0.5 * UP_AT * INTERVAL / (LADDER[1][0] * LADDER[1][1])
    changes = 0
    for _ in range(3000):
        before = scaler.index
        scaler.record(cost(scaler.size, per_pixel) * rng.uniform(0.6, 1.4))
        clock.now += INTERVAL
        changes += scaler.index != before
    assert changes <= 3


def test_one_size_never_changes() -> None:
    scaler = NetworkScaler([(320, 176)], INTERVAL)
    assert all(scaler.record(seconds) is None for seconds in [0.001] * 100 + [1.0] * 100)
    assert scaler.size == (320, 176)


def test_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        NetworkScaler([], INTERVAL)
    with pytest.raises(ValueError):
        NetworkScaler(LADDER, 0.0)


def test_a_session_steps_up_and_keeps_the_models_size() -> None:
    """With a whole second between frames even the largest size fits: it climbs the ladder,
    and every frame on the way keeps the model's size and looks restyled."""
    spec = dataclasses.replace(CATALOG["mirage"], fps=1)
    engine = NeuralEngine()
    session = engine.open_session(spec)
    session.scaler = NetworkScaler(
        [session.scaler.sizes[0], session.scaler.sizes[-1]],
        session.scaler.interval,
        frames_before_up=2,
    )
    session._resize(session.scaler.size)
    session.cpu = IdleMachine()  # type: ignore[assignment]
    session.configure(Controls(prompt="anime"))
    camera = VideoFrame.from_ndarray(photo(spec.width, spec.height), format="rgb24")
    sizes = []
    for _ in range(WARM_UP_FRAMES + 4):
        out = session.transform(camera)
        assert (out.width, out.height) == (spec.width, spec.height)
        sizes.append(session.size)
    assert sizes[0] == LADDER[0] and sizes[-1] == LADDER[-1]
    restyled = out.to_ndarray(format="rgb24").astype(np.int16)
    assert np.abs(restyled - photo(spec.width, spec.height)).mean() > 10


def test_a_fixed_size_option_pins_it() -> None:
    engine = NeuralEngine("size=320x176")
    session = engine.open_session(CATALOG["mirage"])
    assert session.scaler.sizes == [(320, 176)]
    with pytest.raises(ValueError):
        NeuralEngine("size=321x176")


def test_starts_at_the_default_size_with_smaller_ones_below_for_busy_machines() -> None:
    scaler = NetworkScaler(LADDER, INTERVAL, start=LADDER[START])
    assert scaler.size == (224, 124) and START > 0


def busy_run(
    scaler: NetworkScaler, ms: float, frames: int, clock: Clock, spare: float, dropped: int = 0
) -> list[int]:
    """Frames of a fixed cost (at the current size) with the machine `spare` idle."""
    indices = []
    for _ in range(frames):
        scaler.record(ms / 1000, spare, dropped)
        clock.now += INTERVAL
        indices.append(scaler.index)
    return indices


def test_a_busy_machine_holds_the_size_although_the_engine_is_fast() -> None:
    """Frames cost a tenth of the interval, but the machine (codecs, client, neighbours)
    has little CPU left: the old rule would climb, the whole-machine rule does not."""
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, start=LADDER[START], cores=2, clock=clock)
    indices = busy_run(scaler, 4.0, 1000, clock, spare=SPARE_UP)
    assert set(indices) == {START}
    # with room to spare the same frames climb
    climbed = busy_run(scaler, 4.0, 1000, clock, spare=0.9)
    assert climbed[-1] > START


def test_no_idle_cpu_steps_down_below_the_start() -> None:
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, start=LADDER[START], cores=2, clock=clock)
    indices = busy_run(scaler, 10.0, 400, clock, spare=SPARE_DOWN / 2)
    assert indices[-1] == 0, "down to the smallest size while the machine stays saturated"
    assert "CPU" in scaler.reason


def test_missed_frames_step_down_and_block_the_climb() -> None:
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, start=LADDER[START], cores=2, clock=clock)
    # one frame in ten missed: over DROPS_DOWN
    assert DROPS_DOWN < 0.1
    indices = []
    for frame in range(300):
        scaler.record(0.004, 0.9, 1 if frame % 10 == 0 else 0)
        clock.now += INTERVAL
        indices.append(scaler.index)
    assert indices[-1] < START and "missed" in scaler.reason
    assert indices == sorted(indices, reverse=True), "never up while frames are missed"


def test_cpu_meter_reads_the_machines_idle_share(tmp_path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal
    stat.write_text("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1 2 3\n")
    meter = CpuMeter(period=0.0, path=str(stat))
    assert meter.spare() == 1.0  # one reading: no interval yet
    stat.write_text("cpu  250 0 150 900 0 0 0 0 0 0\n")  # 200 busy, 100 idle ticks since
    assert meter.spare() == pytest.approx(1 / 3)
    missing = CpuMeter(path=str(tmp_path / "none"))
    assert missing.spare() == 1.0


def test_a_session_counts_frames_missed_from_camera_timestamps() -> None:
    import fractions

    engine = NeuralEngine()
    session = engine.open_session(CATALOG["mirage"])
    counts = []
    for pts in (0, 40, 80, 200, 233, 300):  # ms: 200 follows 80 after two missed frames
        frame = VideoFrame(64, 36, "yuv420p")
        frame.pts, frame.time_base = pts, fractions.Fraction(1, 1000)
        counts.append(session._missed(frame))
    # 233 -> 300 is 67 ms: a 30 fps camera paced to 25 fps, not a miss
    assert counts == [0, 0, 0, 2, 0, 0]


def test_one_hiccup_does_not_cost_a_size() -> None:
    """A burst after a network or client stall drops two frames once: no step down."""
    clock = Clock()
    scaler = NetworkScaler(LADDER, INTERVAL, start=LADDER[START], cores=2, clock=clock)
    indices = []
    for frame in range(400):
        scaler.record(0.020, 0.3, 2 if frame == 100 else 0)
        clock.now += INTERVAL
        indices.append(scaler.index)
    assert set(indices) == {START}
