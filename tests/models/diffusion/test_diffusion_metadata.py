"""PNG parameters: AUTOMATIC1111's ``parameters`` chunk and our JSON chunk, written and read back."""

import io

import pytest
from PIL import Image

from mgmflow.models.diffusion.loading import lora_hash, sha256_of
from mgmflow.models.diffusion.metadata import a1111_sampler, encode_png, infotext, parse_infotext, read_parameters
from mgmflow.models.errors import InvalidImageError

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
    "sampler": "Euler",
    "schedule_type": None,
    "model_hash": "31e35c80fc",
    "strength": 0.75,
    "loras": [{"name": "pixel_art", "weight": 0.8, "sha256": "ab" * 32, "hash": "ef" * 32}],
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
                "model_hash", "scheduler", "sampler", "strength"):
        assert parsed[key] == PARAMETERS[key], key
    assert parsed["loras"] == [{"name": "pixel_art", "hash": "ef" * 6, "weight": 0.8}]


def test_infotext_layout_follows_a1111():
    text = infotext(PARAMETERS | {"prompt": "a cat", "negative_prompt": "ugly", "loras": []})
    assert text.split("\n") == [
        "a cat",
        "Negative prompt: ugly",
        "Steps: 30, Sampler: Euler, CFG scale: 5.5, Seed: 1099511627783, Size: 1024x768, Model hash: 31e35c80fc, "
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
    assert parsed["sampler"] == "DPM++ 2M" and parsed["schedule_type"] == "Karras"
    assert parsed["scheduler"] == "DPMSolverMultistepScheduler" and parsed["model_hash"] == "6ce0161689"
    assert parsed["loras"] == [{"name": "detail", "hash": "1a2b3c4d5e6f", "weight": 1.0}]


@pytest.mark.parametrize(("scheduler", "config", "sampler", "schedule_type"), [
    ("EulerDiscreteScheduler", {}, "Euler", None),
    ("EulerAncestralDiscreteScheduler", {}, "Euler a", None),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "Euler", "Karras"),
    ("DPMSolverMultistepScheduler", {}, "DPM++ 2M", None),
    ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE", None),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3,
                                     "use_exponential_sigmas": True}, "DPM++ 3M SDE", "Exponential"),
    ("DPMSolverSinglestepScheduler", {}, "DPM++ SDE", None),
    ("KDPM2AncestralDiscreteScheduler", {}, "DPM2 a", None),
    ("DDIMScheduler", {}, "DDIM", None),
    ("PNDMScheduler", {}, "PLMS", None),
    ("UniPCMultistepScheduler", {}, "UniPC", None),
    ("HeunDiscreteScheduler", {}, "Heun", None),
])
def test_samplers_carry_automatic1111_names(scheduler, config, sampler, schedule_type):
    import diffusers

    assert a1111_sampler(getattr(diffusers, scheduler)(**config)) == (sampler, schedule_type)


def test_independent_a1111_parser_reads_sampler_schedule_model_hash_and_loras(tmp_path):
    """sd-parsers (what civitai-style tools use) reads what AUTOMATIC1111 writes, from our PNG alone."""
    from sd_parsers import ParserManager

    parameters = PARAMETERS | {"sampler": "DPM++ 2M", "schedule_type": "Karras",
                               "scheduler": "DPMSolverMultistepScheduler", "prompt": "a cat", "loras": []}
    path = tmp_path / "page.png"
    path.write_bytes(encode_png(Image.new("RGB", (8, 8)), parameters))
    info = ParserManager().parse(str(path))
    [sampler] = info.samplers
    assert info.generator.name == "AUTOMATIC1111"
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert (sampler.model.name, sampler.model.hash) == ("sdxl-base", "31e35c80fc")
    assert sampler.parameters["seed"] == str(PARAMETERS["seed"]) and sampler.parameters["steps"] == "30"
    assert [prompt.value for prompt in sampler.prompts] == ["a cat"]


def test_lora_hash_is_automatic1111s_hash_of_the_tensor_data(tmp_path):
    """A1111's LoRA hash skips the safetensors header: new metadata in the file keeps it, unlike a whole-file sha."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = {"lora_unet_down.lora_down.weight": torch.arange(12.0).reshape(3, 4)}
    save_file(tensors, str(first), metadata={"ss_output_name": "a"})
    save_file(tensors, str(second), metadata={"ss_output_name": "a renamed copy"})
    data = first.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert lora_hash(first) == hashlib.sha256(data[8 + header:]).hexdigest()
    assert lora_hash(first) == lora_hash(second) and sha256_of(first) != sha256_of(second)


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
