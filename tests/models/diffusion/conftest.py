"""Fixtures of the diffusion tests: tiny engines (built once per session under a private MGMFLOW_HOME) and images."""


import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def engines(mgmflow_home):
    """Tiny engines by preset name, loaded on first use and shared by the session."""
    from mgmflow.models.diffusion import DiffusionEngine

    loaded = {}

    def get(name: str):
        if name not in loaded:
            loaded[name] = DiffusionEngine.from_pretrained(name)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def engine(engines):
    """The default tiny engine (SDXL architecture)."""
    return engines("tiny")


@pytest.fixture(scope="session")
def photo() -> Image.Image:
    """A 64x64 RGB image with structure (gradients and a square), as an edit input."""
    y, x = np.mgrid[0:64, 0:64]
    pixels = np.stack([x * 4, y * 4, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    pixels[20:44, 20:44] = (250, 30, 30)
    return Image.fromarray(pixels)


@pytest.fixture(scope="session")
def square_mask() -> Image.Image:
    """White (repaint) square in the middle of a black 64x64 mask."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


@pytest.fixture(scope="session")
def lora_file(tmp_path_factory, mgmflow_home):
    """A LoRA for the tiny SDXL UNet (attention projections, rank 4, non-zero), saved as diffusers writes LoRAs."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from mgmflow.models.diffusion.tiny import build_pipeline

    unet = build_pipeline("sdxl").unet
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    folder = tmp_path_factory.mktemp("lora")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name="pixel.art.safetensors")
    return folder / "pixel.art.safetensors"
