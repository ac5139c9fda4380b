"""Decoding and validating user images, once, for every model.

Every image that reaches a model goes through :func:`load_image`: it refuses empty, corrupt, truncated and
decompression-bomb inputs with :class:`InvalidImageError`, and turns every PIL mode into 8-bit RGB.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from models.errors import InvalidImageError

# 40 megapixels: above any camera a user is likely to upload, far below what exhausts memory when decoded.
MAX_IMAGE_PIXELS = 40_000_000

ImageSource = bytes | bytearray | str | Path | Image.Image


def load_image(source: ImageSource, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode ``source`` (bytes, a path, or a PIL image) into a fully loaded 8-bit RGB image."""
    image = source if isinstance(source, Image.Image) else _open(source, max_pixels)
    _check_size(image, max_pixels)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:  # PIL reports truncation as OSError
        raise InvalidImageError(f"image could not be decoded: {error}") from error
    if getattr(image, "is_animated", False):
        image.seek(0)  # the first frame of an animation stands for the image
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha over white, 16-bit and float scaled (not clipped) to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 255.0
        pixels = np.clip(pixels / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels).convert("RGB")  # uint8 2-D -> mode L
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


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


def _check_size(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}"
        )
