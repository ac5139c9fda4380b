"""Mini-Gemini: dual vision encoders, patch info mining, and an unchanged transformers LLM.

    images  [N, 3, s, s] (or HD [N, g*g+1, 3, s, s])      images_aux [N, 3, A, A]
        |  CLIP ViT, hidden_states[-2], CLS dropped           |  ConvNeXt stem + 4 stages, concatenated
        v                                                     v
    X_L [N*views, n, C]                                    F_H [N, C_aux, A/4, A/4]
        \____________ patch info mining (one query per CLIP token, ____/
                       attending to the M x M aux pixels under it)
                                  |  X_L + mined
                                  v
                       mm_projector (Linear, GELU, Linear) -> visual tokens [N, n_visual, H]
                                  |  spliced at the -200 placeholders of input_ids
                                  v
                       language_model (LlamaForCausalLM / GemmaForCausalLM / MixtralForCausalLM ...)

The LLM is the backbone's own transformers class, loaded by transformers; this module only adds the vision side
under the official parameter names (see :data:`CHECKPOINT_PREFIXES`).
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm.configuration import MGMConfig
from mgmflow.models.mgm.convnext import ConvNeXtTrunk
from mgmflow.models.mgm.hf_logging import quiet_transformers

IMAGE_TOKEN_INDEX = -200

# Module prefix here -> key prefix in released checkpoints (everything sits under the official inner `model.`;
# transformers 5's CLIPVisionModel dropped its own `vision_model.` level, which the checkpoints still have).
CHECKPOINT_PREFIXES = {
    "vision_tower.": "model.vision_tower.vision_tower.vision_model.",
    "vision_tower_aux.stem.": "model.vision_tower_aux.vision_stem.",
    "vision_tower_aux.stages.": "model.vision_tower_aux.vision_stages.",
    "mm_projector.": "model.mm_projector.",
    "vlm_uni_query_projector.": "model.vlm_uni_query_projector.",
    "vlm_uni_aux_projector.": "model.vlm_uni_aux_projector.",
    "vlm_uni_val_projector.": "model.vlm_uni_val_projector.",
}


def to_checkpoint_name(name: str) -> str:
    for ours, theirs in CHECKPOINT_PREFIXES.items():
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise KeyError(name)


def from_checkpoint_name(key: str) -> str | None:
    """Our module name for a released checkpoint's vision/projector key; None for any other key."""
    for ours, theirs in CHECKPOINT_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return None


def _norm_linear(in_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(in_features), nn.Linear(in_features, out_features))


def _downscale_fp32(maps: torch.Tensor, width: int, channels_per_step: int = 256) -> torch.Tensor:
    """Bilinear resize of [N, C, W, W] maps to ``width``, computed in fp32 as the official code does, a few
    channels at a time: an fp32 copy of a whole HD map (2880 x 384 x 384) would be 1.7 GB."""
    return torch.cat([
        F.interpolate(part.float(), size=(width, width), mode="bilinear", align_corners=False).to(maps.dtype)
        for part in maps.split(channels_per_step, dim=1)
    ], dim=1)


