"""Frame helpers: fit any camera frame to a model's size, convert to and from arrays."""

from __future__ import annotations

import numpy as np
from av import VideoFrame

OUTPUT_FORMAT = "yuv420p"


def fit_frame(frame: VideoFrame, width: int, height: int) -> VideoFrame:
    """Scale (center-cropping when the aspect differs) to `width` x `height` in yuv420p.

    Returns the same frame untouched when it already fits, which keeps passthrough free.
    """
    if frame.width == width and frame.height == height and frame.format.name == OUTPUT_FORMAT:
        return frame
    src_aspect = frame.width / frame.height
    dst_aspect = width / height
    if abs(src_aspect / dst_aspect - 1.0) < 0.02:
        return frame.reformat(width=width, height=height, format=OUTPUT_FORMAT)
    rgb = frame.to_ndarray(format="rgb24")
    cropped = center_crop(rgb, dst_aspect)
    return VideoFrame.from_ndarray(cropped, format="rgb24").reformat(
        width=width, height=height, format=OUTPUT_FORMAT
    )


def center_crop(image: np.ndarray, aspect: float) -> np.ndarray:
    """The largest centered region of `image` with width/height == `aspect`."""
    h, w = image.shape[:2]
    if w / h > aspect:
        new_w = max(2, round(h * aspect) & ~1)
        x0 = (w - new_w) // 2
        return image[:, x0 : x0 + new_w]
    new_h = max(2, round(w / aspect) & ~1)
    y0 = (h - new_h) // 2
    return image[y0 : y0 + new_h]


def yuv_planes(frame: VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Copies of the Y, U and V planes of a yuv420p frame as 2-D uint8 arrays."""
    planes = []
    for plane in frame.planes:
        row = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(
            plane.height, plane.line_size
        )
        planes.append(row[:, : plane.width].copy())
    return planes[0], planes[1], planes[2]


def frame_from_yuv(y: np.ndarray, u: np.ndarray, v: np.ndarray) -> VideoFrame:
    """A yuv420p frame from three planes (Y full size, U and V half size)."""
    height, width = y.shape
    frame = VideoFrame(width, height, OUTPUT_FORMAT)
    for plane, data in zip(frame.planes, (y, u, v), strict=True):
        stride = plane.line_size
        if stride == data.shape[1]:
            # av types update()'s input as bytes; any contiguous buffer is what it reads
            plane.update(np.ascontiguousarray(data))  # type: ignore[arg-type]
        else:
            padded = np.zeros((data.shape[0], stride), dtype=np.uint8)
            padded[:, : data.shape[1]] = data
            plane.update(padded)  # type: ignore[arg-type]  # as above
    return frame


def image_to_rgb(data: bytes, max_pixels: int = 40_000_000) -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes to an RGB array; raises ValueError on anything else."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in {"PNG", "JPEG", "WEBP"}:
                raise ValueError(f"unsupported image format {image.format or 'unknown'}")
            if image.width * image.height > max_pixels:
                raise ValueError("image has too many pixels")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ValueError("image could not be decoded") from exc


__all__ = [
    "OUTPUT_FORMAT",
    "center_crop",
    "fit_frame",
    "frame_from_yuv",
    "image_to_rgb",
    "yuv_planes",
]
