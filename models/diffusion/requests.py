"""Typed requests of the diffusion engine, checked when built.

One request is one batch: ``prompts[i]`` gets ``seeds[i]``, every other setting is shared, and the engine draws
all of them in one pipeline call. Fields left ``None`` take the model's defaults (``mgmflow.models.diffusion.defaults``).
What these checks cannot know without the model (its native size, its schedulers) the engine checks.

Workers that collect several requests can batch those with the same ``batch_key`` through ``combine``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass
from collections.abc import Sequence

from PIL import Image

from mgmflow.models.diffusion.defaults import (
    MAX_BATCH,
    MAX_GUIDANCE,
    MAX_PIXELS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIZE_MULTIPLE,
)
from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import ImageSource


@dataclass(frozen=True, kw_only=True)
class _Request:
    """Fields shared by every task.

    - ``prompts``: one image per prompt (a single string is one prompt); each must have visible text.
    - ``seeds``: one per prompt, in ``[0, 2**63)``; ``None`` draws random seeds (recorded in each PNG).
    - ``negative_prompt``: shared by the batch; ``None`` is the model's default (Mini-Gemini's for SDXL),
      ``""`` is none.
    - ``steps``: denoising steps in ``[1, 200]``; img2img and inpainting run ``int(steps * strength)`` of them.
    - ``guidance_scale``: classifier-free guidance in ``[0, 30]``.
    - ``width``/``height``: output size, multiples of 8 in ``[64, 4096]``, at most 2048² pixels. Text-to-image
      defaults to the model's native size; edits default to the input image's size, and a given size resizes it.
    - ``scheduler``: a diffusers scheduler class compatible with the model (e.g. ``"EulerAncestralDiscreteScheduler"``);
      ``None`` keeps the model's own (Playground v2.5's EDM scheduler, SDXL's Euler, ...).
    """

    prompts: Sequence[str]
    seeds: Sequence[int] | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        prompts = (self.prompts,) if isinstance(self.prompts, str) else tuple(self.prompts)
        object.__setattr__(self, "prompts", prompts)
        if not prompts:
            raise InvalidInputError("at least one prompt is needed")
        if len(prompts) > MAX_BATCH:
            raise InvalidInputError(f"{len(prompts)} prompts in one request; the limit is {MAX_BATCH}")
        for prompt in prompts:
            _check_text(prompt, "prompt", required=True)
        if self.seeds is not None:
            seeds = tuple(self.seeds)
            object.__setattr__(self, "seeds", seeds)
            if len(seeds) != len(prompts):
                raise InvalidInputError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
            for seed in seeds:
                if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
                    raise InvalidInputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if self.negative_prompt is not None:
            _check_text(self.negative_prompt, "negative prompt", required=False)
        if self.steps is not None and (not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS):
            raise InvalidInputError(f"steps must be an integer in [1, {MAX_STEPS}], got {self.steps!r}")
        _check_range(self.guidance_scale, "guidance_scale", 0.0, MAX_GUIDANCE)
        if (self.width is None) != (self.height is None):
            raise InvalidInputError("give both width and height, or neither")
        if self.width is not None:
            check_size(self.width, self.height)
        if self.scheduler is not None and (not isinstance(self.scheduler, str) or not self.scheduler.isidentifier()):
            raise InvalidInputError(f"scheduler must be a diffusers scheduler class name, got {self.scheduler!r}")


@dataclass(frozen=True, kw_only=True)
class TextToImageRequest(_Request):
    """Draw one image per prompt."""


@dataclass(frozen=True, kw_only=True)
class Img2ImgRequest(_Request):
    """Redraw ``image`` (bytes, path or PIL image) towards each prompt.

    ``strength`` in ``(0, 1]``: how much of the image is re-noised (1 ignores it); ``None`` is the model default
    (0.75).
    """

    image: ImageSource
    strength: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self.strength, "strength", 0.0, 1.0, open_low=True)


@dataclass(frozen=True, kw_only=True)
class InstructEditRequest(_Request):
    """Edit ``image`` following each prompt, read as an instruction ("make it snowy"); InstructPix2Pix models only.

    ``image_guidance_scale`` in ``[0, 30]`` (default 1.5): how closely to keep the input image; below 1 turns
    classifier-free guidance off, as in diffusers.
    """

    image: ImageSource
    image_guidance_scale: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self.image_guidance_scale, "image_guidance_scale", 0.0, MAX_GUIDANCE)


@dataclass(frozen=True, kw_only=True)
class InpaintRequest(_Request):
    """Repaint the part of ``image`` that ``mask`` marks, following each prompt.

    ``mask``: same size as the image; white (or transparent) is repainted, black is kept; any mode is accepted
    and converted to grey. ``strength`` in ``(0, 1]`` (default 0.99): how much of the masked area is re-noised.
    """

    image: ImageSource
    mask: ImageSource
    strength: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_range(self.strength, "strength", 0.0, 1.0, open_low=True)


Request = TextToImageRequest | Img2ImgRequest | InstructEditRequest | InpaintRequest


def check_size(width: object, height: object) -> None:
    """Raise ``InvalidInputError`` unless ``width``×``height`` is a size the engine draws."""
    for name, side in (("width", width), ("height", height)):
        if not _is_int(side):
            raise InvalidInputError(f"{name} must be an integer, got {side!r}")
        if side % SIZE_MULTIPLE:
            raise InvalidInputError(f"{name} must be a multiple of {SIZE_MULTIPLE}, got {side}")
        if not MIN_SIDE <= side <= MAX_SIDE:
            raise InvalidInputError(f"{name} must be between {MIN_SIDE} and {MAX_SIDE} pixels, got {side}")
    if width * height > MAX_PIXELS:
        raise InvalidInputError(
            f"{width}x{height} is {width * height:,} pixels; the limit is {MAX_PIXELS:,} (2048x2048)"
        )


def batch_key(request: Request) -> tuple:
    """Requests with equal keys differ only in prompts and seeds, so ``combine`` can draw them in one call."""
    fields = []
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name in ("prompts", "seeds"):
            continue
        if field.name in ("image", "mask"):
            value = _image_fingerprint(value)
        fields.append((field.name, value))
    return (type(request).__name__, tuple(fields))


def combine(requests: Sequence[Request]) -> Request:
    """One request drawing every image of ``requests`` in order (their ``batch_key``s must be equal).

    Result ``i`` of the combined call belongs to the request whose prompts cover position ``i``. Requests
    without seeds get random ones here, so each keeps its own.
    """
    if not requests:
        raise InvalidInputError("nothing to combine")
    key = batch_key(requests[0])
    if any(batch_key(request) != key for request in requests[1:]):
        raise InvalidInputError("only requests with the same batch_key can be combined")
    prompts = [prompt for request in requests for prompt in request.prompts]
    seeds = [seed for request in requests for seed in (request.seeds or random_seeds(len(request.prompts)))]
    return dataclasses.replace(requests[0], prompts=prompts, seeds=seeds)


def random_seeds(count: int) -> tuple[int, ...]:
    """Fresh seeds for requests that gave none (32-bit, as AUTOMATIC1111 shows them)."""
    return tuple(int.from_bytes(os.urandom(4), "little") for _ in range(count))


def _check_text(text: object, what: str, *, required: bool) -> None:
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a string, got {type(text).__name__}")
    if required and not text.strip():
        raise InvalidInputError(f"{what} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidInputError(f"{what} has {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    if "\x00" in text:
        raise InvalidInputError(f"{what} contains a NUL character")


def _check_range(value: object, name: str, low: float, high: float, *, open_low: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (open_low and value == low):
        bracket = "(" if open_low else "["
        raise InvalidInputError(f"{name} must be a number in {bracket}{low:g}, {high:g}], got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _image_fingerprint(source: ImageSource) -> str:
    digest = hashlib.sha256()
    if isinstance(source, Image.Image):
        digest.update(f"{source.mode}{source.size}".encode())
        digest.update(source.tobytes())
    elif isinstance(source, (str, os.PathLike)):
        digest.update(os.fsencode(os.path.abspath(source)))
    else:
        digest.update(bytes(source))
    return digest.hexdigest()
