"""Decoding and validating user images, once, for every model.

Every image that reaches a model goes through :func:`load_image`: it refuses empty, corrupt, truncated and
decompression-bomb inputs with :class:`InvalidImageError`, and turns every PIL mode into 8-bit RGB. What decoding
costs is known from the header alone (:func:`check_header`) and checked against a budget before any pixel is decoded.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mgmflow.models.errors import InvalidImageError

# 40 megapixels: above any camera a user is likely to upload, far below what exhausts memory when decoded.
MAX_IMAGE_PIXELS = 40_000_000
# Memory decoding one image may take: its pixels as PIL holds them plus the RGB copy (40 megapixels of 8-bit RGB).
MAX_DECODED_BYTES = 320 * 1024 * 1024
# Bytes per pixel as PIL holds each mode in memory (RGB takes 4: PIL pads it); other modes count 4.
_PIXEL_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "LA": 4, "La": 4, "PA": 4}
_STRIP_PIXELS = 1 << 18  # 16-bit and float images are scaled a strip of about this many pixels at a time

ImageSource = bytes | bytearray | str | Path | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = MAX_IMAGE_PIXELS,
               max_bytes: int = MAX_DECODED_BYTES) -> Image.Image:
    """Decode ``source`` (bytes, a path, or a PIL image) into a fully loaded 8-bit RGB image."""
    image = source if isinstance(source, Image.Image) else _open(source, max_pixels)
    _check_size(image, max_pixels, max_bytes)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation as OSError
        raise InvalidImageError(f"image could not be decoded: {error}") from error
    if getattr(image, "is_animated", False):
        image.seek(0)  # the first frame of an animation stands for the image
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def check_header(source: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_DECODED_BYTES) -> int:
    """Refuse ``source`` from its header alone (no pixel decoded) as :func:`load_image` would for its size; returns
    the memory decoding it takes."""
    image = _open(source, max_pixels)
    _check_size(image, max_pixels, max_bytes)
    return _decoded_bytes(image)


def _decoded_bytes(image: Image.Image) -> int:
    """Its pixels as PIL holds them, plus the RGB copy."""
    width, height = image.size
    own = _PIXEL_BYTES.get(image.mode, 4)
    return width * height * (own if image.mode == "RGB" else own + 4)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha over white, 16-bit and float scaled (not clipped) to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_8bit(image)).convert("RGB")  # uint8 2-D -> mode L
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit and float pixels scaled to uint8 a strip at a time: the float copy is one strip, never the
    whole image (a 40-megapixel 16-bit image would take 320 MB as float64)."""
    pixels = np.asarray(image)
    top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
    scaled = np.empty(pixels.shape, dtype=np.uint8)
    rows = max(1, _STRIP_PIXELS // max(1, pixels.shape[1]))
    for start in range(0, pixels.shape[0], rows):
        strip = pixels[start:start + rows].astype(np.float64)
        scaled[start:start + rows] = np.clip(strip / top * 255.0 + 0.5, 0, 255)
    return scaled


def _open(source: ImageSource, max_pixels: int) -> Image.Image:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise InvalidImageError(f"image file not found: {path}")
        data = path.read_bytes()
    else:
        data = bytes(source)
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit is checked below; PIL's bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise InvalidImageError(f"image is too large: {error}") from error
    except UnidentifiedImageError as error:  # its text names PIL's in-memory file object, which tells nobody anything
        raise InvalidImageError("not a readable image: unknown or corrupt format") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(f"not a readable image: {error}") from error


def _check_size(image: Image.Image, max_pixels: int, max_bytes: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
    needed = _decoded_bytes(image)
    if needed > max_bytes:
        raise InvalidImageError(f"image is {width}x{height} in mode {image.mode}: decoding takes {needed:,} bytes; "
                                f"the limit is {max_bytes:,}")
