"""mgmflow.models.images.load_image: the one decoder every model uses refuses bad images with a typed error."""

import io

import numpy as np
import pytest
from PIL import Image

from mgmflow.models.errors import InvalidImageError
from mgmflow.models.images import load_image


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_rgb_png_round_trips_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    image = load_image(_png(Image.fromarray(pixels)))
    assert image.mode == "RGB" and image.size == (20, 12)
    assert np.array_equal(np.asarray(image), pixels)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_garbage_is_refused(data):
    with pytest.raises(InvalidImageError):
        load_image(data)


def test_truncated_image_is_refused():
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _png(Image.fromarray(pixels))
    with pytest.raises(InvalidImageError):
        load_image(data[: len(data) // 2])


def test_pixel_limit_is_enforced_before_decoding():
    data = _png(Image.new("L", (300, 300)))
    with pytest.raises(InvalidImageError, match="limit"):
        load_image(data, max_pixels=300 * 299)


def test_decompression_bomb_is_refused():
    # A tiny PNG that claims 20000 x 20000 pixels: PIL's own bomb check or ours must refuse it.
    data = _png(Image.new("1", (20000, 20000)))
    assert len(data) < 200_000
    with pytest.raises(InvalidImageError):
        load_image(data)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    image = load_image(_png(rgba))
    assert image.getpixel((0, 0)) == (255, 255, 255)
    assert image.getpixel((1, 0)) == (10, 20, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    pixels = np.array([[0, 32768, 65535]], dtype=np.uint16)
    image = load_image(_png(Image.fromarray(pixels)))  # uint16 -> I;16
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1", "LA"])
def test_odd_modes_become_rgb(mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = load_image(_png(Image.new(mode, (5, 4)), fmt))
    assert image.mode == "RGB" and image.size == (5, 4)


def test_sixteen_bit_conversion_makes_no_float64_copy_of_the_image():
    """A 16-bit image is scaled to 8 bits a strip at a time: the float copy never holds the whole image."""
    import tracemalloc

    image = Image.fromarray(np.full((2000, 2000), 40_000, dtype=np.uint16))  # I;16, 4 megapixels
    tracemalloc.start()
    try:
        rgb = load_image(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rgb.getpixel((0, 0)) == (156, 156, 156)
    assert peak < 5 * 2000 * 2000, peak  # the uint16 and uint8 copies and a strip; float64 alone would be 32 MB


def test_decoding_cost_is_checked_from_the_header():
    from mgmflow.models.images import check_header

    data = _png(Image.fromarray(np.zeros((300, 400), dtype=np.uint16)))
    assert check_header(data) == 300 * 400 * (2 + 4)  # 16-bit pixels plus the RGB copy
    with pytest.raises(InvalidImageError, match="decoding takes"):
        check_header(data, max_bytes=300 * 400 * 6 - 1)
