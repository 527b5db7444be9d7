"""Render docs/transform-strip.jpg: a clip before and after `livemorph transform`.

    python scripts/transform_strip.py [--out docs/transform-strip.jpg] [--engine NAME]

It makes a 4 s clip at mirage's size (1280x704, 25 fps): scikit-image's astronaut photo,
slowly panned and zoomed, with a 440 Hz tone; runs the real command on it, with a new
prompt every second (`--prompt anime@0 --prompt "oil painting@1" ...`); and lays one frame
from each second over the same moment of the output. The command's own last line (frames
a second on this machine) is printed as it ran.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from skimage import data

WIDTH, HEIGHT, FPS, SECONDS = 1280, 704, 25, 4
PROMPTS = ("anime", "oil painting", "pencil sketch", "cyberpunk neon city")
TILE = (304, 167)
LABEL = 24


def make_clip(path: Path) -> None:
    """The astronaut, panned and zoomed over 4 s, with a tone: something that moves."""
    photo = Image.fromarray(data.astronaut())
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = out.add_stream("aac", rate=48_000, layout="mono")
        frames = SECONDS * FPS
        for index in range(frames):
            progress = index / (frames - 1)
            side = photo.width * (1.0 - 0.25 * progress)  # zoom in by a quarter
            crop_h = side * HEIGHT / WIDTH
            left = (photo.width - side) * progress
            top = (photo.height - crop_h) * 0.1
            box = (left, top, left + side, top + crop_h)
            rgb = np.asarray(photo.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR, box=box))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
        samples = SECONDS * 48_000
        tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48_000)).astype(np.float32)
        for start in range(0, samples, 1024):
            chunk = av.AudioFrame.from_ndarray(
                tone[None, start : start + 1024], format="flt", layout="mono"
            )
            chunk.sample_rate, chunk.pts = 48_000, start
            out.mux(sound.encode(chunk))
        out.mux(sound.encode(None))


def frames_at(path: Path, seconds: list[float]) -> list[Image.Image]:
    """The frame showing at each of `seconds`, scaled to a tile."""
    wanted = list(seconds)
    found: list[Image.Image] = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if wanted and frame.time is not None and frame.time >= wanted[0]:
                found.append(frame.to_image().resize(TILE, Image.Resampling.LANCZOS))
                wanted.pop(0)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/transform-strip.jpg"))
    parser.add_argument("--engine", help="an engine to force (default: mirage's own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clip, output = Path(folder) / "clip.mp4", Path(folder) / "styled.mp4"
        make_clip(clip)
        command = [sys.executable, "-m", "livemorph.cli", "transform", str(clip), str(output)]
        command += ["--model", "mirage"]
        for second, prompt in enumerate(PROMPTS):
            command += ["--prompt", f"{prompt}@{second}"]
        if args.engine:
            command += ["--engine", args.engine]
        print("$ livemorph transform clip.mp4 styled.mp4", *command[6:])
        subprocess.run(command, check=True)
        moments = [second + 0.5 for second in range(SECONDS)]
        before, after = frames_at(clip, moments), frames_at(output, moments)
    width = TILE[0] * SECONDS
    strip = Image.new("RGB", (width, 2 * TILE[1] + 2 * LABEL), "white")
    draw = ImageDraw.Draw(strip)
    font = ImageFont.load_default(size=16)
    for column, (moment, prompt) in enumerate(zip(moments, PROMPTS, strict=True)):
        x = column * TILE[0]
        draw.text((x + 6, 3), f"input, {moment:g} s", fill="black", font=font)
        strip.paste(before[column], (x, LABEL))
        draw.text((x + 6, LABEL + TILE[1] + 3), f'"{prompt}"', fill="black", font=font)
        strip.paste(after[column], (x, 2 * LABEL + TILE[1]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out, quality=85, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
