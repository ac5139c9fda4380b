"""DiffusionEngine on the tiny presets: real diffusers pipelines, random weights, 64x64 images in a few steps."""

import io
import json

import numpy as np
import pytest
import torch
from diffusion_support import pixels
from PIL import Image

from mgmflow.models.diffusion import (
    NEGATIVE_PROMPT,
    DiffusionEngine,
    Img2ImgRequest,
    InpaintRequest,
    InstructEditRequest,
    LoraSpec,
    MemoryOptions,
    TextToImageRequest,
    read_parameters,
)
from mgmflow.models.diffusion.loading import lora_hash
from mgmflow.models.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidImageError,
    InvalidInputError,
    ModelNotFoundError,
    ResourceExhaustedError,
)

pytestmark = pytest.mark.timeout(120)


def _count_unet_calls(engine):
    calls = []
    handle = engine._pipeline.unet.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def test_same_seed_gives_the_same_png_bytes(engine):
    request = TextToImageRequest(prompts=["a red house at sunset"], seeds=[7], steps=2)
    [first] = engine.text_to_image(request)
    [again] = engine.text_to_image(request)
    [other] = engine.text_to_image(TextToImageRequest(prompts=["a red house at sunset"], seeds=[8], steps=2))
    assert first.png == again.png
    assert first.png != other.png
    image = pixels(first.png)
    assert image.shape == (64, 64, 3)
    assert image.std() > 10, "tiny images should show structure, not flat grey"


def test_a_batch_draws_each_image_as_it_would_alone(engine):
    prompts, seeds = ["a cat", "a dog in the snow", "a blue sky"], [11, 12, 13]
    batch = engine.text_to_image(TextToImageRequest(prompts=prompts, seeds=seeds, steps=2))
    assert [image.seed for image in batch] == seeds
    for prompt, seed, image in zip(prompts, seeds, batch):
        [alone] = engine.text_to_image(TextToImageRequest(prompts=[prompt], seeds=[seed], steps=2))
        assert np.abs(pixels(image.png) - pixels(alone.png)).max() <= 2
        assert image.parameters == alone.parameters


def test_every_png_carries_its_parameters_and_nothing_machine_specific(engine, mgmflow_home):
    [image] = engine.text_to_image(TextToImageRequest(prompts=["a cat, in a hat"], seeds=[5], steps=3))
    assert read_parameters(image.png) == image.parameters
    assert image.parameters == {
        "task": "text_to_image", "prompt": "a cat, in a hat", "seed": 5, "negative_prompt": NEGATIVE_PROMPT,
        "steps": 3, "guidance_scale": 5.0, "width": 64, "height": 64, "model": "tiny", "model_hash": None,
        "scheduler": "EulerDiscreteScheduler", "sampler": "Euler", "schedule_type": None, "loras": [],
    }
    with Image.open(io.BytesIO(image.png)) as png:
        text = json.dumps(png.text)
    assert str(mgmflow_home) not in text and "tmp" not in text
    assert "Steps: 3, Sampler: Euler, CFG scale: 5.0, Seed: 5, Size: 64x64, Model: tiny" in text


def test_progress_reports_every_step_with_a_preview(engine):
    seen = []
    engine.text_to_image(TextToImageRequest(prompts=["a cat"], seeds=[1], steps=3),
                         on_step=lambda step, total, preview: seen.append((step, total, preview)))
    assert [(step, total) for step, total, _ in seen] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(preview, Image.Image) and preview.size == (8, 8) for _, _, preview in seen)


@pytest.mark.parametrize(("preset", "error"), [("tiny", Cancelled), ("tiny-sdxl-ip2p", DeadlineExceeded)])
def test_check_stops_within_one_step(engines, photo, preset, error):
    engine = engines(preset)
    request = (TextToImageRequest(prompts=["a cat"], seeds=[1], steps=20) if preset == "tiny" else
               InstructEditRequest(prompts=["make it snowy"], seeds=[1], steps=20, image=photo))
    steps_done = []

    def check():
        if len(steps_done) >= 2:
            raise error("stop")

    calls, handle = _count_unet_calls(engine)
    try:
        with pytest.raises(error):
            engine.run(request, on_step=lambda step, total, preview: steps_done.append(step), check=check)
    finally:
        handle.remove()
    assert steps_done == [1, 2]
    assert len(calls) == 2  # one UNet call per step (guidance runs as one batch): stopped right after step 2


