"""The newest-frame hand-off, the pacer, and the pipeline under a slow engine."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from av import VideoFrame

from livemorph.engines.base import Controls, EngineSession
from livemorph.media.slot import LatestSlot, SlotClosed
from livemorph.models import ModelSpec
from livemorph.sessions.pipeline import FramePacer, Pipeline

SPEC = ModelSpec("test", 25, 64, 32, "test")


async def test_slot_keeps_only_the_newest() -> None:
    slot: LatestSlot[int] = LatestSlot()
    for value in range(5):
        slot.put(value)
    assert await slot.get() == 4
    assert slot.dropped == 4
    slot.close()
    with pytest.raises(SlotClosed):
        await slot.get()


async def test_slot_get_waits_for_a_put() -> None:
    slot: LatestSlot[str] = LatestSlot()
    waiter = asyncio.create_task(slot.get())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    slot.put("frame")
    assert await waiter == "frame"


def test_pacer_turns_30_fps_into_25() -> None:
    pacer = FramePacer(25)
    admitted = sum(pacer.admit(i / 30) for i in range(300))  # ten seconds at 30 fps
    assert 245 <= admitted <= 255


def test_pacer_admits_everything_below_its_rate() -> None:
    pacer = FramePacer(25)
    assert all(pacer.admit(i / 10) for i in range(50))


def test_pacer_resyncs_after_a_pause() -> None:
    pacer = FramePacer(25)
    assert pacer.admit(0.0)
    assert pacer.admit(5.0)
    assert pacer.admit(5.04)


class RecordingEngine(EngineSession):
    """Takes `delay` seconds per frame and records what it saw, in order."""

    def __init__(self, delay: float) -> None:
        super().__init__(SPEC)
        self.delay = delay
        self.events: list[tuple[str, object]] = []
        self.threads: set[str] = set()

    def configure(self, controls: Controls) -> None:
        self.events.append(("configure", controls.prompt))

    def transform(self, frame: VideoFrame) -> VideoFrame:
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        self.events.append(("frame", frame.pts))
        return frame


def make_frame(index: int) -> VideoFrame:
    frame = VideoFrame.from_ndarray(np.zeros((32, 64, 3), np.uint8), format="rgb24")
    frame.pts = index
    return frame


async def test_slow_engine_drops_stale_frames_instead_of_queueing() -> None:
    engine = RecordingEngine(delay=0.1)
    with ThreadPoolExecutor(1, thread_name_prefix="engine") as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: None)
        for index in range(30):  # a 25 fps camera for 1.2 s into a 10 fps engine
            pipeline.feed(make_frame(index))
            await asyncio.sleep(0.04)
        await asyncio.sleep(0.25)
        await pipeline.close()
    processed = [pts for kind, pts in engine.events if kind == "frame"]
    assert 6 <= len(processed) <= 14, processed
    assert pipeline.frames_dropped >= 30 - len(processed) - 1
    assert processed == sorted(processed)
    assert processed[-1] >= 27, "the newest frame is processed, not an old one"
    assert engine.threads == {"engine_0"}, "engine work runs off the event loop"


async def test_controls_apply_before_the_next_frame() -> None:
    engine = RecordingEngine(delay=0.0)
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: None)
        await pipeline.apply(Controls(prompt="first"))
        pipeline.feed(make_frame(1))
        await asyncio.sleep(0.1)
        await pipeline.apply(Controls(prompt="second"))
        pipeline.feed(make_frame(2))
        await asyncio.sleep(0.1)
        await pipeline.close()
    assert engine.events == [
        ("configure", "first"),
        ("frame", 1),
        ("configure", "second"),
        ("frame", 2),
    ]


async def test_first_output_frame_is_announced_once() -> None:
    announced: list[int] = []
    engine = RecordingEngine(delay=0.0)
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: announced.append(1))
        for index in range(3):
            pipeline.feed(make_frame(index))
            await pipeline.track.recv()
            await asyncio.sleep(0.05)
        await pipeline.close()
    assert announced == [1]
