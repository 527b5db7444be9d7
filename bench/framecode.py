"""Stamp a 32-bit number into a video frame as black/white blocks and read it back after VP8.

The benchmark needs to know, for every received frame, which sent frame it was. Blocks are
16x16 and sit on the 16-pixel macroblock grid, so a lossy codec keeps each block's centre
flat; only the centre is sampled, and a CRC-8 plus fixed guard cells reject frames without
a (readable) code. Two rows of 22 cells keep it inside 640x352 frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only numpy at run time: bench/livekit_client.py runs where av is not
    from av import VideoFrame

BLOCK = 16  # pixels per cell side, one VP8 macroblock
ORIGIN = (16, 16)  # (x, y) of the top-left cell, on the macroblock grid
COLUMNS = 22
GUARD = (1, 0, 1, 0)  # fixed cells that tell a code from image content
DATA_BITS = 32
CRC_BITS = 8
CELLS = len(GUARD) + DATA_BITS + CRC_BITS  # 44 = 2 rows x 22 columns
ROWS = -(-CELLS // COLUMNS)
WIDTH = ORIGIN[0] + COLUMNS * BLOCK  # smallest frame width that holds a code
HEIGHT = ORIGIN[1] + ROWS * BLOCK
_MARGIN = 4  # pixels of each cell's border not sampled (ringing at block edges)
_LOW, _HIGH = 90, 165  # luma a cell must be below (0) or above (1) to count as readable


def crc8(value: int) -> int:
    """CRC-8 (polynomial 0x07) of the four bytes of `value`, big-endian."""
    crc = 0
    for byte in value.to_bytes(4, "big"):
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _bits(value: int) -> list[int]:
    value &= 0xFFFFFFFF
    word = (value << CRC_BITS) | crc8(value)
    return [*GUARD, *((word >> i) & 1 for i in reversed(range(DATA_BITS + CRC_BITS)))]


def _cell(index: int) -> tuple[int, int]:
    """Top-left (x, y) of cell `index`."""
    row, column = divmod(index, COLUMNS)
    return ORIGIN[0] + column * BLOCK, ORIGIN[1] + row * BLOCK


def _check_size(width: int, height: int) -> None:
    if width < WIDTH or height < HEIGHT:
        raise ValueError(f"frame {width}x{height} is smaller than the code ({WIDTH}x{HEIGHT})")


def _paint(image: np.ndarray, value: int, black: int, white: int) -> None:
    _check_size(image.shape[1], image.shape[0])
    for index, bit in enumerate(_bits(value)):
        x, y = _cell(index)
        image[y : y + BLOCK, x : x + BLOCK] = white if bit else black


def _decode(luma: np.ndarray) -> int | None:
    """Read a code from a 2-D luma array (full-range or video-range both work)."""
    if luma.shape[1] < WIDTH or luma.shape[0] < HEIGHT:
        return None
    bits = []
    for index in range(CELLS):
        x, y = _cell(index)
        level = float(
            luma[y + _MARGIN : y + BLOCK - _MARGIN, x + _MARGIN : x + BLOCK - _MARGIN].mean()
        )
        if _LOW <= level <= _HIGH:
            return None
        bits.append(int(level > _HIGH))
    if tuple(bits[: len(GUARD)]) != GUARD:
        return None
    word = 0
    for bit in bits[len(GUARD) :]:
        word = (word << 1) | bit
    value, crc = word >> CRC_BITS, word & 0xFF
    return value if crc8(value) == crc else None


def stamp(frame_rgb: np.ndarray, value: int) -> None:
    """Draw `value` (taken mod 2**32) into an HxWx3 uint8 RGB array, in place."""
    _paint(frame_rgb, value, black=0, white=255)


def read(frame_rgb: np.ndarray) -> int | None:
    """The value stamped into an RGB array, or None when there is no readable code."""
    region = frame_rgb[:HEIGHT, :WIDTH].astype(np.float32)
    luma = region @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return _decode(luma)


def stamp_luma(y: np.ndarray, value: int) -> None:
    """Draw `value` into a 2-D luma array (e.g. the Y rows of a yuv420p array), in place.

    Uses video-range black and white (16, 235) so it matches what an RGB stamp turns into.
    """
    _paint(y, value, black=16, white=235)


def read_luma(y: np.ndarray) -> int | None:
    """The value stamped into a 2-D luma array (a decoded frame's Y plane), or None."""
    return _decode(y)


def read_yuv(frame: VideoFrame) -> int | None:
    """The value stamped into a decoded yuv420p (or other planar YUV) frame's Y plane.

    Reads the plane in place, without converting or copying the frame: cheap enough to
    call on every received frame.
    """
    plane = frame.planes[0]
    if frame.width < WIDTH or frame.height < HEIGHT:
        return None
    rows = np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)
    return _decode(rows[:HEIGHT, :WIDTH])