def test_a_request_cancelled_before_it_starts_runs_no_step(engine):
    calls, handle = _count_unet_calls(engine)

    def check():
        raise Cancelled("cancelled while queued")

    try:
        with pytest.raises(Cancelled):
            engine.text_to_image(TextToImageRequest(prompts=["a cat"], seeds=[1]), check=check)
    finally:
        handle.remove()
    assert calls == []


def test_cuda_out_of_memory_is_a_retryable_typed_error(engine, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine._pipeline.unet, "forward", out_of_memory)
    with pytest.raises(ResourceExhaustedError, match="out of GPU memory") as caught:
        engine.text_to_image(TextToImageRequest(prompts=["a cat"], seeds=[1]))
    assert caught.value.retryable


def test_edits_share_the_loaded_weights_and_get_their_own_scheduler(engine, photo, square_mask):
    calls, handle = _count_unet_calls(engine)
    try:
        engine.img2img(Img2ImgRequest(prompts=["a cat"], seeds=[1], image=photo, steps=2))
        after_img2img = len(calls)
        engine.inpaint(InpaintRequest(prompts=["a cat"], seeds=[1], image=photo, mask=square_mask, steps=2))
    finally:
        handle.remove()
    assert after_img2img > 0 and len(calls) > after_img2img  # the loaded UNet itself ran both edits
    first, second = (engine._request_pipeline("inpaint", None) for _ in range(2))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert getattr(first, name) is getattr(second, name) is getattr(engine._pipeline, name)
    assert first.scheduler is not second.scheduler
    assert first.scheduler is not engine._pipeline.scheduler


def test_img2img_runs_strength_times_steps_and_records_it(engine, photo):
    totals = []
    [image] = engine.img2img(Img2ImgRequest(prompts=["a cat"], seeds=[3], image=photo, steps=8, strength=0.5),
                             on_step=lambda step, total, preview: totals.append(total))
    assert totals == [4] * 4
    assert image.parameters["strength"] == 0.5 and image.parameters["task"] == "img2img"
    assert len(image.parameters["image_sha256"]) == 64
    assert "Denoising strength: 0.5" in Image.open(io.BytesIO(image.png)).text["parameters"]
    with pytest.raises(InvalidInputError, match="no denoising step"):
        engine.img2img(Img2ImgRequest(prompts=["a cat"], image=photo, steps=2, strength=0.3))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "CMYK", "I;16", "1"])
def test_edit_inputs_of_any_mode_are_converted(engine, photo, mode):
    image = photo.convert(mode) if mode != "I;16" else Image.fromarray(
        np.asarray(photo.convert("L"), dtype=np.uint16) * 257)
    assert image.mode == mode
    [result] = engine.img2img(Img2ImgRequest(prompts=["a cat"], seeds=[2], image=image, steps=2))
    assert pixels(result.png).shape == (64, 64, 3)


def test_inpainting_with_a_text_to_image_model_and_an_inpainting_model(engines, photo, square_mask):
    for preset in ("tiny", "tiny-inpaint"):
        [image] = engines(preset).inpaint(
            InpaintRequest(prompts=["a red door"], seeds=[4], image=photo, mask=square_mask.convert("RGBA"), steps=2))
        assert image.parameters["task"] == "inpaint" and len(image.parameters["mask_sha256"]) == 64
        assert pixels(image.png).shape == (64, 64, 3)


def test_bad_masks_are_typed_errors(engine, photo, square_mask):
    with pytest.raises(InvalidImageError, match="mask is 32x32 but the image is 64x64"):
        engine.inpaint(InpaintRequest(prompts=["x"], image=photo, mask=square_mask.resize((32, 32))))
    with pytest.raises(InvalidImageError, match="all black"):
        engine.inpaint(InpaintRequest(prompts=["x"], image=photo, mask=Image.new("L", (64, 64), 0)))
    with pytest.raises(InvalidImageError, match="not a readable image"):
        engine.inpaint(InpaintRequest(prompts=["x"], image=photo, mask=b"garbage"))


