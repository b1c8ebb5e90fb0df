"""Reading photos for enrollment and benchmarks, with one clear error for each way a file can be wrong."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MAX_PIXELS = 40_000_000  # a 40-megapixel photo is already far more than a face needs
MAX_FILE_BYTES = 60_000_000
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class ImageError(ValueError):
    """A photo that cannot be used; the message names the file and what is wrong."""


def to_bgr(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Any 8-bit grey, BGR or BGRA array as BGR uint8 (what detection takes)."""
    if image is None or image.size == 0:
        raise ImageError(f"{source}: empty image")
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ImageError(f"{source}: unsupported pixel type {image.dtype}; save it as an 8-bit JPEG or PNG")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ImageError(f"{source}: unsupported image shape {list(image.shape)}")


def read_image(path: Path) -> np.ndarray:
    """A photo file as BGR uint8; refuses missing, empty, corrupt and oversized files."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, not a photo") from None
    except OSError as exc:
        raise ImageError(f"{path}: cannot read ({exc.strerror})") from None
    if not data:
        raise ImageError(f"{path}: empty file")
    if len(data) > MAX_FILE_BYTES:
        raise ImageError(f"{path}: {len(data) // 1_000_000} MB is too large for a face photo; resize it first")
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or not a photo format)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageError(
            f"{path}: {image.shape[1]}x{image.shape[0]} is too large (over {MAX_PIXELS // 1_000_000} megapixels); "
            "resize it first"
        )
    return to_bgr(image, str(path))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
