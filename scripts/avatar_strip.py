"""Render docs/avatar-strip.jpg: the avatar engine's astronaut speaking, frame by frame.

    python scripts/avatar_strip.py [--out docs/avatar-strip.jpg]

It drives the avatar engine through the Engine seam, as a session does: `configure` with
scikit-image's astronaut photo cropped to a 3:4 portrait, then, for each frame of a 25 fps
clock, `hear` the next 40 ms of speech and `transform`. The speech is espeak-ng's when it
is installed (else voice.py's synthetic syllables). The strip shows the face in the
consecutive frames around the syllable that opens the mouth the most, each labelled with
its time and the openness the voice asked for; a second row shows a blink in silence,
then the expressions of four behaviour prompts (each in a fresh session, after 1.2 s).
"""

from __future__ import annotations

import argparse
import fractions
import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
from av import AudioResampler, VideoFrame
from av import open as av_open
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from livemorph.engines.avatar.engine import AvatarEngine, AvatarSession
from livemorph.engines.avatar.voice import speech as synthetic_speech
from livemorph.engines.base import AUDIO_RATE, Controls
from livemorph.models import CATALOG

SPEC = CATALOG["live_avatar"]
TEXT = "Hello there! I am talking to you from an old photograph. How are you today?"
FRAMES = 8
PROMPTS = ("serious", "Smile warmly", "sad", "surprised")
TILE_W = 232
CLOCK = 90_000


def portrait() -> np.ndarray:
    """The astronaut cropped to a 3:4 portrait around her face."""
    return np.ascontiguousarray(data.astronaut()[0:384, 80:368])


def speech() -> tuple[np.ndarray, str]:
    """Mono float32 speech at AUDIO_RATE, and what made it."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return synthetic_speech(6.0, seed=4), "synthetic syllables (voice.py)"
    wav = subprocess.run(
        [espeak, "--stdout", "--stdin", "-v", "en", "-s", "150"],
        input=TEXT.encode(),
        capture_output=True,
        check=True,
    ).stdout
    return decode(wav), f"espeak-ng: {TEXT!r}"


def decode(wav: bytes) -> np.ndarray:
    """Any audio file's bytes as mono float32 at AUDIO_RATE."""
    resampler = AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    chunks = []
    with av_open(io.BytesIO(wav)) as container:
        for frame in container.decode(audio=0):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
    for out in resampler.resample(None):
        chunks.append(out.to_ndarray().reshape(-1))
    return np.concatenate(chunks).astype(np.float32)


def tick(when: float) -> VideoFrame:
    frame = VideoFrame(2, 2, "yuv420p")
    frame.pts = round(when * CLOCK)
    frame.time_base = fractions.Fraction(1, CLOCK)
    return frame


def run(session: AvatarSession, audio: np.ndarray, start: float, seconds: float) -> list:
    """Frames and drives for `seconds` from `start`, hearing `audio` from its beginning."""
    step = AUDIO_RATE // SPEC.fps
    shots = []
    for index in range(int(seconds * SPEC.fps)):
        when = start + index / SPEC.fps
        chunk = audio[index * step : (index + 1) * step]
        if chunk.size:
            session.hear(chunk, when)
        frame = session.transform(tick(when))
        shots.append((frame.to_ndarray(format="rgb24"), session.last_drive))
    return shots


def face_box(session: AvatarSession) -> tuple[int, int, int, int]:
    assert session.portrait is not None
    marks = session.portrait.landmarks
    d = marks.scale
    cx = 0.5 * (marks.left_eye[0] + marks.right_eye[0])
    top = 0.5 * (marks.left_eye[1] + marks.right_eye[1]) - 1.0 * d
    bottom = marks.chin[1] + 0.3 * d
    half = 0.5 * (bottom - top) * TILE_W / 300
    return int(cx - half), int(top), int(cx + half), int(bottom)


def tiles(shots: list, box: tuple[int, int, int, int], labels: list[str]) -> Image.Image:
    x0, y0, x1, y1 = box
    height = round(TILE_W * (y1 - y0) / (x1 - x0))
    sheet = Image.new("RGB", (TILE_W * len(shots), height + 22), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=14)
    for index, ((rgb, _), label) in enumerate(zip(shots, labels, strict=True)):
        face = Image.fromarray(rgb[y0:y1, x0:x1]).resize((TILE_W, height), Image.LANCZOS)
        sheet.paste(face, (index * TILE_W, 22))
        draw.text((index * TILE_W + 6, 3), label, fill="black", font=font)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/avatar-strip.jpg"))
    args = parser.parse_args()
    audio, source = speech()
    engine = AvatarEngine("seed=11")
    session = engine.open_session(SPEC)
    session.configure(Controls(image=portrait()))
    shots = run(session, audio, 100.0, len(audio) / AUDIO_RATE + 0.5)
    opens = np.array([drive.mouth.open for _, drive in shots])
    # the run of frames around the syllable whose mouth opens and closes the most
    spans = [
        min(
            opens[i : i + FRAMES].max() - opens[i],
            opens[i : i + FRAMES].max() - opens[i + FRAMES - 1],
        )
        for i in range(len(opens) - FRAMES)
    ]
    first = int(np.argmax(spans))
    speaking = shots[first : first + FRAMES]
    labels = [f"{1000 * (d.time - 100.0):.0f} ms  open {d.mouth.open:.2f}" for _, d in speaking]
    row = [tiles(speaking, face_box(session), labels)]
    # a blink, in silence
    quiet = run(session, np.zeros(0, np.float32), 200.0, 8.0)
    shut = next(i for i, (_, d) in enumerate(quiet) if d.blink > 0.95)
    extra = [quiet[shut - 3], quiet[shut - 1], quiet[shut], quiet[shut + 2]]
    extra_labels = [f"blink {d.blink:.2f}" for _, d in extra]
    # and behaviour prompts, each in a fresh session after 1.2 s of silence
    for prompt in PROMPTS:
        fresh = engine.open_session(SPEC)
        fresh.configure(Controls(image=portrait(), prompt=prompt))
        extra.append(run(fresh, np.zeros(0, np.float32), 300.0, 1.2)[-1])
        extra_labels.append(prompt)
    row.append(tiles(extra, face_box(session), extra_labels))
    sheet = Image.new("RGB", (row[0].width, row[0].height + row[1].height), "white")
    sheet.paste(row[0], (0, 0))
    sheet.paste(row[1], (0, row[0].height))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=88, optimize=True)
    print(f"wrote {args.out} ({source})")


if __name__ == "__main__":
    main()
