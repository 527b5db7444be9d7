"""Render the contact sheet in the README: one photo under a dozen prompts and two images.

    python scripts/contact_sheet.py [--out docs/contact-sheet.jpg] [--model mirage]

It drives the same engine a session uses (the model's default engine, or --engine), on
scikit-image's astronaut photo, through the Engine seam: configure, then transform.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from av import VideoFrame
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from livemorph.engines import Controls, EngineRegistry
from livemorph.media.frames import center_crop

PROMPTS = (
    "anime",
    "Studio Ghibli animation style",
    "cyberpunk neon city",
    "watercolor painting",
    "Lego world",
    "oil painting",
    "pencil sketch",
    "Van Gogh starry night",
    "pop art comic book",
    "ukiyo-e woodblock print",
    "vintage sepia film",
    "subtle blue underwater",
)
REFERENCES = {"image: coffee": data.coffee, "image: Hubble deep field": data.hubble_deep_field}
TILE = (400, 220)
LABEL = 26
COLUMNS = 4


def render(engine_session, frame: VideoFrame, controls: Controls, settle: int = 4) -> np.ndarray:
    """The engine's output for `controls`, after a few frames (temporal filters settle)."""
    engine_session.configure(controls)
    output = None
    for _ in range(settle):
        output = engine_session.transform(frame)
    assert output is not None
    return output.to_ndarray(format="rgb24")


def sheet(tiles: list[tuple[str, np.ndarray]]) -> Image.Image:
    rows = -(-len(tiles) // COLUMNS)
    width, height = TILE
    canvas = Image.new("RGB", (COLUMNS * width, rows * (height + LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    for index, (label, rgb) in enumerate(tiles):
        row, column = divmod(index, COLUMNS)
        x, y = column * width, row * (height + LABEL)
        canvas.paste(Image.fromarray(rgb).resize(TILE, Image.LANCZOS), (x, y + LABEL))
        draw.text((x + 6, y + 3), label, fill="black", font=font)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/contact-sheet.jpg"))
    parser.add_argument("--model", default="mirage")
    parser.add_argument("--engine", help="force an engine (default: the model's)")
    args = parser.parse_args()

    spec, engine = EngineRegistry(args.engine).resolve(args.model)
    session = engine.open_session(spec)
    photo = center_crop(data.astronaut(), spec.width / spec.height)
    frame = VideoFrame.from_ndarray(np.ascontiguousarray(photo), format="rgb24")
    tiles = [("camera (astronaut)", render(session, frame, Controls(), settle=1))]
    tiles += [(prompt, render(session, frame, Controls(prompt=prompt))) for prompt in PROMPTS]
    tiles += [
        (label, render(session, frame, Controls(image=load())))
        for label, load in REFERENCES.items()
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet(tiles).save(args.out, quality=88)
    print(f"wrote {args.out} ({engine.name} engine, {len(tiles)} tiles)")


if __name__ == "__main__":
    main()
