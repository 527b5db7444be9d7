"""Render the demo's bundled live_avatar portraits into src/livemorph/web/app/portraits/.

    python scripts/demo_portraits.py

Both come from scikit-image's astronaut photo (Eileen Collins, NASA: "No known copyright
restrictions, released into the public domain", as `skimage.data.astronaut` says), cropped
from the top as a webcam frames a person, at the avatar's 16:9, so the whole face is in view
whatever an engine crops: `astronaut.jpg` as it is, `astronaut-anime.jpg` drawn by this
server's own neural engine with the prompt "anime" (faces keep their features there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from av import VideoFrame
from PIL import Image
from skimage import data

from livemorph.engines import Controls, EngineRegistry

OUT = Path(__file__).resolve().parents[1] / "src" / "livemorph" / "web" / "app" / "portraits"
SIZE = (640, 360)
QUALITY = 88


def photo() -> Image.Image:
    astronaut = data.astronaut()
    crop = astronaut[: round(astronaut.shape[1] * 9 / 16)]
    return Image.fromarray(np.ascontiguousarray(crop))


def drawn(image: Image.Image, prompt: str = "anime", settle: int = 4) -> Image.Image:
    spec, engine = EngineRegistry(None).resolve("mirage")
    frame = VideoFrame.from_ndarray(
        np.asarray(image.resize((spec.width, spec.height), Image.LANCZOS)), format="rgb24"
    )
    session = engine.open_session(spec)
    try:
        session.configure(Controls(prompt=prompt))
        output = None
        for _ in range(settle):  # temporal filters settle
            output = session.transform(frame)
        assert output is not None
        return Image.fromarray(output.to_ndarray(format="rgb24"))
    finally:
        session.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    original = photo()
    for name, image in (("astronaut", original), ("astronaut-anime", drawn(original))):
        path = OUT / f"{name}.jpg"
        image.resize(SIZE, Image.LANCZOS).save(path, quality=QUALITY, optimize=True)
        print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
