"""Image preprocessing: the official geometry (padding, HD crops, global view) and bad images at the door."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgmflow.models.errors import InvalidImageError, InvalidInputError
from mgmflow.models.mgm.processing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, MGMProcessor

NORMAL = MGMProcessor(image_size=84, image_size_aux=192)
HD = MGMProcessor(image_size=84, image_size_aux=384, image_grid=2, image_global=True)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces width x height pixels (a decompression bomb's calling card)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_pad_to_square_with_the_mean_colour():
    wide = Image.new("RGB", (200, 100), (255, 0, 0))
    images, images_aux = NORMAL.preprocess([wide])
    assert images.shape == (1, 3, 84, 84) and images_aux.shape == (1, 3, 192, 192)
    pad = (torch.tensor([122, 116, 104]) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(images_aux[0, :, 5, 96], pad.float())  # a top row: padding
    red = (torch.tensor([1.0, 0, 0]) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(images_aux[0, :, 96, 96], red.float())  # the middle: the image


def test_low_res_view_is_bilinear_of_the_normalised_tensor():
    images, images_aux = NORMAL.preprocess([Image.new("RGB", (50, 70), (10, 200, 30))])
    expected = F.interpolate(images_aux, size=(84, 84), mode="bilinear", align_corners=False, antialias=False)
    assert torch.equal(images, expected)


def test_hd_views_are_row_major_crops_then_global():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    images, images_aux = HD.preprocess([image, image.transpose(Image.Transpose.ROTATE_90)])
    assert images.shape == (2, 5, 3, 84, 84) and images_aux.shape == (2, 3, 384, 384)
    low_res = F.interpolate(images_aux, size=(168, 168), mode="bilinear", align_corners=False)
    for index, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        crop = low_res[:, :, row * 84 : (row + 1) * 84, col * 84 : (col + 1) * 84]
        assert torch.equal(images[:, index], crop)
    global_view = F.interpolate(low_res, size=(84, 84), mode="bilinear", align_corners=False)
    assert torch.equal(images[:, 4], global_view)
    assert not torch.equal(images[0], images[1])  # two images, two sets of views


def test_sources_bytes_paths_and_pil_agree(tmp_path):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    (tmp_path / "a.png").write_bytes(png_bytes(image))
    from_pil, from_bytes, from_path = (NORMAL.preprocess([s])[1] for s in (image, png_bytes(image), tmp_path / "a.png"))
    assert torch.equal(from_pil, from_bytes) and torch.equal(from_pil, from_path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"this is not an image at all", "not a readable image", id="corrupt"),
        pytest.param(png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "truncated", id="truncated"),
        pytest.param(png_claiming(100_000, 100_000), "too large", id="bomb"),
        pytest.param(png_claiming(8_000, 6_000), "the limit is", id="over-the-pixel-limit"),
    ],
)
def test_bad_images_are_typed_errors(data, message):
    with pytest.raises(InvalidImageError, match=message):
        NORMAL.preprocess([data])


def test_no_images_is_a_typed_error():
    with pytest.raises(InvalidInputError):
        NORMAL.preprocess([])


def test_text_needs_a_tokenizer():
    """Folders without a tokenizer (the parity fixtures) run on ids; asking for text is a clear error."""
    with pytest.raises(InvalidInputError, match="no tokenizer"):
        NORMAL(text="USER: <image>\nhi ASSISTANT:")


def _modes():
    rgba = Image.new("RGBA", (30, 20), (0, 0, 255, 0))  # fully transparent blue -> white
    palette = Image.new("P", (30, 20), 3)
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 9, 9, 9] + [0] * 756)
    gray16 = Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16))
    assert gray16.mode.startswith("I;16")
    return {
        "RGBA": (rgba, (255, 255, 255)),
        "P": (palette, (9, 9, 9)),
        "L": (Image.new("L", (30, 20), 77), (77, 77, 77)),
        "CMYK": (Image.new("CMYK", (30, 20), (0, 0, 0, 0)), (255, 255, 255)),
        "I;16": (gray16, (255, 255, 255)),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_odd_modes_become_rgb(mode):
    image, rgb = _modes()[mode]
    _, images_aux = NORMAL.preprocess([png_bytes(image) if mode != "CMYK" else image])
    expected = (torch.tensor(rgb) / 255 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    torch.testing.assert_close(images_aux[0, :, 96, 96], expected.float(), atol=1e-5, rtol=0)
