"""bench/framecode: stamped numbers survive a real VP8 encode/decode at our frame sizes."""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest
from av import VideoFrame
from bench import framecode

from livemorph.media import encoder as encoder_module

VALUES = [0, 1, 0xFFFFFFFF, 0x80000000, 123456789, 0xDEADBEEF, 4242, 99]


def scene(width: int, height: int, shift: int) -> np.ndarray:
    """A detailed, moving RGB picture: the hardest case is texture right next to the code."""
    try:
        from skimage.data import astronaut

        base = VideoFrame.from_ndarray(astronaut(), format="rgb24")
        image = base.reformat(width=width, height=height).to_ndarray(format="rgb24")
    except ImportError:
        y, x = np.mgrid[0:height, 0:width]
        image = np.stack([x * 255 // width, y * 255 // height, (x ^ y) & 255], axis=2)
        image = image.astype(np.uint8)
    return np.roll(image, shift, axis=1)


def vp8_pair(width: int, height: int, bitrate: int) -> tuple[av.CodecContext, av.CodecContext]:
    """The server's VP8 encoder, built by media/encoder.py itself (no copy of its settings
    to drift), and a decoder."""
    encoder = encoder_module._open_codec(av.VideoFrame(width, height, "yuv420p"), bitrate)
    return encoder, av.CodecContext.create("libvpx", "r")


@pytest.mark.parametrize(
    ("width", "height", "bitrate"),
    # aiortc's starting and minimum VP8 bitrates: the least bits a code will get there
    [(1280, 704, 500_000), (640, 352, 250_000)],
)
@pytest.mark.parametrize("via", ["rgb", "luma"])
def test_values_survive_vp8(width: int, height: int, bitrate: int, via: str) -> None:
    encoder, decoder = vp8_pair(width, height, bitrate)
    fps = 25
    sent, got = [], []
    for index in range(30):
        value = VALUES[index % len(VALUES)] ^ (index * 0x01010101)
        rgb = scene(width, height, shift=index * 6)
        if via == "rgb":
            framecode.stamp(rgb, value)
            frame = VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        else:
            yuv = VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
            planes = yuv.to_ndarray()  # (height * 3 / 2, width) yuv420p layout
            framecode.stamp_luma(planes[:height], value)
            frame = VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts, frame.time_base = index * 90000 // fps, Fraction(1, 90000)
        sent.append(value)
        for packet in encoder.encode(frame):
            for decoded in decoder.decode(packet):
                got.append(framecode.read_yuv(decoded))
                if via == "rgb":
                    assert framecode.read(decoded.to_ndarray(format="rgb24")) == got[-1]
    for packet in encoder.encode(None):
        for decoded in decoder.decode(packet):
            got.append(framecode.read_yuv(decoded))
    assert got == sent


def test_round_trip_without_codec() -> None:
    rgb = scene(640, 352, 0)
    assert framecode.read(rgb) is None
    for value in VALUES:
        framecode.stamp(rgb, value)
        assert framecode.read(rgb) == value
    framecode.stamp(rgb, 2**32 + 5)
    assert framecode.read(rgb) == 5


def test_corrupted_code_is_rejected() -> None:
    rgb = np.zeros((352, 640, 3), dtype=np.uint8)
    framecode.stamp(rgb, 0xCAFEF00D)
    x, y = framecode.ORIGIN[0] + 10 * framecode.BLOCK, framecode.ORIGIN[1]
    rgb[y : y + framecode.BLOCK, x : x + framecode.BLOCK] ^= 0xFF  # flip one data bit
    assert framecode.read(rgb) is None
    rgb[y : y + framecode.BLOCK, x : x + framecode.BLOCK] = 128  # an undecidable grey cell
    assert framecode.read(rgb) is None


def test_too_small_frame() -> None:
    with pytest.raises(ValueError):
        framecode.stamp(np.zeros((32, 320, 3), dtype=np.uint8), 1)
    assert framecode.read(np.zeros((32, 320, 3), dtype=np.uint8)) is None
    assert framecode.read_yuv(VideoFrame(320, 32, "yuv420p")) is None
