"""What the avatar costs and how well its mouth meets its voice, in figures.

    python bench/avatar.py                        # both parts, the default avatar engine
    python bench/avatar.py --parts session --engine meter --client sdk

Parts:
- `cost`: the engine through its seam (configure with the portrait, hear, transform), on
  scikit-image's astronaut cropped to a portrait: ms per frame while it hears speech and
  while it hears silence, interleaved frame by frame (their ratio is what to trust on a
  shared machine), and how much the mouth moves in each.
- `session`: a real `livemorph serve`; a client (the published `decart==0.0.30`, as users'
  apps, or our SDK) connects with the portrait and plays a clip of separate syllables
  ("pa", with pauses: espeak-ng's voice when it is installed, else synthetic voiced
  syllables). Everything is measured as the client receives it: delivered fps; for each
  syllable, the onset of its sound in the returned audio and the onset of the mouth's
  opening in the returned video, and their offset (positive: the picture is late); how
  much the mouth moves during speech against silence. The mouth is found from the frames
  alone: the block of the picture whose change follows the voice most (so any listening
  engine can be measured, `meter` included, whose whole picture follows loudness).

The stock aiortc receive path in `decart==0.0.30` releases each video frame one frame
interval late (README, Latency): its offsets include that; our SDK's do not.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import io
import shutil
import statistics
import subprocess
import time
import wave
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from av import VideoFrame

from latency import livemorph_server
from livemorph.engines import Controls, EngineRegistry
from livemorph.engines.base import AUDIO_RATE
from livemorph.models import CATALOG
from livemorph.testing import LiveServer

SPEC = CATALOG["live_avatar"]
#: The syllables of the clip and the pause after each.
SYLLABLES, PAUSE_S = 8, 0.7


def portrait() -> np.ndarray:
    """The astronaut, cropped to a 3:4 portrait around her face."""
    from skimage.data import astronaut

    return np.ascontiguousarray(astronaut()[0:400, 110:410])


def portrait_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(portrait()).save(buffer, format="PNG")
    return buffer.getvalue()


def syllables_wav(rate: int = 48_000) -> tuple[bytes, str]:
    """The clip, as a WAV file, and what made it."""
    if shutil.which("espeak-ng"):
        text = " ".join(["pa."] * SYLLABLES)
        gap = int(PAUSE_S * 100)  # espeak's word gap is in 10 ms units
        wav = subprocess.run(
            ["espeak-ng", "--stdout", "-s", "120", "-g", str(gap), text],
            check=True,
            capture_output=True,
        ).stdout
        return wav, f"espeak-ng, {SYLLABLES} x 'pa'"
    return synthetic_syllables(rate), f"synthetic, {SYLLABLES} voiced syllables"


def synthetic_syllables(rate: int) -> bytes:
    """Voiced syllables: a 120 Hz pulse train through two vowel formants, 250 ms each."""
    pieces = []
    t = np.arange(int(0.25 * rate)) / rate
    envelope = np.minimum(1.0, t / 0.02) * np.minimum(1.0, (0.25 - t) / 0.05)
    for _ in range(SYLLABLES):
        voice = np.sign(np.sin(2 * np.pi * 120 * t)) * 0.2
        vowel = voice * (np.sin(2 * np.pi * 700 * t) + 0.6 * np.sin(2 * np.pi * 1200 * t))
        pieces += [0.5 * envelope * vowel, np.zeros(int(PAUSE_S * rate))]
    return _wav(np.concatenate(pieces), rate)


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def wav_samples(wav: bytes) -> np.ndarray:
    """Mono float32 at the engine's rate, from a WAV file."""
    import av

    container = av.open(io.BytesIO(wav))
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    chunks = [
        np.frombuffer(out.planes[0], np.float32)[: out.samples]
        for frame in container.decode(audio=0)
        for out in resampler.resample(frame)
    ]
    container.close()
    return np.concatenate(chunks)


# -- cost ------------------------------------------------------------------------------


