"""Mini-Gemini image preprocessing, identical to the official pipeline (mgm-official.md section 5).

1. Pad to a square with the mean colour (122, 116, 104), the image centred.
2. Resize to ``image_size_aux`` with PIL bicubic on 8-bit pixels, rescale by 1/255, normalise with the OpenAI
   CLIP mean/std: ``images_aux`` [N, 3, A, A] (what transformers' PIL CLIPImageProcessor does; no torchvision).
3. The low-resolution view is a bilinear resize (no antialias) of that *normalised* tensor to 336 * grid.
   HD (grid 2): cut into a row-major 2x2 grid of crops, followed by a global view (bilinear to 336):
   ``images`` [N, 5, 3, 336, 336]. Normal: ``images`` [N, 3, 336, 336].

Every image goes through :func:`mgmflow.models.images.load_image` first (the one decoder and validator).
``processor(text, images)`` also tokenizes a rendered prompt (templates: ``mgmflow.models.mgm.conversation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import MAX_IMAGE_PIXELS, ImageSource, load_image
from mgmflow.models.mgm.conversation import Span
from mgmflow.models.mgm.tokenizer import PromptTokenizer

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class MGMProcessor:
    """Turns images into ``(images, images_aux)`` for :class:`MGMForCausalLM`; holds the tokenizer if any."""

    image_size: int = 336  # side of one CLIP view
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    tokenizer: Any = None  # a transformers tokenizer, or None for folders that ship none
    max_pixels: int = MAX_IMAGE_PIXELS
    prompt_tokenizer: PromptTokenizer | None = None  # the official ids of a prompt; built from a fast tokenizer

    def __post_init__(self) -> None:
        if self.prompt_tokenizer is None and self.tokenizer is not None:
            self.prompt_tokenizer = PromptTokenizer.from_fast(self.tokenizer)

    @classmethod
    def from_config(cls, config, tokenizer=None, prompt_tokenizer: PromptTokenizer | None = None) -> "MGMProcessor":
        return cls(
            image_size=config.vision_config.image_size,
            image_size_aux=config.image_size_aux,
            image_grid=config.image_grid,
            image_global=config.image_global,
            tokenizer=tokenizer,
            prompt_tokenizer=prompt_tokenizer,
        )

    @property
    def pad_color(self) -> tuple[int, int, int]:
        return tuple(int(255 * m) for m in OPENAI_CLIP_MEAN)

    def preprocess(self, images: Sequence[ImageSource]) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images / bytes / paths -> (``images``, ``images_aux``) float32 tensors (shapes in the module doc)."""
        if isinstance(images, (str, bytes, bytearray, Image.Image)) or not len(images):
            raise InvalidInputError("preprocess takes a non-empty list of images")
        images_aux = torch.stack([self.normalize_aux(load_image(i, max_pixels=self.max_pixels)) for i in images])
        grid, side = self.image_grid, self.image_size
        low_res = F.interpolate(images_aux, size=(side * grid,) * 2, mode="bilinear", align_corners=False)
        if grid == 1:
            return low_res, images_aux
        n = low_res.shape[0]
        crops = low_res.reshape(n, 3, grid, side, grid, side).permute(0, 2, 4, 1, 3, 5)  # row-major crops
        views = [crops.reshape(n, grid * grid, 3, side, side)]
        if self.image_global:
            global_view = F.interpolate(low_res, size=(side, side), mode="bilinear", align_corners=False)
            views.append(global_view[:, None])
        return torch.cat(views, dim=1), images_aux

    def tokenize(self, prompt: str | Sequence[Span]) -> list[int]:
        """Ids of a rendered prompt with -200 at each ``<image>``, tokenized chunk-wise as in training.

        ``prompt``: a template's spans (control tokens only from the template), or a whole prompt string.
        """
        if self.prompt_tokenizer is None:
            raise InvalidInputError("this checkpoint ships no tokenizer: pass input_ids to the model instead")
        return self.prompt_tokenizer.encode(prompt)

    def __call__(self, text: str | None = None, images: Sequence[ImageSource] = ()) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for one prompt and its images: ``model(**processor(text, images))``."""
        inputs = {}
        if text is not None:
            inputs["input_ids"] = torch.tensor([self.tokenize(text)])
        if len(images):
            inputs["images"], inputs["images_aux"] = self.preprocess(images)
        return inputs

    def normalize_aux(self, image: Image.Image) -> torch.Tensor:
        """One RGB image -> padded, resized, normalised [3, A, A]."""
        width, height = image.size
        side = max(width, height)
        square = Image.new("RGB", (side, side), self.pad_color)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        resized = square.resize((self.image_size_aux,) * 2, resample=Image.Resampling.BICUBIC)
        # As CLIPImageProcessor: rescale in float64, then float32 arithmetic for the normalisation.
        pixels = (np.asarray(resized, dtype=np.float64) * (1 / 255)).astype(np.float32)
        mean, std = np.asarray(OPENAI_CLIP_MEAN, np.float32), np.asarray(OPENAI_CLIP_STD, np.float32)
        return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())
