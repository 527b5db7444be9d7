"""Drive the published Python client `decart==0.2.4` against a server, as an app would.

This program runs inside the virtual environment that tests/decart_current.py builds from
requirements.txt beside it, so it imports nothing but decart, livekit, numpy and the
standard library. The tests start it with a scenario and read what happened from stdout:
one JSON object a line, each with an `event` name. Pictures go to `--out` as .npy files
(RGB, uint8) that the tests compare with numpy; the events name them.

The camera is a `livekit.rtc.VideoSource` fed at the model's frame rate from `--photo`
(an RGB .npy the test writes at the model's size) with a white square drifting across it,
so that the encoder has motion to code. Received video is read with `rtc.VideoStream`.

Scenarios (`--scenario`):
  session   connect with an initial prompt (and `--image`), the first frames, `set()` with a
            new prompt, a refused prompt, generation ticks, a viewer through `subscribe`
            with the session's subscribe token, and `disconnect`
  refused   a connect that the server should refuse (a bad key, an expired token): the
            error the client raises
  queue     two clients on a node with room for one: the second waits in the queue and
            is admitted when the first disconnects
  process   an image edit through `client.process` (`--image`, `--process-model`), and
            the same with the refused prompt: the error the client raises
  jobs      a video job through `client.queue.submit_and_poll` (`--video`, `--job-model`),
            and a submission of bytes that are no video: the error the client raises

`--pause-at NAME` (repeatable) stops at that checkpoint, after its event, until a line
arrives on stdin: the test looks at the server meanwhile (its session count, say).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from decart import DecartClient, models
from decart.errors import ModelNotFoundError
from decart.models import ModelDefinition
from decart.realtime import (
    RealtimeClient,
    RealtimeConnectOptions,
    SetInput,
    SubscribeClient,
    SubscribeOptions,
)
from decart.types import ModelState, Prompt
from livekit import rtc

logger = logging.getLogger("drive")

#: The SDK module whose DEBUG lines show the control messages it receives.
CONNECTION_LOGGER = "decart.realtime.livekit_connection"


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}, default=str), flush=True)


def describe(error: BaseException | None) -> dict[str, Any] | None:
    """An exception as JSON: its type, message and cause (the SDK keeps one in `.cause`)."""
    if error is None:
        return None
    cause = getattr(error, "cause", None) or error.__cause__
    return {
        "type": type(error).__name__,
        "module": type(error).__module__,
        "message": str(error),
        "cause": describe(cause) if cause is not error else None,
    }


class Failed(Exception):
    """A step went wrong; its event has been emitted already."""


@contextlib.contextmanager
def step(name: str, *, fatal: bool = True) -> Iterator[dict[str, Any]]:
    """Emit `name` with what the block put in the dict, or with the error that stopped it.

    A step that is not `fatal` is reported when it fails and the scenario goes on: the
    steps after it do not need it."""
    fields: dict[str, Any] = {}
    started = time.monotonic()
    try:
        yield fields
    except Failed:
        raise
    except Exception as error:
        emit(
            name,
            ok=False,
            fatal=fatal,
            seconds=round(time.monotonic() - started, 3),
            error=describe(error),
            traceback=traceback.format_exc(),
            **fields,
        )
        if fatal:
            raise Failed(name) from error
        return
    emit(name, ok=True, seconds=round(time.monotonic() - started, 3), **fields)


class Checkpoints:
    def __init__(self, names: list[str]) -> None:
        self.names = set(names)

    async def reach(self, name: str) -> None:
        emit("checkpoint", name=name)
        if name in self.names:
            await asyncio.to_thread(sys.stdin.readline)


class Camera:
    """A camera track: the photo with a drifting white square, at `fps`."""

    def __init__(self, photo: np.ndarray, fps: int) -> None:
        self.height, self.width = photo.shape[:2]
        alpha = np.full((self.height, self.width, 1), 255, np.uint8)
        self._rgba = np.concatenate([photo[:, :, :3], alpha], axis=2)
        self.source = rtc.VideoSource(self.width, self.height)
        self.track = rtc.LocalVideoTrack.create_video_track("camera", self.source)
        self.sent = 0
        self._fps = fps
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        start = time.monotonic()
        while True:
            rgba = self._rgba.copy()
            x = (self.sent * 4) % (self.width - 32)
            rgba[8:40, x : x + 32, :3] = 255
            frame = rtc.VideoFrame(
                self.width, self.height, rtc.VideoBufferType.RGBA, rgba.tobytes()
            )
            self.source.capture_frame(frame, timestamp_us=int(self.sent * 1e6 / self._fps))
            self.sent += 1
            await asyncio.sleep(max(0.0, start + self.sent / self._fps - time.monotonic()))

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.source.aclose()


class Receiver:
    """Drains the remote video track `on_remote_stream` hands over, keeping the newest frame.

    Its `on_remote_stream` is what an app passes to the SDK."""

    def __init__(self, name: str, out: Path) -> None:
        self.name = name
        self.out = out
        self.count = 0
        self.sizes: set[tuple[int, int]] = set()
        self.tracks = 0
        self.started = time.monotonic()
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._frame: rtc.VideoFrame | None = None
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_remote_stream(self, track: rtc.RemoteVideoTrack) -> None:
        self.tracks += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain(track))

    async def _drain(self, track: rtc.RemoteVideoTrack) -> None:
        stream = rtc.VideoStream(track)
        try:
            async for event in stream:
                now = time.monotonic()
                if self.first_at is None:
                    self.first_at = now
                self.last_at = now
                self.count += 1
                self.sizes.add((event.frame.width, event.frame.height))
                self._frame = event.frame
                self._arrived.set()
        finally:
            await stream.aclose()

    async def fresh(self, skip: int = 2, within: float = 15.0) -> np.ndarray:
        """RGB of a frame that arrived after this call: `skip` frames from now, waited
        for `within` seconds at most."""
        target = self.count + skip + 1
        async with asyncio.timeout(within):
            while self.count < target:
                self._arrived.clear()
                await self._arrived.wait()
        assert self._frame is not None
        rgba = self._frame.convert(rtc.VideoBufferType.RGBA)
        pixels = np.frombuffer(rgba.data, dtype=np.uint8)
        return pixels.reshape(rgba.height, rgba.width, 4)[:, :, :3].copy()

    def save(self, label: str, rgb: np.ndarray) -> str:
        name = f"{self.name}-{label}.npy"
        np.save(self.out / name, rgb)
        return name

    def stats(self) -> dict[str, Any]:
        span = (self.last_at or 0) - (self.first_at or 0)
        return {
            "frames": self.count,
            "tracks": self.tracks,
            "sizes": sorted(self.sizes),
            "fps": round((self.count - 1) / span, 2) if self.count > 1 and span > 0 else None,
            "first_frame_s": (
                round(self.first_at - self.started, 3) if self.first_at is not None else None
            ),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class ControlLog(logging.Handler):
    """What the SDK logs about its control channel: the message types it received."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.received: list[str] = []
        self.lines: list[str] = []
        self.changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.lines.append(message)
        if message.startswith("Received ") and message.endswith(" message") and record.args:
            self.received.append(str(record.args[0]))
        self.changed.set()

    async def wait_for(self, kind: str, within: float) -> None:
        async with asyncio.timeout(within):
            while kind not in self.received:
                self.changed.clear()
                await self.changed.wait()


