"""Request validation: every bad field is a typed error naming the field; batching keys and combining."""

import pytest
from PIL import Image

from mgmflow.models.diffusion.requests import (
    Img2ImgRequest,
    InpaintRequest,
    InstructEditRequest,
    TextToImageRequest,
    batch_key,
    combine,
)
from mgmflow.models.errors import InvalidInputError


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"prompts": []}, "at least one prompt"),
        ({"prompts": ["  "]}, "prompt is empty"),
        ({"prompts": [""]}, "prompt is empty"),
        ({"prompts": [3]}, "prompt must be a string"),
        ({"prompts": ["x"] * 17}, "the limit is 16"),
        ({"prompts": ["x" * 10_001]}, "10,001 characters"),
        ({"prompts": ["a", "b"], "seeds": [1]}, "1 seeds for 2 prompts"),
        ({"seeds": [-1]}, "seed must be an integer"),
        ({"seeds": [2**63]}, "seed must be an integer"),
        ({"seeds": [1.5]}, "seed must be an integer"),
        ({"steps": 0}, "steps must be an integer in [1, 200]"),
        ({"steps": -3}, "steps must be"),
        ({"steps": 10_000}, "steps must be"),
        ({"steps": True}, "steps must be"),
        ({"guidance_scale": -1}, "guidance_scale must be a number in [0, 30]"),
        ({"guidance_scale": 31}, "guidance_scale"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"width": 512}, "give both width and height"),
        ({"width": 100, "height": 64}, "width must be a multiple of 8"),
        ({"width": 64, "height": 36}, "height must be a multiple of 8"),
        ({"width": 32, "height": 64}, "between 64 and 4096"),
        ({"width": 8192, "height": 64}, "between 64 and 4096"),
        ({"width": 4096, "height": 4096}, "the limit is 4,194,304"),
        ({"negative_prompt": 5}, "negative prompt must be a string"),
        ({"prompts": ["a\x00b"]}, "NUL"),
        ({"scheduler": "not a class"}, "scheduler must be"),
    ],
)
def test_bad_fields_are_typed_errors(fields, message):
    with pytest.raises(InvalidInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TextToImageRequest(**({"prompts": ["a cat"]} | fields))


@pytest.mark.parametrize("strength", [0, -0.1, 1.01, float("inf"), "0.5"])
def test_strength_out_of_range(strength):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidInputError, match="strength must be a number in"):
        Img2ImgRequest(prompts="x", image=image, strength=strength)
    with pytest.raises(InvalidInputError, match="strength must be a number in"):
        InpaintRequest(prompts="x", image=image, mask=image, strength=strength)


def test_image_guidance_out_of_range():
    with pytest.raises(InvalidInputError, match="image_guidance_scale"):
        InstructEditRequest(prompts="x", image=b"", image_guidance_scale=-0.5)


def test_a_single_prompt_string_is_one_prompt():
    request = TextToImageRequest(prompts="a cat, in a hat", seeds=[4])
    assert request.prompts == ("a cat, in a hat",)
    assert request.seeds == (4,)


def test_batch_key_ignores_prompts_and_seeds_only():
    image = Image.new("RGB", (64, 64), "red")
    first = Img2ImgRequest(prompts=["a"], seeds=[1], image=image, strength=0.5)
    second = Img2ImgRequest(prompts=["b", "c"], seeds=[2, 3], image=image.copy(), strength=0.5)
    assert batch_key(first) == batch_key(second)
    assert batch_key(first) != batch_key(Img2ImgRequest(prompts=["a"], image=image, strength=0.6))
    assert batch_key(first) != batch_key(Img2ImgRequest(prompts=["a"], image=Image.new("RGB", (64, 64)), strength=0.5))
    assert batch_key(TextToImageRequest(prompts="a")) != batch_key(TextToImageRequest(prompts="a", steps=3))


def test_combine_keeps_order_and_gives_every_prompt_a_seed():
    combined = combine([
        TextToImageRequest(prompts=["a", "b"], seeds=[1, 2]),
        TextToImageRequest(prompts=["c"]),
        TextToImageRequest(prompts=["d"], seeds=[9]),
    ])
    assert combined.prompts == ("a", "b", "c", "d")
    assert combined.seeds[:2] == (1, 2) and combined.seeds[3] == 9
    assert isinstance(combined.seeds[2], int)
    with pytest.raises(InvalidInputError, match="same batch_key"):
        combine([TextToImageRequest(prompts="a"), TextToImageRequest(prompts="b", steps=2)])
