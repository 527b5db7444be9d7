"""`livemorph transform`: a video file through the engine a session would use.

    file --reader thread--> decoded frames --engine (one worker)--> writer thread --> OUTPUT
                   \\------------------------- audio packets ---------/

Locally, every frame goes through the model's engine in order, as fast as the machine
allows: nothing is dropped or paced, unlike a live session, whose pipeline keeps only the
newest camera frame. The engine is driven by a real `Session` (no peer connection), so a
prompt or an image reaches it along the session's own path: the policy's moderation, then
its enhancement, then the engine's `configure`. Reading, the engine and writing run on
their own threads, so decoding and encoding overlap the engine's work.

With `--server` the file goes to a running server instead (the way to use a GPU node
from a laptop). Where the server takes batch jobs (`POST /v1/jobs/{model}`) and one look
for the whole clip at the input's size will do, it is submitted as a job, its progress
shown while it runs, and the MP4 the job makes is copied into OUTPUT. Otherwise (or with
`--realtime`) the frames go through its realtime API, paced to real time; what comes
back is written at the input's frame timestamps, each slot holding the newest
transformed frame the session's latency (measured before the clip, `_Latency`) after its
input frame left, so the picture keeps step with the sound.

Either way OUTPUT keeps the input's frame timestamps (so its duration and frame rate),
its size unless `--size` says otherwise, and its first audio stream (copied when it is
AAC, else re-encoded to AAC). It is written to a hidden file beside OUTPUT and renamed
at the end, so an interrupted or failed run leaves nothing under OUTPUT's name.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fractions
import itertools
import logging
import math
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av import VideoFrame
from av.audio.stream import AudioStream
from av.video.stream import VideoStream

from .config import Settings
from .engines import EngineRegistry
from .media.frames import fit_frame
from .models import AVATAR, CATALOG, ModelSpec

logger = logging.getLogger(__name__)

#: Exit statuses: bad input (and argparse's own errors), an interrupt (128 + SIGINT).
BAD_INPUT = 2
INTERRUPTED = 130
#: Containers OUTPUT may be, by its suffix; all of them take H.264 and AAC.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
#: H.264 where PyAV's FFmpeg has libx264 (the wheels do), MPEG-4 Part 2 otherwise.
#: `veryfast` keeps the encoder a small share of a frame's cost beside the engine.
X264_OPTIONS = {"preset": "veryfast", "crf": "20"}
#: Frames held between the reader, the engine and the writer: enough to overlap them.
QUEUE_FRAMES = 8
#: Plain progress lines (not a terminal): one per tenth of the clip, or this often.
PLAIN_EVERY = 10.0


class TransformError(Exception):
    """Input the command cannot work with; `str()` is the one line it prints."""


# -- arguments ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TimedPrompt:
    """A prompt, from `at` seconds into the clip on."""

    at: float
    text: str


def parse_prompt(text: str) -> TimedPrompt:
    """`anime` (from the start) or `oil painting@3.5`. The time is what follows the last
    `@`; a prompt that holds an `@` of its own ends with `@0` (or another time)."""
    body, at, when = text.rpartition("@")
    if not at:
        body, seconds = text, 0.0
    else:
        try:
            seconds = float(when)
        except ValueError:
            raise TransformError(
                f"bad time {when!r} in --prompt {text!r}: write TEXT@SECONDS, such as "
                "'oil painting@3.5' (end a prompt that holds an @ with @0)"
            ) from None
        if not math.isfinite(seconds) or seconds < 0:
            raise TransformError(f"bad time {when!r} in --prompt {text!r}: 0 or more seconds")
    if not body.strip():
        raise TransformError(f"empty prompt in --prompt {text!r}")
    return TimedPrompt(seconds, body.strip())


def parse_prompts(texts: list[str]) -> list[TimedPrompt]:
    """The prompts in time order; two at the same moment are refused."""
    prompts = sorted((parse_prompt(text) for text in texts), key=lambda p: p.at)
    for before, after in itertools.pairwise(prompts):
        if before.at == after.at:
            raise TransformError(
                f"two prompts at {after.at:g} s: {before.text!r} and {after.text!r}"
            )
    return prompts


def parse_size(text: str) -> tuple[int, int]:
    """`1280x704`: both even (H.264 in 4:2:0 needs it), 16 to 8192 pixels."""
    width, x, height = text.lower().partition("x")
    try:
        size = (int(width), int(height))
    except ValueError:
        size = None
    if not x or size is None:
        raise TransformError(f"bad --size {text!r}: write WIDTHxHEIGHT, such as 1280x704")
    if any(side % 2 or not 16 <= side <= 8192 for side in size):
        raise TransformError(f"bad --size {text!r}: each side even, from 16 to 8192 pixels")
    return size


def restyle_model(name: str) -> ModelSpec:
    """The model's spec; an unknown model or one that transforms no video is refused."""
    spec = CATALOG.get(name)
    if spec is None:
        raise TransformError(f"unknown model {name!r} (known: {', '.join(CATALOG)})")
    if spec.kind == AVATAR:
        raise TransformError(f"{name} animates a portrait from audio; it transforms no video")
    return spec


