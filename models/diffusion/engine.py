"""DiffusionEngine: text-to-image, img2img, instruction editing and inpainting on one set of loaded weights.

One engine holds one loaded pipeline. Each task runs the diffusers pipeline class made for it (SDXL or SD 1.x/2.x),
built over the same modules, so an edit never loads a second copy of a model. Each request gets its own pipeline
object and its own scheduler instance: schedulers and pipelines carry per-call state.

Reproducibility: one CPU ``torch.Generator`` per image, seeded with that image's seed, so an image is the same
whether drawn alone or in a batch, and the same seed and settings give the same PNG bytes on a CPU.

Every PNG records its parameters (``mgmflow.models.diffusion.metadata``): ``task``, ``prompt``, ``negative_prompt``,
``seed``, ``steps``, ``guidance_scale``, ``width``, ``height``, ``model``, ``model_hash`` (single files),
``scheduler`` (the diffusers class) with ``sampler`` / ``schedule_type`` (AUTOMATIC1111's names), ``loras``
(name, weight, sha256, A1111 hash) and, per task, ``strength``, ``image_guidance_scale``, ``image_sha256``, ``mask_sha256``.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from mgmflow.models.diffusion import loading, presets
from mgmflow.models.diffusion.defaults import FAMILY_DEFAULTS, ModelDefaults
from mgmflow.models.diffusion.loading import LoraSpec
from mgmflow.models.diffusion.metadata import a1111_sampler, encode_png
from mgmflow.models.diffusion.requests import (
    Img2ImgRequest,
    InpaintRequest,
    InstructEditRequest,
    Request,
    TextToImageRequest,
    check_size,
    random_seeds,
)
from mgmflow.models.errors import InvalidImageError, InvalidInputError, ResourceExhaustedError
from mgmflow.models.images import load_image

logger = logging.getLogger(__name__)

OnStep = Callable[[int, int, Image.Image | None], None]
Check = Callable[[], None]

_PIPELINES = {
    ("sdxl", "text_to_image"): StableDiffusionXLPipeline,
    ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline,
    ("sdxl", "instruct_edit"): StableDiffusionXLInstructPix2PixPipeline,
    ("sdxl", "inpaint"): StableDiffusionXLInpaintPipeline,
    ("sd", "text_to_image"): StableDiffusionPipeline,
    ("sd", "img2img"): StableDiffusionImg2ImgPipeline,
    ("sd", "instruct_edit"): StableDiffusionInstructPix2PixPipeline,
    ("sd", "inpaint"): StableDiffusionInpaintPipeline,
}
# What a UNet can do, by its input channels: noisy latents only (4); plus the image's latents (8, InstructPix2Pix);
# plus mask and masked-image latents (9, inpainting checkpoints).
_TASKS_BY_CHANNELS = {4: ("text_to_image", "img2img", "inpaint"), 8: ("instruct_edit",), 9: ("inpaint",)}

# Linear maps from the 4 latent channels to RGB (fitted by the community for live previews; ComfyUI ships the
# same numbers): a preview costs one 4x3 matrix product at latent resolution instead of a VAE decode.
_PREVIEW_FACTORS = {
    "sdxl": (
        [[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068], [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]],
        [0.1084, -0.0175, -0.0011],
    ),
    "sd": (
        [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]],
        [0.0, 0.0, 0.0],
    ),
}


@dataclass(frozen=True)
class MemoryOptions:
    """Trade speed for memory: attention in slices, the VAE in tiles / one image at a time, and each module on
    the GPU only while it runs (``cpu_offload``, CUDA only; the small VAE stays there between requests)."""

    attention_slicing: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    cpu_offload: bool = False


@dataclass(frozen=True)
class GeneratedImage:
    """One result: PNG bytes carrying ``parameters`` (AUTOMATIC1111 ``parameters`` chunk + JSON chunk)."""

    png: bytes
    seed: int
    parameters: dict


class DiffusionEngine:
    """Draws and edits images with one loaded model. Build it with ``from_pretrained``."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        *,
        model: str,
        defaults: ModelDefaults,
        loras: list[dict],
        memory: MemoryOptions,
        device: torch.device,
        model_hash: str | None = None,
    ):
        self.model = model
        self.model_hash = model_hash
        self.family = loading.family_of(pipeline)
        self.defaults = defaults
        self.loras = loras
        self.memory = memory
        self.device = device
        self.tasks = _TASKS_BY_CHANNELS.get(pipeline.unet.config.in_channels, ())
        # Native size: what the UNet was trained on, as diffusers computes its default.
        self.native_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        self._pipeline = pipeline
        # One pipeline call at a time: requests share the modules and the fast tokenizers, whose truncation
        # settings are per-object state that a concurrent call can change mid-encoding.
        self._call_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = presets.DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        loras: tuple[LoraSpec, ...] | list[LoraSpec] = (),
        memory: MemoryOptions = MemoryOptions(),
    ) -> DiffusionEngine:
        """Load a preset, a diffusers folder, a single-file ``.safetensors`` checkpoint or a cached hub id.

        ``device`` defaults to CUDA when present; ``dtype`` to float16 on CUDA (``"bfloat16"`` on request) and
        float32 on the CPU. ``loras`` are attached at their weights and recorded in every PNG.
        """
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = _dtype(dtype, device)
        if memory.cpu_offload and device.type != "cuda":
            raise InvalidInputError("model CPU offload needs a CUDA device")
        path = presets.resolve(name_or_path)
        pipeline = loading.load_pipeline(path, dtype=dtype)
        if not isinstance(pipeline, tuple(_PIPELINES.values())):
            raise InvalidInputError(
                f"{loading.display_name(str(name_or_path))} is a {type(pipeline).__name__}; the diffusion engine runs "
                "Stable Diffusion 1.x/2.x and SDXL-architecture models"
            )
        lora_records = loading.attach_loras(pipeline, tuple(loras))
        if memory.attention_slicing:
            pipeline.enable_attention_slicing()
        if memory.vae_tiling:
            pipeline.vae.enable_tiling()
        if memory.vae_slicing:
            pipeline.vae.enable_slicing()
        with _out_of_memory_as_typed(f"loading {name_or_path}"):
            if memory.cpu_offload:
                # Hooks on the modules themselves, so every task's pipeline over them offloads too.
                pipeline.enable_model_cpu_offload(device=device)
            else:
                pipeline.to(device)
        preset = presets.PRESETS.get(str(name_or_path))
        defaults = preset.defaults if preset else FAMILY_DEFAULTS[loading.family_of(pipeline)]
        logger.info("loaded diffusion model %s on %s (%s, %d LoRA)", name_or_path, device, dtype, len(lora_records))
        return cls(
            pipeline,
            model=loading.display_name(str(name_or_path)),
            defaults=defaults,
            loras=lora_records,
            memory=memory,
            device=device,
            model_hash=loading.model_hash(path),
        )

    # ---- tasks ---------------------------------------------------------------------------------------------

    def text_to_image(
        self, request: TextToImageRequest, *, on_step: OnStep | None = None, check: Check | None = None
    ) -> list[GeneratedImage]:
        """One image per prompt, all in one pipeline call."""
        size = {"width": request.width or self.native_size, "height": request.height or self.native_size}
        return self._generate("text_to_image", request, size, size, on_step, check)

    def img2img(
        self, request: Img2ImgRequest, *, on_step: OnStep | None = None, check: Check | None = None
    ) -> list[GeneratedImage]:
        """Redraw the request's image towards each prompt."""
        image = _fit(load_image(request.image), request)
        strength = _or(request.strength, self.defaults.img2img_strength)
        _check_steps_at_strength(_or(request.steps, self.defaults.steps), strength)
        recorded = {"width": image.width, "height": image.height, "strength": strength, "image_sha256": _digest(image)}
        return self._generate("img2img", request, {"image": image, "strength": strength}, recorded, on_step, check)

    def instruct_edit(
        self, request: InstructEditRequest, *, on_step: OnStep | None = None, check: Check | None = None
    ) -> list[GeneratedImage]:
        """Edit the request's image following each prompt as an instruction (InstructPix2Pix models)."""
        image = _fit(load_image(request.image), request)
        image_guidance = _or(request.image_guidance_scale, self.defaults.image_guidance_scale)
        call = {"image": image, "image_guidance_scale": image_guidance}
        recorded = {
            "width": image.width,
            "height": image.height,
            "image_guidance_scale": image_guidance,
            "image_sha256": _digest(image),
        }
        return self._generate("instruct_edit", request, call, recorded, on_step, check)

    def inpaint(
        self, request: InpaintRequest, *, on_step: OnStep | None = None, check: Check | None = None
    ) -> list[GeneratedImage]:
        """Repaint the masked part (white) of the request's image following each prompt."""
        original = load_image(request.image)
        image = _fit(original, request)
        mask = _mask(request.mask, original.size, image.size)
        strength = _or(request.strength, self.defaults.inpaint_strength)
        _check_steps_at_strength(_or(request.steps, self.defaults.steps), strength)
        call = {"image": image, "mask_image": mask, "strength": strength, "width": image.width, "height": image.height}
        recorded = {
            "width": image.width,
            "height": image.height,
            "strength": strength,
            "image_sha256": _digest(image),
            "mask_sha256": _digest(mask),
        }
        return self._generate("inpaint", request, call, recorded, on_step, check)

    def run(
        self, request: Request, *, on_step: OnStep | None = None, check: Check | None = None
    ) -> list[GeneratedImage]:
        """Run any request by its type (what workers call)."""
        task = {
            TextToImageRequest: self.text_to_image,
            Img2ImgRequest: self.img2img,
            InstructEditRequest: self.instruct_edit,
            InpaintRequest: self.inpaint,
        }[type(request)]
        return task(request, on_step=on_step, check=check)

    # ---- one pipeline call ---------------------------------------------------------------------------------

    def _generate(
        self,
        task: str,
        request: Request,
        call: dict,
        recorded: dict,
        on_step: OnStep | None,
        check: Check | None,
    ) -> list[GeneratedImage]:
        """One pipeline call: ``call`` holds the task's own pipeline arguments, ``recorded`` what PNGs keep of them."""
        if task not in self.tasks:
            raise InvalidInputError(f"model {self.model!r} cannot do {task} (it does: {', '.join(self.tasks)})")
        seeds = request.seeds or random_seeds(len(request.prompts))
        steps = _or(request.steps, self.defaults.steps)
        guidance = _or(request.guidance_scale, self.defaults.guidance_scale)
        negative = _or(request.negative_prompt, self.defaults.negative_prompt)
        pipeline = self._request_pipeline(task, request.scheduler)
        hook = _StepHook(pipeline, on_step, check, self.family)
        if check is not None:
            check()  # a request cancelled while queued never starts
        count = len(request.prompts)
        with self._call_lock, _out_of_memory_as_typed(f"drawing {count} image(s) with {self.model}"):
            output = pipeline(
                prompt=list(request.prompts),
                # Empty means none: SDXL then uses zeros, as diffusers does when no negative prompt is given.
                negative_prompt=[negative] * count if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds],
                output_type="np",
                **call,
                **hook.pipeline_kwargs(),
            )
        pixels = output.images
        if not np.isfinite(pixels).all():
            raise RuntimeError(f"{self.model} produced NaN pixels (float16 overflow?); try bfloat16 or float32")
        sampler, schedule_type = a1111_sampler(pipeline.scheduler)
        shared = {
            "task": task,
            "negative_prompt": negative,
            "steps": steps,
            "guidance_scale": guidance,
            "model": self.model,
            "model_hash": self.model_hash,
            "scheduler": type(pipeline.scheduler).__name__,
            "sampler": sampler,
            "schedule_type": schedule_type,
            "loras": [dict(lora) for lora in self.loras],
            **recorded,
        }
        results = []
        for prompt, seed, image in zip(request.prompts, seeds, pixels):
            parameters = {"prompt": prompt, "seed": seed, **shared}
            rgb = Image.fromarray((image * 255).round().astype(np.uint8))
            results.append(GeneratedImage(encode_png(rgb, parameters), seed, parameters))
        return results

    def _request_pipeline(self, task: str, scheduler_name: str | None) -> DiffusionPipeline:
        """A new pipeline object of the task's class over the loaded modules, with a fresh scheduler.

        Built directly rather than with diffusers' ``from_pipe``, which casts every module to its ``torch_dtype``
        argument (float32 by default) in place: the shared modules keep the dtype (and device) they were loaded
        with. The model's own settings (e.g. ``force_zeros_for_empty_prompt``) carry over through its config.
        """
        pipeline_class = _PIPELINES[(self.family, task)]
        base = self._pipeline
        modules, options = pipeline_class._get_signature_keys(pipeline_class)
        components = {name: module for name, module in base.components.items() if name in modules}
        config = {name: base.config[name] for name in options if name in base.config}
        pipeline = pipeline_class(**(components | {"scheduler": self._scheduler(scheduler_name)}), **config)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def _scheduler(self, name: str | None):
        base = self._pipeline.scheduler
        if name is None or name == type(base).__name__:
            return type(base).from_config(base.config)
        compatible = {scheduler.__name__: scheduler for scheduler in base.compatibles}
        if name not in compatible:
            raise InvalidInputError(
                f"scheduler {name!r} does not fit {self.model}; choose one of: {', '.join(sorted(compatible))}"
            )
        return compatible[name].from_config(base.config)


