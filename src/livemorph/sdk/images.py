"""Reference images: whatever the caller holds, turned into the plain base64 the wire wants.

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


def encode_bytes(data: bytes | bytearray | memoryview) -> str:
    """Base64 of raw image bytes, refusing anything over the size limit."""
    raw = bytes(data)
    if not raw:
        raise LivemorphError("image is empty", ErrorCode.INVALID_INPUT)
    if len(raw) > MAX_IMAGE_BYTES:
        raise _too_large(len(raw))
    return base64.b64encode(raw).decode("ascii")


def encode_array(image: np.ndarray) -> str:
    """Base64 of a uint8 RGB, RGBA or gray array, encoded as PNG."""
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
    return encode_bytes(buffer.getvalue())


def decoded_size(b64: str) -> int:
    """Bytes that a base64 string decodes to, without decoding it."""
    text = b64.strip()
    return len(text) * 3 // 4 - text[-2:].count("=")


def normalize_base64(text: str) -> str:
    """Validate a base64 string (plain or `data:` URL) and return its plain form."""
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise LivemorphError("data: URL must be base64-encoded", ErrorCode.INVALID_INPUT)
        text = payload
    text = "".join(text.split())
    if decoded_size(text) > MAX_IMAGE_BYTES:
        raise _too_large(decoded_size(text))
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise LivemorphError(
            "image string is neither a file path, an http(s) URL, nor base64",
            ErrorCode.INVALID_INPUT,
        ) from None
    if not raw:
        raise LivemorphError("image is empty", ErrorCode.INVALID_INPUT)
    return text


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


async def image_to_base64(image: ImageInput, http: httpx.AsyncClient | None = None) -> str:
    """Plain base64 (no `data:` prefix) of an image, at most 10 MB decoded.

    Strings are tried in order as a `data:` URL, an http(s) URL, an existing file, and
    finally plain base64, the order the published SDKs use. Arrays are sent as PNG.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        return encode_bytes(image)
    if isinstance(image, np.ndarray):
        return await asyncio.to_thread(encode_array, image)
    if isinstance(image, os.PathLike):
        return encode_bytes(await asyncio.to_thread(_read_file, Path(image)))
    if isinstance(image, str):
        if image.startswith("data:"):
            return normalize_base64(image)
        if image.startswith(("http://", "https://")):
            return encode_bytes(await _fetch(image, http))
        if len(image) < 4096 and _is_file(image):
            return encode_bytes(await asyncio.to_thread(_read_file, Path(image)))
        return normalize_base64(image)
    if isinstance(image, Readable):
        data = await asyncio.to_thread(image.read)
        if not isinstance(data, bytes | bytearray):
            raise LivemorphError(
                "file object must be opened in binary mode", ErrorCode.INVALID_INPUT
            )
        return encode_bytes(data)
    raise LivemorphError(f"unsupported image type: {type(image).__name__}", ErrorCode.INVALID_INPUT)


def _is_file(text: str) -> bool:
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False