@dataclass(frozen=True, slots=True)
class Job:
    """What one `livemorph transform` run was asked to do."""

    input: Path
    output: Path
    model: str
    prompts: list[TimedPrompt]
    image: str | None = None
    enhance: bool = True
    size: tuple[int, int] | None = None


# -- the input ---------------------------------------------------------------------------


@dataclass(slots=True)
class Source:
    """The opened input: its video stream, first audio stream, rate and size."""

    container: av.container.InputContainer
    video: VideoStream
    audio: AudioStream | None
    rate: fractions.Fraction
    width: int
    height: int
    #: Frames the clip holds (the container's count or duration x rate), for progress.
    frames: int | None
    duration: float | None

    @classmethod
    def open(cls, path: Path) -> Source:
        if not path.is_file():
            raise TransformError(f"cannot read {path}: no such file")
        try:
            container = av.open(str(path))
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise TransformError(f"cannot read {path}: not a video ({_reason(exc)})") from None
        if not container.streams.video:
            container.close()
            raise TransformError(f"cannot read {path}: it has no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        rate = video.average_rate or video.guessed_rate or fractions.Fraction(25)
        duration = None
        if video.duration is not None and video.time_base is not None:
            duration = float(video.duration * video.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        frames = video.frames or (round(duration * rate) if duration else None)
        width, height = video.codec_context.width, video.codec_context.height
        if not width or not height:
            container.close()
            raise TransformError(f"cannot read {path}: its video stream has no picture size")
        video.thread_type = "AUTO"
        return cls(container, video, audio, rate, width, height, frames, duration)

    def output_size(self, asked: tuple[int, int] | None) -> tuple[int, int]:
        """`asked`, else the input's own size, rounded up to even sides for 4:2:0."""
        if asked is not None:
            return asked
        return self.width + self.width % 2, self.height + self.height % 2

    def close(self) -> None:
        self.container.close()


def _reason(exc: BaseException) -> str:
    """An FFmpeg error in a few words, without the path it repeats."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__


# -- the output --------------------------------------------------------------------------


class Output:
    """OUTPUT, written to a hidden file beside it and renamed by `finish`.

    Every method but `create`, `finish` and `abort` runs on the writer thread.
    """

    def __init__(self, final: Path, part: Path, container: av.container.OutputContainer) -> None:
        self.final = final
        self.part = part
        self.container = container
        self.video: VideoStream | None = None
        self.audio: AudioStream | None = None
        self._audio_in: AudioStream | None = None
        self._copy_audio = False
        self._last_pts: int | None = None
        self.frames = 0

    @classmethod
    def create(cls, final: Path) -> Output:
        format = CONTAINERS.get(final.suffix.lower())
        if format is None:
            raise TransformError(
                f"cannot write {final}: name it .mp4, .m4v, .mov or .mkv (H.264 and AAC)"
            )
        folder = final.parent if str(final.parent) else Path(".")
        if final.is_dir():
            raise TransformError(f"cannot write {final}: it is a folder")
        try:
            handle, name = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".part" + final.suffix, dir=folder
            )
            os.close(handle)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(name, 0o666 & ~umask)  # as a plain open() would have made it
        except OSError as exc:
            raise TransformError(f"cannot write {final}: {exc.strerror or exc}") from None
        part = Path(name)
        try:
            container = av.open(str(part), mode="w", format=format)
        except (av.error.FFmpegError, OSError) as exc:
            part.unlink(missing_ok=True)
            raise TransformError(f"cannot write {final}: {_reason(exc)}") from None
        return cls(final, part, container)

    def add_video(self, width: int, height: int, rate: fractions.Fraction, time_base: Any) -> None:
        """The video stream: the input's rate and time base, so frame timestamps carry over."""
        codec = "libx264" if _encodes("libx264") else "mpeg4"
        stream = self.container.add_stream(codec, rate=rate)
        assert isinstance(stream, VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if codec == "libx264":
            stream.options = dict(X264_OPTIONS)
        else:
            stream.bit_rate = int(width * height * float(rate) * 0.2)
        self.video = stream

    def add_audio(self, source: AudioStream) -> None:
        """The input's audio: packets copied when AAC, else decoded and encoded to AAC."""
        self._audio_in = source
        if source.codec_context.name == "aac":
            self.audio = self.container.add_stream_from_template(source)
            self._copy_audio = True
            return
        layout = source.codec_context.layout.name if source.channels else "stereo"
        if layout not in ("mono", "stereo"):
            layout = "stereo"
        self.audio = self.container.add_stream("aac", rate=source.rate or 48_000, layout=layout)

    def write_video(self, frame: VideoFrame, pts: int, time_base: Any) -> None:
        assert self.video is not None
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1  # a broken file's repeated stamp; the encoder refuses it
        self._last_pts = pts
        fitted = fit_frame(frame, self.video.width, self.video.height)
        # The same frame may come again (through a server, a slot holds the newest output
        # until the next one arrives): the encoder keeps the stamp it was given with it.
        fitted.pts, fitted.time_base = pts, time_base
        for packet in self.video.encode(fitted):
            self.container.mux(packet)
        self.frames += 1

    def write_audio(self, packet: av.Packet) -> None:
        if self.audio is None or packet.dts is None:
            return  # a demuxer's flush packet
        if self._copy_audio:
            packet.stream = self.audio
            self.container.mux(packet)
            return
        assert self._audio_in is not None
        for frame in self._audio_in.codec_context.decode(packet):
            for out in self.audio.encode(frame):
                self.container.mux(out)

    def flush(self) -> None:
        if self.video is not None:
            for packet in self.video.encode(None):
                self.container.mux(packet)
        if self.audio is not None and not self._copy_audio:
            assert self._audio_in is not None
            for frame in self._audio_in.codec_context.decode(None):
                for out in self.audio.encode(frame):
                    self.container.mux(out)
            for out in self.audio.encode(None):
                self.container.mux(out)

    def finish(self) -> None:
        """Close the file and give it OUTPUT's name (replacing what was there)."""
        self.container.close()
        os.replace(self.part, self.final)

    def abort(self) -> None:
        """Close and remove the hidden file: nothing of this run stays behind."""
        with contextlib.suppress(Exception):
            self.container.close()
        self.part.unlink(missing_ok=True)


def _encodes(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except (av.error.FFmpegError, ValueError):
        return False
    return True


# -- progress ----------------------------------------------------------------------------


class Progress:
    """Frames done, frames a second and time left: a bar redrawn in place on a terminal,
    a plain line now and then otherwise (a log, CI)."""

    def __init__(
        self,
        total: int | None,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.clock = clock
        self.start = clock()
        self.done = 0
        self._shown_at = -math.inf
        self._shown_tenth = -1

    def restart(self) -> None:
        """Count from now: the frames a second of the work, not of loading the engine."""
        self.start = self.clock()

    def update(self, done: int) -> None:
        self.done = done
        now = self.clock()
        if self.interactive:
            if now - self._shown_at >= 0.1:
                self._shown_at = now
                self.stream.write("\r" + self._bar() + "\x1b[K")
                self.stream.flush()
            return
        tenth = done * 10 // self.total if self.total else -1
        if tenth > self._shown_tenth or now - self._shown_at >= PLAIN_EVERY:
            self._shown_tenth = max(tenth, self._shown_tenth)
            self._shown_at = now
            print(f"livemorph: {self._line()}", file=self.stream, flush=True)

    @property
    def fps(self) -> float:
        elapsed = self.clock() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def _left(self) -> str:
        if not self.total or not self.fps:
            return "?"
        seconds = max(0, round((self.total - self.done) / self.fps))
        return f"{seconds // 60}:{seconds % 60:02d}"

    def _line(self) -> str:
        of = f"/{self.total}" if self.total else ""
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        return f"{self.done}{of} frames{share}, {self.fps:.1f} fps, {self._left()} left"

    def _bar(self) -> str:
        width = 24
        filled = width * min(self.done, self.total) // self.total if self.total else 0
        return f"[{'#' * filled}{'.' * (width - filled)}] {self._line()}"

    def close(self) -> None:
        if self.interactive:
            self.stream.write("\r" + self._bar() + "\x1b[K\n")
            self.stream.flush()


# -- the threads around the engine -------------------------------------------------------

#: What the reader hands on: ("video", frame) or ("audio", packet); None at the end.
Item = tuple[str, Any] | None


class _Stages:
    """The reader and writer threads, and the bounded queues between them and the engine.

    `stop()` ends both wherever they are (an interrupt, a failure): it drains the queues so
    no thread stays blocked on a full one, and waits for them, so the output file is never
    closed under the writer's feet.
    """

    def __init__(self, source: Source, output: Output) -> None:
        self.source = source
        self.output = output
        self.inbox: queue.Queue[Item | BaseException] = queue.Queue(QUEUE_FRAMES)
        self.outbox: queue.Queue[tuple[str, Any] | None] = queue.Queue(QUEUE_FRAMES)
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.written = threading.Event()
        self._reader = threading.Thread(target=self._read, name="transform-read", daemon=True)
        self._writer = threading.Thread(target=self._write, name="transform-write", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._writer.start()

    def _put(self, box: queue.Queue[Any], item: Any) -> bool:
        while not self.stopping.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        streams = [s for s in (self.source.video, self.source.audio) if s is not None]
        try:
            for packet in self.source.container.demux(streams):
                if packet.stream is self.source.video:
                    for frame in packet.decode():
                        if not self._put(self.inbox, ("video", frame)):
                            return
                elif not self._put(self.inbox, ("audio", packet)):
                    return
            self._put(self.inbox, None)
        except Exception as exc:  # a corrupt file: said by the caller, once
            self._put(self.inbox, exc)

    def _write(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    item = self.outbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is None:
                    self.output.flush()
                    self.written.set()
                    return
                kind, payload = item
                if kind == "video":
                    self.output.write_video(*payload)
                else:
                    self.output.write_audio(payload)
        except Exception as exc:
            self.failure = exc
            self.written.set()

    async def next(self) -> Item:
        """The next decoded frame or audio packet (None at the end of the file)."""
        item = await asyncio.to_thread(self.inbox.get)
        if isinstance(item, BaseException):
            raise TransformError(f"cannot read {self.source.container.name}: {_reason(item)}")
        return item

    async def write(self, item: tuple[str, Any] | None) -> None:
        if self.failure is not None:
            raise self.failure
        await asyncio.to_thread(self._put, self.outbox, item)

    async def finish(self) -> None:
        """Hand the writer the end, and wait until it has flushed the encoders."""
        await self.write(None)
        await asyncio.to_thread(self.written.wait)
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        self.stopping.set()
        for box in (self.inbox, self.outbox):
            with contextlib.suppress(queue.Empty):
                while True:
                    box.get_nowait()
        for thread in (self._reader, self._writer):
            if thread.ident is not None:  # started
                thread.join(timeout=10)
        with contextlib.suppress(queue.Full):
            self.inbox.put_nowait(None)  # wakes a `next` still waiting


# -- the local transform -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    frames: int
    seconds: float
    duration: float | None
    #: Through a server: the session's latency, measured before the clip.
    latency: float | None = None


def _registry(settings: Settings, model: str) -> EngineRegistry:
    """The registry a server with these settings would have (`--engine`, `--model-engines`
    and the defaults), but for one thing: in a session the neural engine's network size
    follows the machine's spare CPU (scaler.py), and a transform keeps the CPU busy on
    purpose, which would drive it down to the smallest size and change the look mid-clip.
    Unless a size is given, the neural engine keeps the size a session starts at."""
    from .engines.neural.scaler import LADDER, START
    from .engines.registry import parse_model_engines
    from .models import UnknownModelError

    try:
        chosen = EngineRegistry(settings.engine, parse_model_engines(settings.model_engines))
        engine = chosen.engine_spec(model)
    except (ValueError, UnknownModelError) as exc:
        raise TransformError(str(exc)) from None
    name, _, options = (engine or "").partition(":")
    if name == "neural" and "size=" not in options:
        width, height = LADDER[START]
        engine = f"neural:{options + ',' if options else ''}size={width}x{height}"
    try:
        return EngineRegistry(engine)
    except ValueError as exc:
        raise TransformError(str(exc)) from None


async def _discard(_message: object) -> None:
    """The session's messages to a client: a file has nobody to tell."""


async def transform_local(job: Job, settings: Settings, progress: Progress) -> Result:
    from .engines.neural import weights
    from .engines.registry import ModelNotAvailable
    from .models import UnknownModelError
    from .policy import Policy, policy_from_settings
    from .sdk.images import image_bytes
    from .sessions.session import InputRefused, Session
    from .storage import Principal

    weights.use_folder(settings.text_model)
    model = restyle_model(job.model)
    registry = _registry(settings, job.model)
    source = Source.open(job.input)
    try:
        output = Output.create(job.output)
    except BaseException:
        source.close()
        raise
    width, height = source.output_size(job.size)
    progress.total = source.frames
    try:
        moderator, enhancer = policy_from_settings(settings)
    except BaseException:
        output.abort()
        source.close()
        raise
    policy = Policy(moderator, enhancer)
    stages = _Stages(source, output)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    started = time.monotonic()  # from the first frame on: loading the engine comes first
    try:
        try:
            _, engine = registry.resolve(job.model)
        except (UnknownModelError, ModelNotAvailable) as exc:
            raise TransformError(str(exc)) from None
        except Exception as exc:
            raise TransformError(f"the engine cannot start: {exc}") from None
        for prompt in job.prompts:  # all of them now, not minutes into the clip
            if (refused := await policy.refusal(prompt=prompt.text)) is not None:
                raise TransformError(f"--prompt {prompt.text!r}: {refused}")
        image = None
        if job.image is not None:
            from .errors import LivemorphError

            try:
                image = await image_bytes(job.image)
            except LivemorphError as exc:
                raise TransformError(f"--image: {exc.message}") from None
        # the engine renders at the output's size and the input's rate: a session's own
        # fitting would crop a picture of another shape, and the output is the file's
        spec = dataclasses.replace(model, width=width, height=height, fps=round(source.rate))
        session = Session(
            spec, Principal(key_id="local"), engine.open_session(spec), executor, _discard, policy
        )
        try:
            pending = list(job.prompts)
            try:
                if image is not None:
                    first = pending.pop(0) if pending and pending[0].at == 0 else None
                    await session.set_image(image, first.text if first else None, job.enhance)
            except InputRefused as exc:
                raise TransformError(f"--image: {exc}") from None
            output.add_video(width, height, source.rate, source.video.time_base)
            if source.audio is not None:
                output.add_audio(source.audio)
            stages.start()
            progress.restart()
            started = time.monotonic()
            transform = session.pipeline.engine.transform
            loop = asyncio.get_running_loop()
            first_time: float | None = None
            index = 0
            while (item := await stages.next()) is not None:
                kind, payload = item
                if kind == "audio":
                    await stages.write(item)
                    continue
                frame: VideoFrame = payload
                pts, time_base = _stamp(frame, index, source)
                seconds = float(pts * time_base)
                first_time = seconds if first_time is None else first_time
                while pending and pending[0].at <= seconds - first_time:
                    prompt = pending.pop(0)
                    try:
                        await session.set_prompt(prompt.text, job.enhance)
                    except InputRefused as exc:
                        raise TransformError(f"--prompt {prompt.text!r}: {exc}") from None
                # engine calls never overlap: `set_prompt` returned once configure ran
                out = await loop.run_in_executor(executor, transform, frame)
                await stages.write(("video", (out, pts, time_base)))
                index += 1
                progress.update(index)
            await stages.finish()
        finally:
            await session.close(notify=False)
        stages.stop()
        output.finish()
    except BaseException:
        stages.stop()
        output.abort()
        raise
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        registry.close()
        await moderator.aclose()
        await enhancer.aclose()
        source.close()
    return Result(output.frames, time.monotonic() - started, source.duration)


def _stamp(frame: VideoFrame, index: int, source: Source) -> tuple[int, Any]:
    """The frame's own timestamp and time base; one from its index where it has none."""
    time_base = frame.time_base or source.video.time_base
    if frame.pts is not None and time_base is not None:
        return frame.pts, time_base
    time_base = fractions.Fraction(1, 90_000)
    return round(index / source.rate / time_base), time_base


# -- through a server --------------------------------------------------------------------


#: How the session's latency is measured before the clip: outputs of the probe picture
#: first, then the time until the clip's first frame shows (or this long at most).
PROBE_OUTPUTS = 3
PROBE_TIMEOUT = 5.0
#: An output counts as the clip's first frame when it differs from the probe's outputs by
#: this much (mean of 0..255 on a thumbnail), and by four times their own variation.
PROBE_CHANGE = 8.0


def _thumbnail(frame: VideoFrame) -> Any:
    return frame.reformat(width=64, height=36, format="rgb24").to_ndarray().astype("float32")


class _Latency:
    """Measures the session's latency once, before the clip, so that each output frame is
    written in the slot of the input frame it was made from and the picture keeps step
    with the sound.

    The first frame is sent as its negative until the output flows (the engine's first
    frame may take a while) and settles; then the frame itself: the time until the output
    changes is the latency, from camera to screen, as the clip will see it.
    """

    def __init__(self) -> None:
        self.seconds: float | None = None
        self.switched_at: float | None = None
        self._baseline: Any = None
        self._noise = 0.0
        self._outputs = 0

    @property
    def settled(self) -> bool:
        """Enough outputs of the probe picture have come to tell the change."""
        return self._outputs >= PROBE_OUTPUTS

    def seen(self, frame: VideoFrame, now: float) -> None:
        if self.seconds is not None:
            return
        thumbnail = _thumbnail(frame)
        if self.switched_at is None:
            if self._baseline is not None:
                self._noise = max(self._noise, float(abs(thumbnail - self._baseline).mean()))
            self._baseline = thumbnail
            self._outputs += 1
            return
        change = float(abs(thumbnail - self._baseline).mean())
        if change > max(PROBE_CHANGE, 4 * self._noise):
            self.seconds = now - self.switched_at
            logger.info("the session's latency: %.0f ms", 1000 * self.seconds)

    def give_up(self) -> None:
        """No change seen (an engine whose picture ignores the camera): no correction."""
        if self.seconds is None:
            logger.warning("could not measure the session's latency; the picture may trail")
            self.seconds = 0.0


class _NewestFrame:
    """Drains a remote video track, keeping only its newest frame."""

    def __init__(self, latency: _Latency) -> None:
        self.frame: VideoFrame | None = None
        self.latency = latency
        self._tasks: list[asyncio.Task[None]] = []

    def follow(self, track: MediaStreamTrack) -> None:
        if track.kind == "video":
            self._tasks.append(asyncio.ensure_future(self._drain(track)))

    async def _drain(self, track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                assert isinstance(frame, VideoFrame)
                self.frame = frame
                self.latency.seen(frame, time.monotonic())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class _ClipTrack(MediaStreamTrack):
    """The file's frames, sent at their own timestamps once the latency is known.

    Each input frame's slot is filled the measured latency after it left, with the newest
    transformed frame then: the one made from it, or the one before where the model's rate
    is lower than the file's.
    """

    kind = "video"

    def __init__(
        self,
        stages: _Stages,
        received: _NewestFrame,
        on_time: Callable[[float], None],
        progress: Progress,
    ) -> None:
        super().__init__()
        self.stages = stages
        self.received = received
        self.latency = received.latency
        self.on_time = on_time
        self.progress = progress
        self.frames = 0
        self._slots: asyncio.Queue[tuple[float, int, Any] | None] = asyncio.Queue()
        self.filled: asyncio.Task[None] = asyncio.ensure_future(self._fill())
        self._first: VideoFrame | None = None
        self._negative: VideoFrame | None = None
        self._first_time: float | None = None
        self._start: float | None = None
        self._last_sent: float | None = None
        self._clock: float | None = None
        self._pending: tuple[VideoFrame, int, Any] | None = None
        self._index = 0

    async def _next_frame(self) -> tuple[VideoFrame, int, Any] | None:
        while (item := await self.stages.next()) is not None:
            kind, payload = item
            if kind == "audio":
                await self.stages.write(item)  # the file's sound, in its own time
                continue
            pts, time_base = _stamp(payload, self._index, self.stages.source)
            self._index += 1
            return payload, pts, time_base
        return None

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        interval = 1.0 / float(self.stages.source.rate)
        if self._first is None:
            upcoming = await self._next_frame()
            if upcoming is None:
                raise MediaStreamError
            self._pending = upcoming
            self._first = upcoming[0]
            rgb = self._first.to_ndarray(format="rgb24")
            self._negative = VideoFrame.from_ndarray(255 - rgb, format="rgb24")
        if self.latency.seconds is None:
            await self._pace(interval)
            if not self.latency.settled:
                assert self._negative is not None
                return self._send(self._negative)
            if self.latency.switched_at is None:
                self.latency.switched_at = time.monotonic()
            elif time.monotonic() - self.latency.switched_at > PROBE_TIMEOUT:
                self.latency.give_up()
            if self.latency.seconds is None:
                return self._send(self._first)
        if self._start is None:
            self._start = time.monotonic()
            self.progress.restart()  # the clip's own pace, not the connection's and probe's
        upcoming = self._pending or await self._next_frame()
        self._pending = None
        if upcoming is None:
            self._slots.put_nowait(None)
            self.stop()
            raise MediaStreamError
        frame, pts, time_base = upcoming
        seconds = float(pts * time_base)
        self._first_time = seconds if self._first_time is None else self._first_time
        due = self._start + seconds - self._first_time
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        self.on_time(seconds - self._first_time)
        sent = self._send(frame)
        assert self.latency.seconds is not None
        self._slots.put_nowait(((self._last_sent or 0.0) + self.latency.seconds, pts, time_base))
        return sent

    async def _fill(self) -> None:
        """Write each slot when its output is due: the newest transformed frame then."""
        while (slot := await self._slots.get()) is not None:
            due, pts, time_base = slot
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            assert self.received.frame is not None
            await self.stages.write(("video", (self.received.frame, pts, time_base)))
            self.frames += 1
            self.progress.update(self.frames)

    async def _pace(self, interval: float) -> None:
        now = time.monotonic()
        if self._last_sent is not None and (wait := self._last_sent + interval - now) > 0:
            await asyncio.sleep(wait)

    def _send(self, frame: VideoFrame) -> VideoFrame:
        """A copy on the sender's own clock: the file's stamps restart nowhere useful."""
        now = time.monotonic()
        self._last_sent = now
        out = frame.reformat(format="yuv420p")
        if out is frame:
            out = VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
        if self._clock is None:
            self._clock = now
        out.pts = int((now - self._clock) * 90_000)
        out.time_base = fractions.Fraction(1, 90_000)
        return out


async def transform_remote(job: Job, server: str, api_key: str, progress: Progress) -> Result:
    from .errors import ErrorCode, LivemorphError
    from .sdk import create_client

    restyle_model(job.model)
    source = Source.open(job.input)
    try:
        output = Output.create(job.output)
    except BaseException:
        source.close()
        raise
    width, height = source.output_size(job.size)
    progress.total = source.frames
    stages = _Stages(source, output)
    received = _NewestFrame(_Latency())
    started = time.monotonic()
    changes: set[asyncio.Task[None]] = set()
    finishing: list[asyncio.Task[None]] = []
    try:
        output.add_video(width, height, source.rate, source.video.time_base)
        if source.audio is not None:
            output.add_audio(source.audio)
        stages.start()
        pending = list(job.prompts)
        initial: dict[str, Any] = {}
        if pending and pending[0].at == 0:
            initial["prompt"] = {"text": pending.pop(0).text, "enhance": job.enhance}
        if job.image is not None:
            initial["image"] = job.image
        rt: Any = None

        def on_time(seconds: float) -> None:
            while pending and pending[0].at <= seconds and rt is not None:
                task = asyncio.ensure_future(rt.set_prompt(pending.pop(0).text, job.enhance))
                changes.add(task)

        track = _ClipTrack(stages, received, on_time, progress)
        finishing.append(track.filled)
        async with create_client(api_key=api_key, base_url=server) as client:
            try:
                rt = await client.realtime.connect(
                    track,
                    model=job.model,
                    on_remote_stream=received.follow,
                    initial_state=initial or None,  # type: ignore[arg-type]
                )
            except LivemorphError as exc:
                bad = exc.code in (
                    ErrorCode.INVALID_INPUT,
                    ErrorCode.MODEL_NOT_FOUND,
                    ErrorCode.INVALID_API_KEY,
                )
                if bad:
                    raise TransformError(f"{server}: {exc.message}") from None
                raise
            try:
                ended = asyncio.ensure_future(_dropped(rt))
                done = track.filled  # the last slot written
                await asyncio.wait({ended, done}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if not done.done():
                    raise LivemorphError(
                        "the session ended before the clip did", ErrorCode.WEB_RTC_ERROR
                    )
                done.result()  # a failure to write, said as it was
                for task in changes:
                    try:
                        await task
                    except LivemorphError as exc:
                        raise TransformError(f"--prompt: {exc.message}") from None
            finally:
                await rt.disconnect()
                await received.close()
        await stages.finish()
        stages.stop()
        output.finish()
    except BaseException:
        for task in [*changes, *finishing]:
            task.cancel()
        stages.stop()
        output.abort()
        raise
    finally:
        source.close()
    # the clip's own time: connecting and measuring the latency come before it
    seconds = time.monotonic() - (track._start or started)
    return Result(output.frames, seconds, source.duration, received.latency.seconds)


def _as_job(job: Job) -> str | None:
    """Why a server's job cannot do what `job` asks (None: it can). A job takes one look
    for the whole clip and keeps the input's size."""
    if len(job.prompts) > 1 or (job.prompts and job.prompts[0].at > 0):
        return "a job takes one prompt for the whole clip"
    if job.size is not None:
        return "a job keeps the input's size"
    return None


def _remux(downloaded: Path, output: Output) -> int:
    """The job's MP4, its packets copied into OUTPUT's container (H.264 and AAC fit every
    one); the video frames written."""
    frames = 0
    with av.open(str(downloaded)) as source:
        streams = {}
        for stream in (*source.streams.video[:1], *source.streams.audio[:1]):
            streams[stream.index] = output.container.add_stream_from_template(stream)
        if source.streams.video and source.streams.video[0].average_rate:
            # the frame rate, which a matroska file says only when told
            copy = streams[source.streams.video[0].index]
            assert isinstance(copy, VideoStream)
            copy.codec_context.framerate = source.streams.video[0].average_rate
        for packet in source.demux(*(source.streams[i] for i in streams)):
            if packet.dts is None:
                continue  # a demuxer's flush packet
            if packet.stream.type == "video":
                frames += 1
            packet.stream = streams[packet.stream.index]
            output.container.mux(packet)
    return frames


async def transform_job(job: Job, server: str, api_key: str, progress: Progress) -> Result | None:
    """The file as a batch job of the server's (`POST /v1/jobs/{model}`), its MP4 written
    to OUTPUT; None when the server takes no jobs. The job runs on the server at its own
    pace (no real-time pacing), so the look is the server's engine's, frame for frame."""
    from .errors import ErrorCode, LivemorphError
    from .sdk import create_client

    restyle_model(job.model)
    source = Source.open(job.input)
    frames, duration = source.frames, source.duration
    source.close()
    output = Output.create(job.output)
    downloaded = output.part.with_name(output.part.name + ".job.mp4")
    started = time.monotonic()
    try:
        async with create_client(api_key=api_key, base_url=server) as client:
            try:
                if not await client.jobs.available():
                    output.abort()
                    return None
                submitted = await client.jobs.submit(
                    job.model,
                    job.input,
                    prompt=job.prompts[0].text if job.prompts else None,
                    reference_image=job.image,
                    enhance_prompt=job.enhance,
                )
                print(
                    f"livemorph: job {submitted.job_id} submitted to {server}",
                    file=progress.stream,
                    flush=True,
                )
                progress.total = frames
                running = False

                def on_progress(status: Any) -> None:
                    nonlocal running
                    if status.status == "processing" and not running:
                        running = True
                        progress.restart()
                    if status.progress is not None and frames:
                        progress.update(round(status.progress * frames))

                await client.jobs.wait(submitted.job_id, on_progress=on_progress)
                progress.update(frames or 0)
                await client.jobs.save(submitted.job_id, downloaded)
            except LivemorphError as exc:
                bad = exc.code in (
                    ErrorCode.INVALID_INPUT,
                    ErrorCode.MODEL_NOT_FOUND,
                    ErrorCode.INVALID_API_KEY,
                )
                if bad:
                    raise TransformError(f"{server}: {exc.message}") from None
                raise
        written = await asyncio.to_thread(_remux, downloaded, output)
        output.finish()
    except BaseException:
        output.abort()
        raise
    finally:
        downloaded.unlink(missing_ok=True)
    return Result(written, time.monotonic() - started, duration)


async def _dropped(rt: Any) -> None:
    """Returns when the session is over for good (disconnected, not reconnecting)."""
    gone = asyncio.Event()

    def changed(state: str) -> None:
        if state == "disconnected":
            gone.set()

    rt.on("connection_change", changed)
    await gone.wait()


# -- the command -------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`livemorph transform`'s own arguments (the engine and policy settings come from
    config.py, like `serve`'s)."""
    parser.add_argument("input", type=Path, help="the video file to transform")
    parser.add_argument(
        "output", type=Path, help="where to write the result (.mp4, .m4v, .mov or .mkv)"
    )
    parser.add_argument("--model", required=True, help="the model: mirage, mirage_v2, ...")
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT[@SECONDS]",
        help="the look; again with @SECONDS to change it during the clip "
        "(--prompt anime@0 --prompt 'oil painting@3.5')",
    )
    parser.add_argument(
        "--image", metavar="REF", help="a reference image: a path, an http(s) URL or base64"
    )
    parser.add_argument(
        "--enhance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the engine or the enhancer expand the prompt",
    )
    parser.add_argument("--size", metavar="WxH", help="the output's size (default: the input's)")
    parser.add_argument(
        "--server",
        metavar="URL",
        help="transform the file on this server: as a batch job where it takes jobs, else "
        "streamed through its realtime API, in real time",
    )
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="with --server: stream through the realtime API even where the server takes jobs",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help="the server's API key (env LIVEMORPH_API_KEY); only with --server",
    )


def run(args: argparse.Namespace, settings: Settings, stderr: TextIO | None = None) -> int:
    """Run the command; its exit status. Errors are one line on stderr."""
    err = stderr or sys.stderr
    logging.basicConfig(level=logging.WARNING, format="livemorph: %(message)s")
    try:
        prompts = parse_prompts(list(args.prompt))
        if not prompts and args.image is None:
            raise TransformError("give a --prompt, an --image, or both")
        job = Job(
            input=args.input,
            output=args.output,
            model=args.model,
            prompts=prompts,
            image=args.image,
            enhance=args.enhance,
            size=parse_size(args.size) if args.size else None,
        )
        progress = Progress(None, err)
        if getattr(args, "realtime", False) and not args.server:
            raise TransformError("--realtime is for --server")
        if args.server:
            key = args.api_key or os.environ.get("LIVEMORPH_API_KEY")
            if not key:
                raise TransformError("--server needs a key: --api-key or LIVEMORPH_API_KEY")
            if getattr(args, "engine", None) is not None:
                raise TransformError("--engine is for a local transform; the server has its own")
            realtime = getattr(args, "realtime", False)
            why_not = "--realtime" if realtime else _as_job(job)
            found: Result | None = None
            if why_not is None:
                found = asyncio.run(transform_job(job, args.server, key, progress))
                if found is None:
                    print("livemorph: the server takes no jobs; streaming in real time", file=err)
            elif not realtime:
                print(f"livemorph: {why_not}; streaming in real time", file=err)
            if found is None:
                progress = Progress(None, err)
                found = asyncio.run(transform_remote(job, args.server, key, progress))
            result = found
        else:
            result = asyncio.run(transform_local(job, settings, progress))
        progress.close()
    except TransformError as exc:
        print(f"livemorph: {exc}", file=err)
        return BAD_INPUT
    except KeyboardInterrupt:
        print(f"\nlivemorph: interrupted; {args.output} was not written", file=err)
        return INTERRUPTED
    except Exception as exc:
        print(f"livemorph: transform failed: {exc}", file=err)
        return 1
    speed = f", {result.duration / result.seconds:.2f}x real time" if result.duration else ""
    if result.latency:
        speed += f"; the session's latency {1000 * result.latency:.0f} ms, made up for"
    print(
        f"livemorph: wrote {job.output}: {result.frames} frames in {result.seconds:.1f} s "
        f"({result.frames / result.seconds:.1f} fps{speed})",
        file=err,
    )
    return 0