class _StepHook:
    """Progress and cooperative cancel between denoising steps.

    ``check`` raises ``Cancelled`` / ``DeadlineExceeded`` inside the pipeline's step callback; the exception leaves
    the denoising loop at once (no VAE decode of a half-denoised image), and it works alike for the pipelines
    that support ``callback_on_step_end`` and for SDXL InstructPix2Pix, which has only the older ``callback``.
    """

    def __init__(self, pipeline: DiffusionPipeline, on_step: OnStep | None, check: Check | None, family: str):
        self.pipeline = pipeline
        self.on_step = on_step
        self.check = check
        self.factors = [torch.tensor(values) for values in _PREVIEW_FACTORS[family]]
        self.done = 0

    def pipeline_kwargs(self) -> dict:
        if self.on_step is None and self.check is None:
            return {}
        if "callback_on_step_end" in inspect.signature(self.pipeline.__call__).parameters:
            return {"callback_on_step_end": self._on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}
        return {"callback": self._legacy_callback, "callback_steps": 1}

    def _on_step_end(self, pipeline, index: int, timestep, tensors: dict) -> dict:
        self._after_step(tensors["latents"])
        return {}

    def _legacy_callback(self, index: int, timestep, latents: torch.Tensor) -> None:
        self._after_step(latents)

    def _after_step(self, latents: torch.Tensor) -> None:
        self.done += 1
        if self.on_step is not None:
            total = getattr(self.pipeline, "_num_timesteps", None) or len(self.pipeline.scheduler.timesteps)
            self.on_step(self.done, total, self._preview(latents[0]))
        if self.check is not None:
            self.check()

    def _preview(self, latents: torch.Tensor) -> Image.Image:
        """The first image of the batch at latent resolution (1/8 of the output side on real models)."""
        weights, bias = self.factors
        rgb = torch.einsum("chw,cr->hwr", latents.float().cpu(), weights) + bias  # (h, w, 3) in about [-1, 1]
        return Image.fromarray(((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy())


@contextmanager
def _out_of_memory_as_typed(what: str):
    """CUDA out-of-memory becomes ``ResourceExhaustedError``: retryable, the same request may fit later."""
    try:
        yield
    except torch.OutOfMemoryError as error:  # torch.cuda.OutOfMemoryError is the same class
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ResourceExhaustedError(
            f"out of GPU memory while {what}; retry later, with fewer images or a smaller size, "
            "or with memory options (cpu_offload, vae_tiling)"
        ) from error


def _fit(image: Image.Image, request: Img2ImgRequest | InstructEditRequest | InpaintRequest) -> Image.Image:
    """The input image at the request's size: resized only to an explicitly requested size, else checked."""
    if request.width is not None:
        return image if image.size == (request.width, request.height) else image.resize(
            (request.width, request.height), Image.Resampling.LANCZOS
        )
    try:
        check_size(*image.size)
    except InvalidInputError as error:
        raise InvalidImageError(
            f"the input image is {image.width}x{image.height}: {error}; pass width and height to resize it"
        ) from error
    return image


def _mask(source, original: tuple[int, int], size: tuple[int, int]) -> Image.Image:
    """The mask in grey, checked against the image's original size, then resized with it."""
    mask = load_image(source).convert("L")
    if mask.size != original:
        raise InvalidImageError(
            f"the mask is {mask.width}x{mask.height} but the image is {original[0]}x{original[1]}; they must match"
        )
    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    if mask.getextrema()[1] == 0:
        raise InvalidImageError("the mask is all black: nothing to repaint (white marks the area to repaint)")
    return mask


def _check_steps_at_strength(steps: int, strength: float) -> None:
    if int(steps * strength) < 1:
        raise InvalidInputError(
            f"strength {strength:g} with {steps} steps leaves no denoising step; raise strength or steps"
        )


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in names:
        raise InvalidInputError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def _or(value, default):
    return default if value is None else value


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()