def model_definition(args: argparse.Namespace) -> ModelDefinition:
    """The SDK's own definition of a model it lists; otherwise one built as its docs allow
    for a custom model (`CustomModelDefinition`), from the sizes the test passes."""
    try:
        return models.realtime(args.model)
    except ModelNotFoundError:
        if not (args.fps and args.width and args.height):
            message = f"--fps, --width and --height are needed for model {args.model!r}"
            raise SystemExit(message) from None
        return ModelDefinition(
            name=args.model,
            url_path="/v1/stream",
            fps=args.fps,
            width=args.width,
            height=args.height,
        )


class Scenario:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out
        self.model = model_definition(args)
        self.checkpoints = Checkpoints(args.pause_at)
        self.photo = np.load(args.photo) if args.photo else None
        self._closers: list[Callable[[], Awaitable[Any]]] = []

    def client(self, api_key: str | None = None) -> DecartClient:
        client = DecartClient(
            api_key=api_key or self.args.api_key,
            base_url=self.args.base_url,
            realtime_base_url=self.args.realtime_url,
        )
        self._closers.append(client.close)
        return client

    def camera(self) -> Camera:
        if self.photo is None:
            raise SystemExit("--photo is needed to stream")
        if self.photo.shape[:2] != (self.model.height, self.model.width):
            raise SystemExit(f"--photo is {self.photo.shape}, the model streams {self.size}")
        camera = Camera(self.photo, self.model.fps)
        self._closers.append(camera.close)
        return camera

    def receiver(self, name: str) -> Receiver:
        receiver = Receiver(name, self.out)
        self._closers.append(receiver.close)
        return receiver

    @property
    def size(self) -> tuple[int, int]:
        return (self.model.width, self.model.height)

    async def connect(
        self,
        client: DecartClient,
        camera: Camera,
        receiver: Receiver,
        initial_state: ModelState | None,
    ) -> RealtimeClient:
        receiver.started = time.monotonic()
        realtime = await RealtimeClient.connect(
            base_url=client.realtime_base_url,
            api_key=client.api_key,
            local_track=camera.track,
            options=RealtimeConnectOptions(
                model=self.model,
                on_remote_stream=receiver.on_remote_stream,
                initial_state=initial_state,
            ),
        )
        self._closers.append(realtime.disconnect)
        return realtime

    def initial_state(self) -> ModelState:
        image = self.args.image.read_bytes() if self.args.image else None
        return ModelState(prompt=Prompt(text=self.args.prompt), image=image)

    async def close(self) -> None:
        """What is still open, newest first (disconnecting twice is harmless)."""
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), 10)


