"""Defaults per model family and the limits every request is checked against.

Light on purpose (no torch, no diffusers): ``mgmflow.models.mgm`` and the workers import ``NEGATIVE_PROMPT`` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Mini-Gemini's fixed negative prompt for the SDXL images of VLM-written prompts: the `common_neg_prompt` that the
# official CLI and worker pass with every prompt (mgm-official §7), word for word, repetition included. It is longer
# than CLIP's 77-token window, so the pipelines truncate it, as they did in MGM's demo.
NEGATIVE_PROMPT = (
    "out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, duplicate, "
    "morbid, mutilated, out of frame, extra fingers, mutated hands, poorly drawn hands, poorly drawn face, mutation, "
    "deformed, blurry, dehydrated, bad anatomy, bad proportions, extra limbs, cloned face, disfigured, "
    "gross proportions, malformed limbs, missing arms, missing legs, extra arms, extra legs, fused fingers, "
    "too many fingers, long neck, username, watermark, signature"
)


@dataclass(frozen=True)
class ModelDefaults:
    """What a request gets for each field it leaves unset. Image size defaults to the model's native size."""

    steps: int
    guidance_scale: float
    negative_prompt: str = ""
    image_guidance_scale: float = 1.5  # instruct-pix2pix only: how closely to follow the input image
    img2img_strength: float = 0.75
    inpaint_strength: float = 0.99  # below 1: SDXL inpainting checkpoints degrade at exactly 1.0


# SDXL: what Mini-Gemini's demo ran (diffusers' defaults: 50 steps, guidance 5.0, 1024², its negative prompt).
SDXL = ModelDefaults(steps=50, guidance_scale=5.0, negative_prompt=NEGATIVE_PROMPT)
# Stable Diffusion 1.x / 2.x: the model cards' values.
SD = ModelDefaults(steps=50, guidance_scale=7.5)
FAMILY_DEFAULTS = {"sdxl": SDXL, "sd": SD}

# Limits. Sizes: multiples of 8 (the VAE's scale factor on real models) within [MIN_SIDE, MAX_SIDE] and at most
# MAX_PIXELS (2048², four times SDXL's native size; more does not fit a 80 GB GPU at SDXL's attention cost).
SIZE_MULTIPLE = 8
MIN_SIDE = 64
MAX_SIDE = 4096
MAX_PIXELS = 2048 * 2048
MAX_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_BATCH = 16  # images in one pipeline call
MAX_PROMPT_CHARS = 10_000
MAX_SEED = 2**63 - 1
