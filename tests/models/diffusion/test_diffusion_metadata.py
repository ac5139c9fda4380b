"""PNG parameters: AUTOMATIC1111's ``parameters`` chunk and our JSON chunk, written and read back."""

import io

import pytest
from PIL import Image

from models.diffusion.metadata import encode_png, infotext, parse_infotext, read_parameters
from models.errors import InvalidImageError

PARAMETERS = {
    "task": "img2img",
    "prompt": "a cat, in a hat: red\nsecond line with \"quotes\" and ünïcödé 猫",
    "negative_prompt": "lowres, blurry\nbad: anatomy",
    "seed": 2**40 + 7,
    "steps": 30,
    "guidance_scale": 5.5,
    "width": 1024,
    "height": 768,
    "model": "sdxl-base",
    "scheduler": "EulerDiscreteScheduler",
    "strength": 0.75,
    "loras": [{"name": "pixel_art", "weight": 0.8, "sha256": "ab" * 32}],
    "image_sha256": "cd" * 32,
}


def _chunks(png: bytes) -> dict:
    with Image.open(io.BytesIO(png)) as image:
        return dict(image.text)


def test_png_round_trip_is_exact():
    png = encode_png(Image.new("RGB", (8, 8), "blue"), PARAMETERS)
    assert read_parameters(png) == PARAMETERS
    chunks = _chunks(png)
    assert set(chunks) == {"parameters", "mgmflow"}


def test_a1111_text_alone_parses_back_to_our_keys():
    png = encode_png(Image.new("RGB", (8, 8)), PARAMETERS)
    parsed = parse_infotext(_chunks(png)["parameters"])
    for key in ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "model",
                "scheduler", "strength"):
        assert parsed[key] == PARAMETERS[key], key
    assert parsed["loras"] == [{"name": "pixel_art", "sha256": "ab" * 6, "weight": 0.8}]


def test_infotext_layout_follows_a1111():
    text = infotext(PARAMETERS | {"prompt": "a cat", "negative_prompt": "ugly", "loras": []})
    assert text.split("\n") == [
        "a cat",
        "Negative prompt: ugly",
        "Steps: 30, Sampler: EulerDiscreteScheduler, CFG scale: 5.5, Seed: 1099511627783, Size: 1024x768, "
        "Model: sdxl-base, Denoising strength: 0.75",
    ]
    assert "Negative prompt" not in infotext(PARAMETERS | {"negative_prompt": ""})


def test_reads_a_png_written_by_automatic1111():
    text = (
        "masterpiece, a castle\nNegative prompt: lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "detail: 1a2b3c4d5e6f", Version: v1.10.1'
    )
    info = __import__("PIL.PngImagePlugin", fromlist=["PngInfo"]).PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    parsed = read_parameters(buffer.getvalue())
    assert parsed["prompt"] == "masterpiece, a castle"
    assert parsed["negative_prompt"] == "lowres"
    assert (parsed["steps"], parsed["seed"], parsed["guidance_scale"]) == (20, 1234, 7.0)
    assert (parsed["width"], parsed["height"]) == (512, 768)
    assert parsed["scheduler"] == "DPM++ 2M" and parsed["Schedule type"] == "Karras"
    assert parsed["loras"] == [{"name": "detail", "sha256": "1a2b3c4d5e6f", "weight": 1.0}]


def test_same_parameters_same_bytes():
    image = Image.new("RGB", (16, 16), "green")
    assert encode_png(image, PARAMETERS) == encode_png(image.copy(), dict(PARAMETERS))


@pytest.mark.parametrize("data", [b"", b"not an image", None])
def test_unreadable_or_bare_pngs_are_typed_errors(data):
    if data is None:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4)).save(buffer, format="PNG")
        data = buffer.getvalue()
    with pytest.raises(InvalidImageError):
        read_parameters(data)
