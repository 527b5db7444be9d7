"""Reference images: whatever the caller holds, turned into the image file's bytes.

Size is checked before anything is sent, so an oversized image fails fast and locally
instead of costing a 14 MB upload and a server refusal.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import httpx
import numpy as np
from PIL import Image

from ..errors import ErrorCode, LivemorphError
from ..protocol import MAX_IMAGE_BYTES


@runtime_checkable
class Readable(Protocol):
    """A file-like object opened in binary mode."""

    def read(self) -> bytes: ...


ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str] | Readable | np.ndarray
"""bytes, a file path, an http(s) URL, a `data:` URL, plain base64, a binary file object, or
a uint8 numpy array: RGB (h, w, 3), RGBA (h, w, 4) or gray (h, w), sent as PNG."""


def _too_large(size: int) -> LivemorphError:
    return LivemorphError(
        f"image is {size} bytes; the limit is {MAX_IMAGE_BYTES} bytes (10 MB)",
        ErrorCode.INVALID_INPUT,
    )


def _checked(data: bytes | bytearray | memoryview) -> bytes:
    """Raw image bytes, refusing an empty image or one over the size limit."""
    raw = bytes(data)
    if not raw:
        raise LivemorphError("image is empty", ErrorCode.INVALID_INPUT)
    if len(raw) > MAX_IMAGE_BYTES:
        raise _too_large(len(raw))
    return raw


def _png_of(image: np.ndarray) -> bytes:
    """A uint8 RGB, RGBA or gray array, encoded as PNG."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise LivemorphError(
            f"image arrays must be uint8, not {array.dtype}", ErrorCode.INVALID_INPUT
        )
    channels = 2 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels not in (2, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise LivemorphError(
            f"image arrays must be (h, w, 3) RGB, (h, w, 4) RGBA or (h, w) gray, not {array.shape}",
            ErrorCode.INVALID_INPUT,
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG")
    return _checked(buffer.getvalue())


def _decoded_size(b64: str) -> int:
    """Bytes that a base64 string decodes to, without decoding it."""
    text = b64.strip()
    return len(text) * 3 // 4 - text[-2:].count("=")


def _from_base64(text: str) -> bytes:
    """The bytes of a base64 string (plain or `data:` URL), validated."""
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise LivemorphError("data: URL must be base64-encoded", ErrorCode.INVALID_INPUT)
        text = payload
    text = "".join(text.split())
    if _decoded_size(text) > MAX_IMAGE_BYTES:
        raise _too_large(_decoded_size(text))
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise LivemorphError(
            "image string is neither a file path, an http(s) URL, nor base64",
            ErrorCode.INVALID_INPUT,
        ) from None
    return _checked(raw)


def _read_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise LivemorphError(f"cannot read image {path}: {exc}", ErrorCode.INVALID_INPUT) from None
    if size > MAX_IMAGE_BYTES:
        raise _too_large(size)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LivemorphError(f"cannot read image {path}: {exc}", ErrorCode.INVALID_INPUT) from None


async def _fetch(url: str, http: httpx.AsyncClient | None) -> bytes:
    owned = http is None
    client = http or httpx.AsyncClient(follow_redirects=True, timeout=30.0)
    try:
        response = await client.get(url)
        if response.status_code != 200:
            raise LivemorphError(
                f"cannot fetch image: HTTP {response.status_code}", ErrorCode.INVALID_INPUT
            )
        return response.content
    except httpx.HTTPError as exc:
        raise LivemorphError(f"cannot fetch image: {exc}", ErrorCode.INVALID_INPUT) from None
    finally:
        if owned:
            await client.aclose()


async def image_bytes(image: ImageInput, http: httpx.AsyncClient | None = None) -> bytes:
    """The image file's bytes, at most 10 MB.

    Strings are tried in order as a `data:` URL, an http(s) URL, an existing file, and
    finally plain base64, the order the published SDKs use. Arrays become PNG files.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return _checked(image)
    if isinstance(image, np.ndarray):
        return await asyncio.to_thread(_png_of, image)
    if isinstance(image, os.PathLike):
        return _checked(await asyncio.to_thread(_read_file, Path(image)))
    if isinstance(image, str):
        if image.startswith("data:"):
            return _from_base64(image)
        if image.startswith(("http://", "https://")):
            return _checked(await _fetch(image, http))
        if len(image) < 4096 and _is_file(image):
            return _checked(await asyncio.to_thread(_read_file, Path(image)))
        return _from_base64(image)
    if isinstance(image, Readable):
        data = await asyncio.to_thread(image.read)
        if not isinstance(data, bytes | bytearray):
            raise LivemorphError(
                "file object must be opened in binary mode", ErrorCode.INVALID_INPUT
            )
        return _checked(data)
    raise LivemorphError(f"unsupported image type: {type(image).__name__}", ErrorCode.INVALID_INPUT)


async def image_to_base64(image: ImageInput, http: httpx.AsyncClient | None = None) -> str:
    """Plain base64 (no `data:` prefix) of an image, as `image_bytes` reads it."""
    return base64.b64encode(await image_bytes(image, http)).decode("ascii")


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False