def test_input_sizes_must_be_drawable_unless_a_size_is_given(engine, photo):
    odd = photo.resize((100, 70))
    with pytest.raises(InvalidImageError, match="input image is 100x70.*pass width and height"):
        engine.img2img(Img2ImgRequest(prompts=["x"], image=odd))
    [image] = engine.img2img(Img2ImgRequest(prompts=["x"], seeds=[1], image=odd, width=96, height=72, steps=2))
    assert pixels(image.png).shape == (72, 96, 3)
    assert (image.parameters["width"], image.parameters["height"]) == (96, 72)


@pytest.mark.parametrize("preset", ["tiny-ip2p", "tiny-sdxl-ip2p"])
def test_instruction_editing(engines, photo, preset):
    engine = engines(preset)
    [image] = engine.instruct_edit(InstructEditRequest(prompts=["make it snowy"], seeds=[9], image=photo, steps=2,
                                                       image_guidance_scale=1.2))
    assert image.parameters["image_guidance_scale"] == 1.2 and image.parameters["model"] == preset
    assert "Image CFG scale: 1.2" in Image.open(io.BytesIO(image.png)).text["parameters"]
    with pytest.raises(InvalidInputError, match="cannot do text_to_image"):
        engine.text_to_image(TextToImageRequest(prompts=["a cat"]))


def test_a_text_to_image_model_cannot_edit_by_instruction(engine, photo):
    with pytest.raises(InvalidInputError, match="cannot do instruct_edit.*text_to_image, img2img, inpaint"):
        engine.instruct_edit(InstructEditRequest(prompts=["make it snowy"], image=photo))


def test_sd1_family_defaults(engines):
    [image] = engines("tiny-sd").text_to_image(TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2))
    assert image.parameters["negative_prompt"] == "" and image.parameters["guidance_scale"] == 7.5
    assert "Negative prompt" not in Image.open(io.BytesIO(image.png)).text["parameters"]


def test_a_compatible_scheduler_can_be_chosen(engine):
    request = TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2, scheduler="EulerAncestralDiscreteScheduler")
    [image] = engine.text_to_image(request)
    [default] = engine.text_to_image(TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2))
    assert image.parameters["scheduler"] == "EulerAncestralDiscreteScheduler" and image.png != default.png
    with pytest.raises(InvalidInputError, match="does not fit tiny; choose one of: .*DDIMScheduler"):
        engine.text_to_image(TextToImageRequest(prompts=["a cat"], scheduler="FlowMatchEulerDiscreteScheduler"))


def test_lora_changes_the_image_at_its_weight_and_is_recorded(engine, lora_file):
    request = TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2)
    [base] = engine.text_to_image(request)
    [full] = DiffusionEngine.from_pretrained("tiny", loras=[LoraSpec(lora_file, 1.0)]).text_to_image(request)
    [off] = DiffusionEngine.from_pretrained("tiny", loras=[LoraSpec(lora_file, 0.0)]).text_to_image(request)
    assert np.abs(pixels(full.png) - pixels(base.png)).max() > 5
    assert np.abs(pixels(off.png) - pixels(base.png)).max() <= 1
    [lora] = full.parameters["loras"]
    assert lora["name"] == "pixel_art" and lora["weight"] == 1.0 and len(lora["sha256"]) == 64
    assert lora["hash"] == lora_hash(lora_file) != lora["sha256"]
    assert f'Lora hashes: "pixel_art: {lora["hash"][:12]}"' in Image.open(io.BytesIO(full.png)).text["parameters"]


def test_bad_loras_are_typed_errors(tmp_path, photo):
    with pytest.raises(ModelNotFoundError, match="LoRA file not found"):
        DiffusionEngine.from_pretrained("tiny", loras=[LoraSpec(tmp_path / "missing.safetensors")])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidInputError, match="broken.safetensors"):
        DiffusionEngine.from_pretrained("tiny", loras=[LoraSpec(broken)])
    with pytest.raises(InvalidInputError, match="LoRA weight"):
        DiffusionEngine.from_pretrained("tiny", loras=[LoraSpec(broken, float("nan"))])


def test_memory_options_keep_the_image(engine):
    request = TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2)
    [plain] = engine.text_to_image(request)
    saving = DiffusionEngine.from_pretrained(
        "tiny", memory=MemoryOptions(attention_slicing=True, vae_tiling=True, vae_slicing=True))
    [sliced] = saving.text_to_image(request)
    assert np.abs(pixels(plain.png) - pixels(sliced.png)).max() <= 2
    with pytest.raises(InvalidInputError, match="needs a CUDA device"):
        DiffusionEngine.from_pretrained("tiny", device="cpu", memory=MemoryOptions(cpu_offload=True))
    with pytest.raises(InvalidInputError, match="dtype must be one of"):
        DiffusionEngine.from_pretrained("tiny", dtype="int8")


