"""Diffusion and editing models on diffusers pipelines: text-to-image, img2img, instruction editing, inpainting.

    from mgmflow.models.diffusion import DiffusionEngine, TextToImageRequest, read_parameters

    engine = DiffusionEngine.from_pretrained("tiny")  # or "sdxl-base", a folder, a .safetensors file
    [image] = engine.text_to_image(TextToImageRequest(prompts=["a red house at sunset"], seeds=[42]))
    read_parameters(image.png)["seed"]  # 42

The names below load lazily, so importing this package (or ``mgmflow.models.diffusion.defaults``) does not import torch.
"""

from mgmflow.models.lazy import lazy_exports

_EXPORTS = {
    "DiffusionEngine": "engine",
    "GeneratedImage": "engine",
    "MemoryOptions": "engine",
    "LoraSpec": "loading",
    "TextToImageRequest": "requests",
    "Img2ImgRequest": "requests",
    "InstructEditRequest": "requests",
    "InpaintRequest": "requests",
    "batch_key": "requests",
    "combine": "requests",
    "read_parameters": "metadata",
    "NEGATIVE_PROMPT": "defaults",
    "resolve": "presets",
    "list_presets": "presets",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