def part_cost(args: argparse.Namespace) -> None:
    print(f"\n## cost: engine {args.engine} through its seam, {SPEC.width}x{SPEC.height}")
    wav, made = syllables_wav()
    speech = wav_samples(wav)
    _, engine = EngineRegistry(args.engine).resolve(SPEC.name)
    sessions = {"speech": engine.open_session(SPEC), "silence": engine.open_session(SPEC)}
    for session in sessions.values():
        session.configure(Controls(image=portrait()))
    step = AUDIO_RATE // SPEC.fps
    times: dict[str, list[float]] = {name: [] for name in sessions}
    frames: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    clock = time.monotonic()
    count = len(speech) // step
    for index in range(count):
        when = clock + index / SPEC.fps
        for name, session in sessions.items():
            chunk = speech[index * step : (index + 1) * step]
            session.hear(chunk if name == "speech" else np.zeros_like(chunk), when)
            blank = VideoFrame(2, 2, "yuv420p")
            blank.pts, blank.time_base = round(when * 90_000), _TIME_BASE
            started = time.perf_counter()
            output = session.transform(blank)
            times[name].append((time.perf_counter() - started) * 1000)
            frames[name].append(_luma_small(output))
    print(f"  audio: {made}, {count} frames each")
    for name, values in times.items():
        motion = _mouth_motion(frames["speech"], frames[name])
        print(
            f"  {name:<8} median {statistics.median(values):6.2f} ms  p95 "
            f"{np.percentile(values, 95):6.2f} ms  mouth motion {motion:5.2f}",
            flush=True,
        )
    ratio = statistics.median(times["speech"]) / statistics.median(times["silence"])
    print(f"  speech / silence cost: x{ratio:.2f}")


# -- session ---------------------------------------------------------------------------


@dataclass
class Received:
    """What the client got: (arrival, small luma) per video frame, (arrival, RMS) per
    audio frame."""

    video: list[tuple[float, np.ndarray]] = field(default_factory=list)
    audio: list[tuple[float, float]] = field(default_factory=list)

    async def drain_video(self, track: Any) -> None:
        while True:
            frame = await track.recv()
            self.video.append((time.monotonic(), _luma_small(frame)))

    async def drain_audio(self, track: Any) -> None:
        while True:
            frame = await track.recv()
            samples = frame.to_ndarray().astype(np.float64) / 32768.0
            self.audio.append((time.monotonic(), float(np.sqrt(np.mean(samples**2)))))


async def _connect(server: LiveServer, client: str, on_track: Any) -> tuple[Any, Any]:
    """A connected avatar session and its play_audio coroutine function."""
    if client == "stock":
        from decart import DecartClient, models
        from decart.realtime import RealtimeClient, RealtimeConnectOptions
        from decart.types import ModelState

        decart = DecartClient(
            api_key=server.api_key, base_url=server.base_url, realtime_base_url=server.ws_url
        )
        rt = await RealtimeClient.connect(
            base_url=decart.realtime_base_url,
            api_key=decart.api_key,
            local_track=None,
            options=RealtimeConnectOptions(
                model=models.realtime("live_avatar"),
                on_remote_stream=on_track,
                initial_state=ModelState(image=portrait_png()),
            ),
        )
        await decart.close()
        return rt, rt.play_audio
    from livemorph import create_client

    ours = create_client(api_key=server.api_key, base_url=server.base_url)
    rt = await ours.realtime.connect(
        None,
        model="live_avatar",
        avatar={"image": portrait_png()},
        on_remote_stream=on_track,
    )
    return rt, rt.play_audio


async def _session_run(server: LiveServer, client: str, args: argparse.Namespace) -> None:
    wav, made = syllables_wav()
    got = Received()
    tasks: list[asyncio.Task[None]] = []

    def on_track(track: Any) -> None:
        drain = got.drain_video if track.kind == "video" else got.drain_audio
        tasks.append(asyncio.create_task(drain(track)))

    started = time.monotonic()
    rt, play = await _connect(server, client, on_track)
    try:
        await asyncio.sleep(args.warmup)
        first = got.video[0][0] - started if got.video else float("nan")
        quiet_until = time.monotonic()
        await play(wav)
        await asyncio.sleep(1.0)
        ended = time.monotonic()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await rt.disconnect()
    report(got, quiet_until, ended, first, f"{client} client, {made}")