def region_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Single-head attention of each query over the keys of its own region: [V, n, C], [V, n, r, C] x2 -> [V, n, C].

    The key is scaled by 1/sqrt(C) before the product, as the official code does: scaled after it, the product
    of fp16 activations overflows (65504) at a 32x smaller size for C = 1024.
    """
    logits = query[:, :, None] @ (key / math.sqrt(query.shape[-1])).transpose(-1, -2)  # [V, n, 1, r]
    attention = torch.nan_to_num(logits).softmax(dim=-1)  # nan_to_num: the official fp16 overflow guard
    return (attention @ value).squeeze(2)


class MGMForCausalLM(nn.Module):
    """Mini-Gemini around a transformers causal LM (``language_model``), in eval mode."""

    def __init__(self, config: MGMConfig, language_model: PreTrainedModel | None):
        super().__init__()
        if config.vision_config is None:
            raise ValueError("MGMConfig.vision_config must be set (the loader reads it from the weights)")
        self.config = config
        self.language_model = language_model
        c, c_aux, h = config.mm_hidden_size, config.mm_hidden_size_aux, config.hidden_size
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.vision_tower_aux = ConvNeXtTrunk(config.aux_depths, config.aux_dims)
        if self.vision_tower_aux.hidden_size != c_aux or config.vision_config.hidden_size != c:
            raise InvalidInputError(
                f"tower widths ({config.vision_config.hidden_size}, {self.vision_tower_aux.hidden_size}) do not "
                f"match mm_hidden_size / mm_hidden_size_aux ({c}, {c_aux}) in config.json"
            )
        self.mm_projector = nn.Sequential(nn.Linear(c, h), nn.GELU(), nn.Linear(h, h))  # mlp2x_gelu
        self.vlm_uni_query_projector = _norm_linear(c, c)
        self.vlm_uni_aux_projector = _norm_linear(c_aux, c)
        self.vlm_uni_val_projector = _norm_linear(c_aux, c)
        self.eval()  # the towers hold no train-only behaviour, but keep the LLM's dropout off too

    @classmethod
    def from_config(cls, config: MGMConfig, *, dtype: torch.dtype = torch.float32) -> "MGMForCausalLM":
        """A randomly initialised model (presets, tests); real weights come through ``load_pretrained``."""
        language_model = AutoModelForCausalLM.from_config(config.text_config, dtype=dtype)
        return cls(config, language_model).to(dtype)

    # -- properties the generation side relies on -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens each image contributes (576 normal, 2880 HD for the released models)."""
        return self.config.num_visual_tokens

    # -- vision ------------------------------------------------------------------------------------------------

    def clip_features(self, views: torch.Tensor) -> torch.Tensor:
        """[V, 3, s, s] -> CLIP patch tokens [V, n, C] from hidden_states[select_layer], CLS dropped."""
        out = self.vision_tower(pixel_values=views.to(self.dtype), output_hidden_states=True)
        return out.hidden_states[self.config.mm_vision_select_layer][:, 1:]

    def aux_features(self, images_aux: torch.Tensor) -> torch.Tensor:
        """[N, 3, A, A] -> concatenated ConvNeXt stage maps [N, C_aux, A/4, A/4]."""
        return self.vision_tower_aux(images_aux.to(self.dtype))

    def mine_patch_info(self, clip: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        """Each CLIP token attends to the M x M aux pixels under its patch: [V, n, C], [V, C_aux, W, W] -> [V, n, C].

        One view at a time: a view's regions, normalised once for the keys and once for the values, are the
        largest tensors of the vision side (an HD crop's: 576 x 64 x 2880, 0.2 GB each in bf16).
        """
        return torch.cat([self._mine_view(c, a) for c, a in zip(clip.split(1), aux.split(1))])

    def _mine_view(self, clip: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        _, n, _ = clip.shape
        side = math.isqrt(n)
        width = aux.shape[-1]
        if side * side != n or width % side:
            raise ValueError(f"cannot tile an aux map of width {width} under a {side}x{side} grid of {n} tokens")
        m = width // side
        # Channels-last, then one row per region: [1, side, m, side, m, C_aux] -> [1, n, m*m, C_aux].
        regions = aux.permute(0, 2, 3, 1).reshape(1, side, m, side, m, -1)
        regions = regions.permute(0, 1, 3, 2, 4, 5).reshape(1, n, m * m, -1)
        query = self.vlm_uni_query_projector(clip)  # [1, n, C]
        key = self.vlm_uni_aux_projector(regions)  # [1, n, m*m, C]
        value = self.vlm_uni_val_projector(regions)
        return region_attention(query, key, value)

    def patch_info_mining(self, images: torch.Tensor, images_aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP tokens and mined aux tokens, both [N, n_visual, C] in the order the LLM sees them.

        HD (``images`` [N, g*g(+1), 3, s, s], crops row-major then the global view): the aux map is cut into the
        same g x g grid for the crops and downscaled by g for the global view; tokens are [global, crops...].
        """
        grid, n_images = self.config.image_grid, images_aux.shape[0]
        views = images.flatten(0, 1) if images.ndim == 5 else images
        if views.shape[0] != n_images * self.config.views_per_image:
            raise InvalidInputError(
                f"images has {views.shape[0]} views for {n_images} images; this model expects "
                f"{self.config.views_per_image} view(s) per image (image_grid={grid})"
            )
        clip = self.clip_features(views).unflatten(0, (n_images, -1))  # [N, views, n, C]
        aux = self.aux_features(images_aux)  # [N, C_aux, W, W]
        if grid == 1:
            return clip[:, 0], self.mine_patch_info(clip[:, 0], aux)
        width = aux.shape[-1] // grid
        # Crop k = (row i, column j) of the aux map, a view (no copy), under CLIP crop k.
        rows = [slice(i * width, (i + 1) * width) for i in range(grid)]
        mined_parts = [
            self.mine_patch_info(clip[:, i * grid + j], aux[:, :, rows[i], rows[j]])
            for i in range(grid)
            for j in range(grid)
        ]
        clip_parts = [clip[:, : grid * grid].flatten(1, 2)]  # [N, g*g*n, C], crops in the same order
        if self.config.image_global:
            clip_parts.insert(0, clip[:, -1])
            mined_parts.insert(0, self.mine_patch_info(clip[:, -1], _downscale_fp32(aux, width)))
        return torch.cat(clip_parts, dim=1), torch.cat(mined_parts, dim=1)

    def encode_images(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        """Visual tokens [N, n_visual, H] ready to splice into the LLM input."""
        if images_aux is None:
            raise InvalidInputError("images_aux is required with images (the high-resolution view)")
        if images.shape[0] == 0:
            return torch.zeros(0, self.num_visual_tokens, self.config.hidden_size, dtype=self.dtype, device=self.device)
        clip, mined = self.patch_info_mining(images.to(self.device), images_aux.to(self.device))
        return self.mm_projector(clip + mined)

    # -- text + images -> LLM inputs ---------------------------------------------------------------------------

    def embed_multimodal(
        self,
        input_ids: torch.LongTensor,
        image_features: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace each -200 of ``input_ids`` [B, T] by the next image's tokens; re-pad rows on ``padding_side``.

        Images are consumed in order across the batch. Returns ``inputs_embeds`` [B, T', H] and its mask [B, T'].
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        input_ids = input_ids.to(self.device)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)).bool()
        rows = [ids[keep] for ids, keep in zip(input_ids, mask)]  # padding dropped
        n_placeholders = sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids in rows)
        n_images = 0 if image_features is None else image_features.shape[0]
        if n_placeholders != n_images:
            raise InvalidInputError(
                f"the prompt has {n_placeholders} image placeholder(s) but {n_images} image(s) were given"
            )
        embed = self.language_model.get_input_embeddings()
        if image_features is not None:
            # Gemma scales its inputs by sqrt(hidden) - in transformers 5 inside the embedding layer, so the
            # visual tokens must get the same factor here (MGM-2B was trained with scaled visual tokens).
            scale = getattr(embed, "embed_scale", None)
            image_features = image_features.to(self.device, embed.weight.dtype)
            if scale is not None:
                image_features = image_features * scale.to(image_features.dtype)
        images = iter([] if image_features is None else image_features)
        sequences = []
        for ids in rows:
            text = embed(ids.clamp(min=0))  # placeholder rows are replaced below
            pieces, start = [], 0
            for position in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                pieces += [text[start:position], next(images)]
                start = position + 1
            pieces.append(text[start:])
            sequences.append(torch.cat(pieces))
        longest = max(len(s) for s in sequences)
        if longest > self.config.tokenizer_model_max_length:
            raise InvalidInputError(
                f"the prompt is {longest} tokens once images are expanded; this model's context is "
                f"{self.config.tokenizer_model_max_length} tokens"
            )
        hidden = sequences[0].shape[-1]
        inputs_embeds = sequences[0].new_zeros(len(sequences), longest, hidden)
        new_mask = torch.zeros(len(sequences), longest, dtype=torch.long, device=self.device)
        for i, sequence in enumerate(sequences):
            span = slice(0, len(sequence)) if padding_side == "right" else slice(longest - len(sequence), longest)
            inputs_embeds[i, span] = sequence
            new_mask[i, span] = 1
        return inputs_embeds, new_mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        images_aux: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """One LLM step. With ``images``, the -200 placeholders of ``input_ids`` become visual tokens first.

        ``past_key_values`` is the LLM's cache (transformers 5 calls the argument ``cache``; both are accepted).
        """
        if images is not None or (input_ids is not None and (input_ids == IMAGE_TOKEN_INDEX).any()):
            if inputs_embeds is not None:
                raise ValueError("pass either input_ids with images or inputs_embeds, not both")
            features = None if images is None else self.encode_images(images, images_aux)
            inputs_embeds, attention_mask = self.embed_multimodal(input_ids, features, attention_mask)
            input_ids = None
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return self.language_model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **kwargs,
        )

    # -- saving in the released layout -------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The vision towers and projectors under their official checkpoint names."""
        return {
            to_checkpoint_name(name): tensor
            for name, tensor in self.state_dict().items()
            if not name.startswith("language_model.")
        }

    def save_pretrained(self, folder: str | Path) -> None:
        """Write a released-style folder: official ``config.json`` and one ``model.safetensors`` of every weight.

        The LLM's keys are whatever transformers writes for its backbone (e.g. Mixtral's experts unfused, as
        released), so the folder loads back through transformers' own weight handling.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as llm_dir:
            with quiet_transformers():
                self.language_model.save_pretrained(llm_dir)
            tensors = {}
            for shard in sorted(Path(llm_dir).glob("*.safetensors")):
                tensors.update(load_file(shard))
            generation_config = Path(llm_dir) / "generation_config.json"
            if generation_config.exists():
                generation_config.replace(folder / "generation_config.json")
        tensors.update({k: v.contiguous() for k, v in self.checkpoint_state_dict().items()})
        save_file(dict(sorted(tensors.items())), folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