def test_a_playground_style_checkpoint_runs_with_its_own_scheduler(tmp_path):
    """Playground v2.5's layout: SDXL architecture, an EDM DPM-Solver scheduler, VAE latents mean/std."""
    from diffusers import DiffusionPipeline, EDMDPMSolverMultistepScheduler

    from mgmflow.models.diffusion import presets

    pipeline = DiffusionPipeline.from_pretrained(presets.resolve("tiny"))
    pipeline.scheduler = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5,
                                                        final_sigmas_type="zero")
    pipeline.vae.register_to_config(latents_mean=[0.1, -0.1, 0.0, 0.05], latents_std=[1.0, 0.9, 1.1, 1.0],
                                    scaling_factor=0.5)
    pipeline.save_pretrained(tmp_path / "playground-like")
    engine = DiffusionEngine.from_pretrained(str(tmp_path / "playground-like"))
    request = TextToImageRequest(prompts=["a cat"], seeds=[1], steps=3)
    [image] = engine.text_to_image(request)
    [again] = engine.text_to_image(request)
    assert image.parameters["scheduler"] == "EDMDPMSolverMultistepScheduler" and image.png == again.png
    assert image.parameters["model"] == "playground-like" and image.parameters["guidance_scale"] == 5.0


def test_other_pipeline_kinds_are_refused_clearly(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    with pytest.raises(InvalidInputError, match="ddpm is a DDPMPipeline; the diffusion engine runs Stable Diffusion"):
        DiffusionEngine.from_pretrained(str(tmp_path / "ddpm"))


def test_concurrent_requests_on_one_engine_do_not_interfere(engine, photo):
    """Each request has its own pipeline object and scheduler, so threads may share an engine."""
    from concurrent.futures import ThreadPoolExecutor

    requests = [TextToImageRequest(prompts=["a cat"], seeds=[21], steps=2, guidance_scale=3.0),
                Img2ImgRequest(prompts=["a dog"], seeds=[22], steps=3, image=photo),
                TextToImageRequest(prompts=["a sky"], seeds=[23], steps=3, scheduler="DDIMScheduler")]
    alone = [engine.run(request)[0].png for request in requests]
    with ThreadPoolExecutor(max_workers=3) as pool:
        together = [result[0].png for result in pool.map(engine.run, requests)]
    assert together == alone


def _module_dtypes(pipeline) -> dict:
    return {name: module.dtype for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_engines_keep_their_dtype_through_every_task(dtype, photo, square_mask):
    """Edits run derived pipelines over the loaded modules: none may cast them (diffusers' ``from_pipe`` casts to
    float32 by default, which doubles VRAM and changes every later text-to-image)."""
    engine = DiffusionEngine.from_pretrained("tiny", dtype=dtype)
    loaded = _module_dtypes(engine._pipeline)
    assert set(loaded) >= {"unet", "vae", "text_encoder", "text_encoder_2"} and set(loaded.values()) == {dtype}
    drawing = TextToImageRequest(prompts=["a red house"], seeds=[3], steps=2)
    [before] = engine.text_to_image(drawing)
    edits = {"img2img": Img2ImgRequest(prompts=["a cat"], seeds=[1], image=photo, steps=2),
             "inpaint": InpaintRequest(prompts=["a cat"], seeds=[1], image=photo, mask=square_mask, steps=2)}
    for task, request in edits.items():
        engine.run(request)
        assert _module_dtypes(engine._pipeline) == loaded, f"after {task}"
        assert _module_dtypes(engine._request_pipeline(task, None)) == loaded, f"{task}'s pipeline"
    [after] = engine.text_to_image(drawing)
    assert after.png == before.png

    instructing = DiffusionEngine.from_pretrained("tiny-sdxl-ip2p", dtype=dtype)
    loaded = _module_dtypes(instructing._pipeline)
    assert set(loaded.values()) == {dtype}
    instructing.instruct_edit(InstructEditRequest(prompts=["make it snowy"], seeds=[9], image=photo, steps=2))
    assert _module_dtypes(instructing._pipeline) == loaded