def report(got: Received, quiet_until: float, ended: float, first: float, label: str) -> None:
    window = [(t, y) for t, y in got.video if t >= quiet_until - 2.0]
    times = np.array([t for t, _ in window])
    lumas = np.stack([y for _, y in window])
    rest = np.median(lumas[times < quiet_until], axis=0)
    changes = np.abs(lumas - rest)
    speaking = _speech_spans(got.audio, quiet_until)
    in_speech = np.zeros(len(times), bool)
    for start, end in speaking:
        in_speech |= (times >= start) & (times <= end)
    quiet = times < quiet_until
    box = _mouth_block(changes, in_speech, quiet)
    signal = changes[:, box[0], box[1]].mean(axis=(1, 2))
    fps = len([t for t, _ in got.video if quiet_until <= t <= ended]) / (ended - quiet_until)
    offsets = []
    for start, end in speaking:
        near = (times >= start - 0.2) & (times <= end + 0.2)
        if not near.any():
            continue
        before = signal[(times >= start - 0.4) & (times < start - 0.05)]
        base = float(np.median(before)) if before.size else float(signal[quiet].mean())
        peak = float(signal[near].max())
        if peak - base < 1.0:
            continue
        crossing = np.flatnonzero(near & (signal > base + 0.5 * (peak - base)))
        offsets.append((times[crossing[0]] - start) * 1000)
    motion_speech = float(signal[in_speech].mean()) if in_speech.any() else float("nan")
    motion_quiet = float(signal[quiet].mean()) if quiet.any() else float("nan")
    offset = (
        f"median {statistics.median(offsets):+5.0f} ms (range {min(offsets):+.0f} to "
        f"{max(offsets):+.0f}, {len(offsets)} syllables)"
        if offsets
        else "no syllable measured"
    )
    print(
        f"  {label}: delivered {fps:5.1f} fps; first frame {first:4.2f} s; A/V offset "
        f"{offset}; mouth motion in speech {motion_speech:5.2f} vs silence "
        f"{motion_quiet:5.2f} (x{motion_speech / max(motion_quiet, 1e-3):.1f})",
        flush=True,
    )


def _speech_spans(audio: list[tuple[float, float]], after: float) -> list[tuple[float, float]]:
    """(start, end) of each burst of sound in the returned audio, after `after`."""
    levels = [(t, rms) for t, rms in audio if t >= after]
    if not levels:
        return []
    peak = max(rms for _, rms in levels)
    threshold = 0.2 * peak
    spans, start, last = [], None, 0.0
    for when, rms in levels:
        if rms >= threshold:
            if start is None:
                start = when
            last = when
        elif start is not None and when - last > 0.15:
            spans.append((start, last))
            start = None
    if start is not None:
        spans.append((start, last))
    return [(s, e) for s, e in spans if e - s >= 0.04]


def _mouth_block(
    changes: np.ndarray, speech: np.ndarray, quiet: np.ndarray, block: int = 12
) -> tuple[slice, slice]:
    """The block of the (small) picture whose change is largest in speech relative to
    silence: where the mouth is, for any listening engine."""
    height, width = changes.shape[1:]
    best, where = -1.0, (slice(0, height), slice(0, width))
    for y in range(0, height - block + 1, block // 2):
        for x in range(0, width - block + 1, block // 2):
            patch = changes[:, y : y + block, x : x + block].mean(axis=(1, 2))
            baseline = patch[quiet].mean() if quiet.any() else 0.0
            score = patch[speech].mean() - baseline if speech.any() else 0.0
            if score > best:
                best, where = score, (slice(y, y + block), slice(x, x + block))
    return where


def _mouth_motion(speech: list[np.ndarray], other: list[np.ndarray]) -> float:
    """Mean change between consecutive frames in the block that moves most in speech."""
    moving = np.abs(np.diff(np.stack(speech), axis=0))
    rows, cols = _mouth_block(moving, np.ones(len(moving), bool), np.zeros(len(moving), bool))
    return float(np.abs(np.diff(np.stack(other), axis=0))[:, rows, cols].mean())


def _luma_small(frame: VideoFrame) -> np.ndarray:
    """The frame's luma at 160x90, float32."""
    small = frame.reformat(160, 90, format="gray")
    rows = np.frombuffer(small.planes[0], np.uint8).reshape(90, small.planes[0].line_size)
    return rows[:, :160].astype(np.float32)


_TIME_BASE = fractions.Fraction(1, 90_000)


def part_session(args: argparse.Namespace) -> None:
    print(f"\n## session: through livemorph serve, engine {args.engine}", flush=True)
    engine_flag = args.engine
    with livemorph_server(engine_flag, fast=True, log_level="warning") as server:
        for client in args.client:
            for _ in range(args.repeat):
                asyncio.run(_session_run(server, client, args))


PARTS = {"cost": part_cost, "session": part_session}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--engine", default="avatar", help="a listening engine: avatar, meter")
    parser.add_argument("--client", nargs="+", choices=["stock", "sdk"], default=["stock"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=2.0)
    args = parser.parse_args()
    for part in args.parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