async def session(s: Scenario) -> None:
    args = s.args
    client = s.client()
    camera = s.camera()
    output = s.receiver("output")
    states: list[str] = []
    ticks: list[int] = []
    ticked = asyncio.Event()

    def on_tick(message: Any) -> None:
        ticks.append(message.seconds)
        ticked.set()

    errors: list[dict[str, Any] | None] = []

    with step("connected") as info:
        async with asyncio.timeout(args.connect_timeout):  # the SDK retries for minutes
            rt = await s.connect(client, camera, output, s.initial_state())
        rt.on("connection_change", states.append)
        rt.on("generation_tick", on_tick)
        rt.on("error", lambda error: errors.append(describe(error)))
        info.update(
            session_id=rt.session_id,
            subscribe_token=rt.subscribe_token,
            state=rt.get_connection_state(),
            is_connected=rt.is_connected(),
        )

    with step("first_frame") as info:
        first = await output.fresh(skip=0)
        info.update(output.stats(), frame=output.save("first", first), shape=first.shape)

    with step("set_prompt", fatal=False) as info:
        before = await output.fresh()
        info["before"] = output.save("before", before)
        started = time.monotonic()
        await rt.set(SetInput(prompt=args.new_prompt))
        info["ack_s"] = round(time.monotonic() - started, 3)
        after = await output.fresh(skip=4)
        info["after"] = output.save("after", after)

    with step("refused", fatal=False) as info:
        for how in ("set_prompt", "set"):
            started = time.monotonic()
            try:
                if how == "set":
                    await rt.set(SetInput(prompt=args.refused_prompt))
                else:
                    await rt.set_prompt(args.refused_prompt)
            except Exception as error:
                info[how] = {"raised": True, "error": describe(error)}
            else:
                info[how] = {"raised": False}
            info[how]["seconds"] = round(time.monotonic() - started, 3)
        frames = output.count
        info["frame"] = output.save("after-refusal", await output.fresh(skip=4))
        info["frames_since"] = output.count - frames
        info["is_connected"] = rt.is_connected()
        info["state"] = rt.get_connection_state()
        await rt.set_prompt(args.new_prompt)  # steering still works
        info["steers_after"] = True

    with step("ticks", fatal=False) as info:
        try:
            async with asyncio.timeout(args.tick_timeout):
                while len(ticks) < 2:
                    ticked.clear()
                    await ticked.wait()
        except TimeoutError:
            pass
        info["seconds_seen"] = list(ticks)

    with step("viewer", fatal=False) as info:
        watching = s.receiver("viewer")
        async with asyncio.timeout(args.connect_timeout):
            viewer: SubscribeClient = await RealtimeClient.subscribe(
                base_url=client.realtime_base_url,
                api_key=client.api_key,
                options=SubscribeOptions(
                    token=rt.subscribe_token or "", on_remote_stream=watching.on_remote_stream
                ),
            )
        s._closers.append(viewer.disconnect)
        info["state"] = viewer.get_connection_state()
        # Past the first frames, while the viewer's encoder ramps up.
        watched, published = await asyncio.gather(watching.fresh(skip=10), output.fresh(skip=10))
        info.update(
            watching.stats(),
            frame=watching.save("watched", watched),
            published=output.save("published", published),
        )
        await viewer.disconnect()
        info["state_after"] = viewer.get_connection_state()

    with step("disconnected") as info:
        info["output"] = output.stats()
        info["camera_frames"] = camera.sent
        await rt.disconnect()
        info["state"] = rt.get_connection_state()
        info["states"] = states
        info["errors"] = errors
    await s.checkpoints.reach("disconnected")


