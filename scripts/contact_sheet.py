"""Render the contact sheet in the README: one photo under 24 prompts and two images.

    python scripts/contact_sheet.py [--out docs/contact-sheet.jpg] [--model mirage]

It drives the same engine a session uses (the model's default engine, or --engine), on
scikit-image's astronaut photo, through the Engine seam: configure, then transform. Each
tile is a fresh session (so tiles do not depend on their order: a session's network size
steps up after a while) and is labelled with its prompt and the look the engine chose.
Half of the prompts use the catalog's own words, half are phrased the way people type.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from av import VideoFrame
from PIL import Image, ImageDraw, ImageFont
from skimage import data

from livemorph.engines import Controls, EngineRegistry

#: Prompts that are a recipe's name in catalog.toml ...
CATALOG_WORDS = (
    "anime",
    "cartoon",
    "manga",
    "line art",
    "ink drawing",
    "pencil sketch",
    "charcoal drawing",
    "watercolor painting",
    "oil painting",
    "Van Gogh starry night",
    "ukiyo-e woodblock",
    "cyberpunk neon city",
)
#: ... and prompts in words of their own (no recipe's name or alias).
OWN_WORDS = (
    "Studio Ghibli animation style",
    "1950s comic book",
    "soft watercolor of a garden",
    "a sunny Monet garden",
    "neon synthwave",
    "black and white detective movie",
    "subtle blue underwater",
    "a marble statue in a museum",
    "carved from grey granite",
    "made of polished bronze",
    "a shiny chrome robot",
    "drawn in chalk on a blackboard",
)
#: The order on the sheet: looks that are easily confused side by side.
PROMPTS = (
    "anime",
    "Studio Ghibli animation style",
    "cartoon",
    "1950s comic book",
    "manga",
    "line art",
    "ink drawing",
    "pencil sketch",
    "charcoal drawing",
    "watercolor painting",
    "soft watercolor of a garden",
    "oil painting",
    "Van Gogh starry night",
    "a sunny Monet garden",
    "ukiyo-e woodblock",
    "cyberpunk neon city",
    "neon synthwave",
    "black and white detective movie",
    "subtle blue underwater",
    "a marble statue in a museum",
    "carved from grey granite",
    "made of polished bronze",
    "a shiny chrome robot",
    "drawn in chalk on a blackboard",
)
assert sorted(PROMPTS) == sorted(CATALOG_WORDS + OWN_WORDS)
REFERENCES = {"image: coffee": data.coffee, "image: Hubble deep field": data.hubble_deep_field}
TILE = (400, 220)
LABEL = 44
#: A rendered tile: the picture and the name of the look the engine chose.
Tile = tuple[np.ndarray, str]
COLUMNS = 4


def render(engine, spec, frame: VideoFrame, controls: Controls, settle: int = 4) -> Tile:
    """A fresh session's output for `controls` after a few frames (temporal filters
    settle), and the name of the look it chose."""
    session = engine.open_session(spec)
    try:
        session.configure(controls)
        output = None
        for _ in range(settle):
            output = session.transform(frame)
        assert output is not None
        look = getattr(session, "look", None)
        return output.to_ndarray(format="rgb24"), getattr(look, "name", "")
    finally:
        session.close()


def sheet(tiles: list[tuple[str, Tile]]) -> Image.Image:
    rows = -(-len(tiles) // COLUMNS)
    width, height = TILE
    canvas = Image.new("RGB", (COLUMNS * width, rows * (height + LABEL)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=18)
    small = ImageFont.load_default(size=14)
    for index, (label, (rgb, look)) in enumerate(tiles):
        row, column = divmod(index, COLUMNS)
        x, y = column * width, row * (height + LABEL)
        canvas.paste(Image.fromarray(rgb).resize(TILE, Image.LANCZOS), (x, y + LABEL))
        draw.text((x + 6, y + 3), label, fill="black", font=font)
        if look:
            draw.text((x + 6, y + 25), f"-> {look}", fill=(90, 90, 90), font=small)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/contact-sheet.jpg"))
    parser.add_argument("--model", default="mirage")
    parser.add_argument("--engine", help="force an engine (default: the model's)")
    args = parser.parse_args()

    spec, engine = EngineRegistry(args.engine).resolve(args.model)
    # cropped from the top, as a webcam frames a person: the whole face in view
    astronaut = data.astronaut()
    photo = astronaut[: round(astronaut.shape[1] * spec.height / spec.width)]
    frame = VideoFrame.from_ndarray(np.ascontiguousarray(photo), format="rgb24")
    tiles = [("camera (astronaut)", render(engine, spec, frame, Controls(), settle=1))]
    tiles += [(p, render(engine, spec, frame, Controls(prompt=p))) for p in PROMPTS]
    tiles += [
        (label, render(engine, spec, frame, Controls(image=load())))
        for label, load in REFERENCES.items()
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet(tiles).save(args.out, quality=88)
    print(f"wrote {args.out} ({engine.name} engine, {len(tiles)} tiles)")


if __name__ == "__main__":
    main()
