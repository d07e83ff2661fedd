"""Reading images and masks into one canonical form, whatever the file holds.

Benchmarks mix grayscale (MVTec grid, screw...), palette and 8/16-bit files; the pipeline
wants ``H x W x 3 uint8 RGB`` images and ``H x W bool`` masks. Everything is converted
here, once, and anything that cannot be read becomes a :class:`DatasetError` naming the
file. The pixel count is checked from the header before decoding, so a decompression bomb
is refused without allocating it.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from harmoniad.data.records import DatasetError

# Largest image accepted, in pixels. 64 MP is far above any benchmark image (BTAD's largest
# are 1600x1600, VisA's about 1.5k x 1.3k) and keeps a decoded RGB image under 200 MB.
MAX_PIXELS = 64 * 1024 * 1024

# What a corrupt or truncated file can raise from inside Pillow's decoders.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open ``path`` lazily (header only) and refuse it if it is over ``max_pixels``."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such image file")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that applies; Pillow's warning would be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({exc})") from exc
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: not a readable image ({exc})") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise DatasetError(f"{path}: image has an empty size {width}x{height}")
    if width * height > max_pixels:
        img.close()
        raise DatasetError(
            f"{path}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} (refused as a possible decompression bomb)"
        )
    return img


def _decode(img: Image.Image, path: Path) -> Image.Image:
    """Force decoding so truncation shows up here, as a DatasetError naming the file."""
    try:
        img.load()
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{path}: image data is truncated or corrupt ({exc})") from exc
    return img


def image_size(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the file header, without decoding the pixels.

    Cheap enough to run on every image/mask pair of a benchmark when it is loaded.
    """
    p = Path(path)
    img = _open(p, max_pixels)
    try:
        return img.size
    finally:
        img.close()


def _to_rgb_array(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grayscale: keep the full range by scaling 0..65535 to 0..255 (Pillow's own
        # convert would clip instead). Mode "I" is how Pillow exposes 16-bit PNG/TIFF data.
        gray = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DatasetError(
            f"{path}: floating-point image (mode F) has no defined display range; "
            "expected an 8- or 16-bit image"
        )
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Alpha is dropped: colour channels are kept as stored, as OpenCV-based readers do.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image as an ``H x W x 3`` uint8 RGB array.

    Grayscale, binary, palette, RGBA/LA (alpha dropped), CMYK and 16-bit files are
    converted; a missing, unreadable or truncated file, or one over ``max_pixels``, raises
    :class:`DatasetError` naming ``path``. Pixels are returned as stored (no EXIF rotation),
    so an image and its mask always stay aligned.
    """
    p = Path(path)
    img = _open(p, max_pixels)
    try:
        _decode(img, p)
        arr = _to_rgb_array(img, p)
    finally:
        img.close()
    return arr


def read_mask(path: str | os.PathLike[str], *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read a ground-truth mask as an ``H x W`` bool array: any non-zero pixel is anomalous.

    Masks are not always 0/255 (VisA's hold small class values), so nothing is thresholded
    at 128. Palette masks are judged by their colours (an index whose colour is black is
    normal); colour masks by any non-zero colour channel (alpha ignored).
    """
    p = Path(path)
    img = _open(p, max_pixels)
    try:
        _decode(img, p)
        mode = img.mode
        if mode in ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "YCbCr"):
            # Judge colours, not palette indices: an index says nothing about its colour.
            mask = np.asarray(img.convert("RGB")).any(axis=2)
        elif mode in ("LA", "La"):
            mask = np.asarray(img.getchannel(0)) > 0
        else:  # "1", "L", "I", "I;16*", "F"; any other multi-band mode fails the 2-D check
            mask = np.asarray(img) > 0
    except _DECODE_ERRORS as exc:
        raise DatasetError(f"{p}: mask cannot be converted ({exc})") from exc
    finally:
        img.close()
    if mask.ndim != 2:
        raise DatasetError(f"{p}: expected a 2-D mask, got shape {mask.shape}")
    return np.ascontiguousarray(mask, dtype=bool)