async def refused(s: Scenario) -> None:
    client = s.client()
    camera = s.camera()
    output = s.receiver("output")
    started = time.monotonic()
    try:
        async with asyncio.timeout(s.args.connect_timeout):
            rt = await s.connect(client, camera, output, ModelState(prompt=Prompt(text="ink")))
    except Exception as error:
        emit(
            "refused",
            raised=True,
            error=describe(error),
            seconds=round(time.monotonic() - started, 3),
        )
    else:
        emit("refused", raised=False, session_id=rt.session_id)


async def queue(s: Scenario) -> None:
    """The first client holds the node's one place; the second waits in the queue."""
    log = ControlLog()
    logging.getLogger(CONNECTION_LOGGER).addHandler(log)
    logging.getLogger(CONNECTION_LOGGER).setLevel(logging.DEBUG)
    first_client, second_client = s.client(), s.client()
    first_out, second_out = s.receiver("first"), s.receiver("second")

    with step("first_connected") as info:
        async with asyncio.timeout(s.args.connect_timeout):
            first = await s.connect(first_client, s.camera(), first_out, s.initial_state())
        await first_out.fresh(skip=0)
        info["session_id"] = first.session_id

    waiting = log.received.count("queue_position")
    second_camera = s.camera()
    joined = time.monotonic()
    second = asyncio.create_task(s.connect(second_client, second_camera, second_out, None))
    with step("second_queued") as info:
        # 0.2.4 takes `queue_position` messages but hands them to no public callback
        # (RealtimeClient.connect leaves LiveKitConfiguration.on_queue_position unset),
        # so they are seen in the SDK's own DEBUG lines: "Received queue_position message".
        waited = asyncio.create_task(log.wait_for("queue_position", s.args.queue_timeout))
        await asyncio.wait({waited, second}, return_when=asyncio.FIRST_COMPLETED)
        if second.done():
            waited.cancel()
            second.result()  # its error, if any
            raise AssertionError("the second client was admitted at once, without a queue")
        await waited
        info["queue_position_messages"] = log.received.count("queue_position") - waiting
        info["connect_pending"] = not second.done()
    await s.checkpoints.reach("queued")

    with step("first_disconnected") as info:
        await first.disconnect()
        info["state"] = first.get_connection_state()

    with step("second_admitted") as info:
        async with asyncio.timeout(s.args.connect_timeout):
            rt = await second
        info["waited_s"] = round(time.monotonic() - joined, 3)
        info["queue_position_messages"] = log.received.count("queue_position") - waiting
        info["received"] = log.received[:50]
        frame = await second_out.fresh(skip=0)
        info.update(second_out.stats(), frame=second_out.save("first", frame))
        await rt.disconnect()


