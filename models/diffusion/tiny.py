"""Tiny diffusion pipelines built locally from seeded random components: the embedded default, for tests and demos.

They have the real architectures (SDXL: two CLIP text encoders and a text-time UNet; SD 1.x: one encoder), scaled
down so that a 64×64 image takes a fraction of a second on one CPU thread. Nothing is downloaded: the CLIP tokenizer
reads the project's fixed vocabulary in ``tokenizer/`` (byte-level BPE: the 256 byte symbols, the same with ``</w>``,
the merges of a few hundred prompt words, and CLIP's two special tokens).

Dimension rules the parts must agree on (see docs/stack-notes.md §4):
- SDXL UNet ``cross_attention_dim`` = hidden size of text encoder 1 + text encoder 2 (32 + 32);
- SDXL ``projection_class_embeddings_input_dim`` = 6 time ids × ``addition_time_embed_dim`` + projection dim of
  text encoder 2 (6 × 8 + 32);
- the text encoders' bos/eos/pad ids are the tokenizer's, because CLIP pools at the EOS token;
- instruct-pix2pix UNets take 8 input channels (noisy latents + image latents), inpainting UNets 9
  (noisy latents + mask + masked-image latents).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).with_name("tokenizer")

# What each tiny pipeline is: (pipeline class, SDXL architecture?, UNet input channels, scheduler class).
TINY_KINDS = {
    "sdxl": (StableDiffusionXLPipeline, True, 4, EulerDiscreteScheduler),
    "sdxl-inpaint": (StableDiffusionXLInpaintPipeline, True, 9, EulerDiscreteScheduler),
    "sdxl-ip2p": (StableDiffusionXLInstructPix2PixPipeline, True, 8, EulerAncestralDiscreteScheduler),
    "sd": (StableDiffusionPipeline, False, 4, PNDMScheduler),
    "sd-ip2p": (StableDiffusionInstructPix2PixPipeline, False, 8, EulerAncestralDiscreteScheduler),
}

# Every component is drawn from this seed, so a tiny preset is the same weights on every machine.
_SEED = 0
_TEXT_HIDDEN = 32
_TIME_EMBED_DIM = 8
# Default image size of the tiny models: 64×64 pixels = 8×8 latents (the VAE scales by 8, like the real ones).
_IMAGE_SIZE = 64
_VAE_SCALE = 8


def build_tokenizer() -> CLIPTokenizer:
    """The CLIP tokenizer of every tiny preset, from the project's fixed vocabulary (77 tokens like real CLIP)."""
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#")]
    # A tokenizer built from bare files would get model_max_length=1e30, which overflows the pipelines' padding.
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_pipeline(kind: str) -> DiffusionPipeline:
    """Build the tiny pipeline ``kind`` (a key of ``TINY_KINDS``) from seeded random weights, in float32 on CPU."""
    pipeline_class, sdxl, in_channels, scheduler_class = TINY_KINDS[kind]
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's global RNG
        torch.manual_seed(_SEED)
        components = {
            "unet": _unet(in_channels=in_channels, sdxl=sdxl),
            "vae": _vae(),
            "scheduler": _scheduler(scheduler_class),
            "tokenizer": tokenizer,
            "text_encoder": _text_encoder(tokenizer, with_projection=False),
        }
        if sdxl:
            components |= {
                "tokenizer_2": tokenizer,
                "text_encoder_2": _text_encoder(tokenizer, with_projection=True),
            }
    if not sdxl:
        components |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return pipeline_class(**components)


def _text_encoder(tokenizer: CLIPTokenizer, *, with_projection: bool) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=_TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return model_class(config).eval()


def _unet(*, in_channels: int, sdxl: bool) -> UNet2DConditionModel:
    sdxl_conditioning = {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * _TIME_EMBED_DIM + _TEXT_HIDDEN,
    }
    return UNet2DConditionModel(
        sample_size=_IMAGE_SIZE // _VAE_SCALE,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        norm_num_groups=16,
        cross_attention_dim=2 * _TEXT_HIDDEN if sdxl else _TEXT_HIDDEN,
        **(sdxl_conditioning if sdxl else {}),
    ).eval()


def _vae() -> AutoencoderKL:
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # three halvings: scale factor 8
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=16,
        latent_channels=4,
        sample_size=_IMAGE_SIZE,
    )
    _smooth_decoder(vae)
    return vae.eval()


def _smooth_decoder(vae: AutoencoderKL) -> None:
    """Make every 3×3 convolution of the decoder mostly a channel mix through a blur kernel.

    A randomly initialised decoder turns latents into per-pixel noise; with this, tiny images show blobs of
    colour whose layout follows the seed and the prompt, so a wrong image is visible by eye.
    """
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 8
    with torch.no_grad():
        for conv in vae.decoder.modules():
            if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (3, 3):
                out_channels, in_channels = conv.weight.shape[:2]
                mix = torch.randn(out_channels, in_channels) / in_channels**0.5
                conv.weight.copy_(0.2 * conv.weight + mix[:, :, None, None] * blur)


def _scheduler(scheduler_class):
    # The noise schedule of Stable Diffusion 1.x and SDXL, so the tiny pipelines denoise like the real ones.
    config = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }
    if scheduler_class is PNDMScheduler:
        config |= {"skip_prk_steps": True, "set_alpha_to_one": False}
    return scheduler_class(**config)
