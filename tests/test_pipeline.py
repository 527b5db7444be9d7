"""The newest-frame hand-off, the pacer, and the pipeline under a slow engine."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from av import VideoFrame

from livemorph.engines.base import Controls, EngineSession
from livemorph.media.slot import LatestSlot, SlotClosed
from livemorph.models import ModelSpec
from livemorph.sessions.pipeline import FramePacer, Pipeline
from tests.support import eventually

#: A model whose pacer admits any frame that comes after another (its interval is 1 ns),
#: so what these tests see of frames and controls does not depend on their timing; the
#: pacer has tests of its own.
UNPACED = ModelSpec("unpaced", 10**9, 64, 32, "test")


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
    """Records what it saw, in order, and the threads it ran on."""

    def __init__(self) -> None:
        super().__init__(UNPACED)
        self.events: list[tuple[str, object]] = []
        self.threads: set[str] = set()

    def configure(self, controls: Controls) -> None:
        self.events.append(("configure", controls.prompt))

    def transform(self, frame: VideoFrame) -> VideoFrame:
        self.threads.add(threading.current_thread().name)
        self.events.append(("frame", frame.pts))
        return frame


def make_frame(index: int) -> VideoFrame:
    frame = VideoFrame.from_ndarray(np.zeros((32, 64, 3), np.uint8), format="rgb24")
    frame.pts = index
    return frame


class GatedEngine(RecordingEngine):
    """An engine as slow as the test says: each frame waits in `transform` for a `release()`."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[object] = []
        self._gate = threading.Semaphore(0)

    def release(self, frames: int = 1) -> None:
        self._gate.release(frames)

    def transform(self, frame: VideoFrame) -> VideoFrame:
        self.started.append(frame.pts)
        if not self._gate.acquire(timeout=10):
            raise TimeoutError("the test never released this frame")
        return super().transform(frame)


async def test_slow_engine_drops_stale_frames_instead_of_queueing() -> None:
    engine = GatedEngine()
    with ThreadPoolExecutor(1, thread_name_prefix="engine") as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: None)
        try:
            pipeline.feed(make_frame(0))
            await eventually(lambda: engine.started == [0])
            for index in range(1, 30):  # the camera goes on while the engine works on frame 0
                pipeline.feed(make_frame(index))
            engine.release()
            await asyncio.wait_for(pipeline.track.recv(), 10)
            await eventually(lambda: len(engine.started) == 2)
            engine.release()
            await asyncio.wait_for(pipeline.track.recv(), 10)
        finally:
            engine.release(30)  # nothing stays blocked, whatever failed
            await pipeline.close()
    processed = [pts for kind, pts in engine.events if kind == "frame"]
    assert processed == [0, 29], "the newest frame is processed next, not a queue of old ones"
    assert pipeline.frames_dropped == 28
    assert engine.threads == {"engine_0"}, "engine work runs off the event loop"


async def test_controls_apply_before_the_next_frame() -> None:
    engine = RecordingEngine()
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: None)
        await pipeline.apply(Controls(prompt="first"))
        pipeline.feed(make_frame(1))
        await asyncio.wait_for(pipeline.track.recv(), 10)  # frame 1 is through the engine
        await pipeline.apply(Controls(prompt="second"))
        pipeline.feed(make_frame(2))
        await asyncio.wait_for(pipeline.track.recv(), 10)
        await pipeline.close()
    assert engine.events == [
        ("configure", "first"),
        ("frame", 1),
        ("configure", "second"),
        ("frame", 2),
    ]


async def test_first_output_frame_is_announced_once() -> None:
    announced: list[int] = []
    engine = RecordingEngine()
    with ThreadPoolExecutor(1) as pool:
        pipeline = Pipeline(engine, pool, on_first_frame=lambda: announced.append(1))
        for index in range(3):
            pipeline.feed(make_frame(index))
            await asyncio.wait_for(pipeline.track.recv(), 10)
        await pipeline.close()
    assert announced == [1]