async def process(s: Scenario) -> None:
    """An image edit through `client.process`, as 0.2.4's README shows it: `--image` is the
    picture (its file), `--process-model` the image model. The edited bytes land in
    `edited.bin`; then the same call with the refused prompt, whose error is recorded."""
    client = s.client()
    if s.args.image is None:
        raise SystemExit("--image is needed to edit an image")
    model = models.image(s.args.process_model)
    with step("processed") as info:
        # a Path: the client reads it (aiofiles), as it would a file object
        edited = await client.process(
            {"model": model, "prompt": s.args.prompt, "data": s.args.image}
        )
        (s.out / "edited.bin").write_bytes(edited)
        info.update(model=model.name, url_path=model.url_path, bytes=len(edited))
        info["file"] = str(s.out / "edited.bin")
    with step("process_refused", fatal=False) as info:
        try:
            await client.process(
                {
                    "model": model,
                    "prompt": s.args.refused_prompt,
                    "data": s.args.image.read_bytes(),
                    "enhance_prompt": False,
                }
            )
        except Exception as error:
            info.update(raised=True, error=describe(error))
        else:
            info["raised"] = False


async def jobs(s: Scenario) -> None:
    """A video job through `client.queue.submit_and_poll`: `--video` is the clip (its
    file), `--job-model` the video model. The output lands in `job.mp4`; then a submission
    of bytes that are no video, whose error is recorded."""
    client = s.client()
    if s.args.video is None:
        raise SystemExit("--video is needed for a job")
    model = models.video(s.args.job_model)
    with step("job_finished") as info:
        statuses: list[str] = []
        result = await client.queue.submit_and_poll(
            {
                "model": model,
                "prompt": s.args.prompt,
                "data": s.args.video,
                "on_status_change": lambda job: statuses.append(job.status),
            }
        )
        info.update(model=model.name, url_path=model.url_path, status=result.status)
        info["statuses"] = statuses
        if result.status == "completed":
            (s.out / "job.mp4").write_bytes(result.data)
            info["file"] = str(s.out / "job.mp4")
    with step("job_refused", fatal=False) as info:
        try:
            await client.queue.submit(
                {"model": model, "prompt": s.args.prompt, "data": b"no video at all" * 100}
            )
        except Exception as error:
            info.update(raised=True, error=describe(error))
        else:
            info["raised"] = False


SCENARIOS = {
    "session": session,
    "refused": refused,
    "queue": queue,
    "process": process,
    "jobs": jobs,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="http(s)://HOST:PORT")
    parser.add_argument("--realtime-url", required=True, help="ws(s)://HOST:PORT")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--fps", type=int, help="for a model the SDK does not list")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--out", type=Path, required=True, help="folder for frames (.npy)")
    parser.add_argument("--photo", type=Path, help="the camera's picture: RGB .npy, model size")
    parser.add_argument("--image", type=Path, help="an image file for the initial state")
    parser.add_argument("--prompt", default="anime")
    parser.add_argument("--process-model", default="lucy-image-2", help="for `process`")
    parser.add_argument("--video", type=Path, help="a video file, for `jobs`")
    parser.add_argument("--job-model", default="lucy-restyle-2", help="for `jobs`")
    parser.add_argument("--new-prompt", default="cyberpunk neon city")
    parser.add_argument("--refused-prompt", default="cyberpunk neon city, p0rn")
    parser.add_argument("--tick-timeout", type=float, default=5.0)
    parser.add_argument(
        "--connect-timeout", type=float, default=30.0, help="for a connect or subscribe"
    )
    parser.add_argument("--queue-timeout", type=float, default=10.0)
    parser.add_argument("--pause-at", action="append", default=[], metavar="CHECKPOINT")
    parser.add_argument("--debug", action="store_true", help="DEBUG logs: the SDK's, LiveKit's")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    scenario = Scenario(args)
    emit(
        "start",
        scenario=args.scenario,
        model=scenario.model.name,
        size=scenario.size,
        fps=scenario.model.fps,
        versions=versions(),
    )
    try:
        await SCENARIOS[args.scenario](scenario)
    except Failed:
        return 1
    except Exception as error:
        emit("crashed", error=describe(error), traceback=traceback.format_exc())
        return 1
    finally:
        await scenario.close()
    emit("done")
    return 0


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("decart", "livekit", "numpy")}


def main() -> None:
    args = parse(sys.argv[1:])
    if args.debug:  # LiveKit reads it at each of its log lines: WebRTC's debug lines too
        os.environ.setdefault("LIVEKIT_RTC_DEBUG", "true")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    code = asyncio.run(run(args))
    sys.stdout.flush()
    # The LiveKit FFI's threads can hold the interpreter's exit: leave at once.
    os._exit(code)


if __name__ == "__main__":
    main()
