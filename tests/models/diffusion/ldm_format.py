"""Write a diffusers SD 1.x pipeline as an original (LDM) single-file checkpoint, to stand in for the files users keep.

The inverse of diffusers' single-file conversion (``diffusers.loaders.single_file_utils``) for the parts a
Stable Diffusion 1.x checkpoint holds: UNet (``model.diffusion_model.``), VAE (``first_stage_model.``) and CLIP
text encoder (``cond_stage_model.transformer.``). Tests check it against the forward conversion, key for key.
"""

from __future__ import annotations

import re

_RESNET_NAMES = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_state_dict(pipeline) -> dict:
    """The pipeline's UNet, VAE and text encoder weights under their original single-file names."""
    state = {}
    per_block = pipeline.unet.config.layers_per_block
    for key, tensor in pipeline.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key(key, per_block, pipeline.unet)] = tensor
    blocks = len(pipeline.vae.config.up_block_types)
    for key, tensor in pipeline.vae.state_dict().items():
        state["first_stage_model." + _vae_key(key, blocks)] = tensor
    for key, tensor in pipeline.text_encoder.state_dict().items():
        # transformers >= 5.6 flattened CLIPTextModel; the original checkpoints keep the text_model level.
        state["cond_stage_model.transformer.text_model." + key.removeprefix("text_model.")] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


def _resnet(rest: str) -> str:
    name, _, tail = rest.partition(".")
    return dict(_RESNET_NAMES).get(name, name) + "." + tail


def _unet_key(key: str, per_block: int, unet) -> str:
    for diffusers, ldm in _UNET_FIXED.items():
        if key.startswith(diffusers + "."):
            return ldm + key[len(diffusers):]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = match.groups()
        index = 1 + int(block) * (per_block + 1) + int(layer)
        return f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        block, rest = match.groups()
        return f"input_blocks.{1 + int(block) * (per_block + 1) + per_block}.0.op.{rest}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = match.groups()
        return f"middle_block.{2 * int(layer)}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = match.groups()
        index = int(block) * (per_block + 1) + int(layer)
        return f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block, rest = match.groups()
        has_attention = hasattr(unet.up_blocks[int(block)], "attentions")
        return f"output_blocks.{int(block) * (per_block + 1) + per_block}.{2 if has_attention else 1}.conv.{rest}"
    raise KeyError(f"no single-file name for UNet weight {key}")


def _vae_key(key: str, blocks: int) -> str:
    key = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    if match := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", key):
        part, rest = match.groups()
        name, _, tail = rest.rpartition(".")
        return f"{part}.mid.attn_1.{_VAE_ATTENTION_NAMES[name]}.{tail}"
    key = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m.group(1)) + 1}", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets", r"encoder.down.\1.block", key)
    key = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", key)
    # The decoder's up blocks are numbered from the bottom in the original layout, from the top in diffusers.
    key = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets", lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block", key)
    return re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                  lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample", key)
