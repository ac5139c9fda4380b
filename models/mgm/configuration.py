"""Mini-Gemini configuration: the official flat ``config.json`` split into the LLM's own config and MGM's keys.

Released checkpoints write one flat dict: the backbone's keys (LlamaConfig / GemmaConfig / MixtralConfig) plus
MGM's multimodal keys (``mm_*``, ``image_*``, ``tokenizer_*``). ``model_type`` is not reliable across releases
(``mgm``, ``mgm_gemma``, ``mini_gemini``, ... with architecture names of either era), so the backbone is chosen
from its own fields, and never from the folder name.

The vision towers' shapes are not in ``config.json`` (the official code read them from the tower folders);
the loader fills :attr:`MGMConfig.vision_config` and the ConvNeXt ``aux_depths`` / ``aux_dims`` from the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from transformers import CLIPVisionConfig, GemmaConfig, LlamaConfig, MistralConfig, MixtralConfig, PretrainedConfig

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm.hf_logging import quiet_transformers

BACKBONES: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "gemma": GemmaConfig,
    "mixtral": MixtralConfig,
    "mistral": MistralConfig,
}
# What the official code registers per backbone (written back when saving).
OFFICIAL_NAMES = {
    "llama": ("mgm", "MGMLlamaForCausalLM"),
    "gemma": ("mgm_gemma", "MGMGemmaForCausalLM"),
    "mixtral": ("mgm_mixtral", "MGMMixtralForCausalLM"),
    "mistral": ("mgm_mistral", "MGMMistralForCausalLM"),
}

# Keys that belong to MGM, not to the LLM; kept verbatim when saving.
MGM_KEYS = frozenset(
    {
        "mm_vision_tower", "mm_vision_tower_aux", "mm_projector_type", "mm_hidden_size", "mm_hidden_size_aux",
        "mm_vision_select_layer", "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token",
        "mm_projector_lr", "image_aspect_ratio", "image_grid", "image_global", "image_size_aux",
        "image_grid_pinpoints", "tokenizer_model_max_length", "tokenizer_padding_side", "optimize_vision_tower",
        "optimize_vision_tower_aux", "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
        "drop_path", "aux_img_fold", "aux_with_fpn",  # legacy MiniGemini keys, tolerated
    }
)  # fmt: skip
# Keys of neither: bookkeeping of the saving library.
_BOOKKEEPING = frozenset({"model_type", "architectures", "_name_or_path", "transformers_version"})


def detect_backbone(raw: dict[str, Any]) -> str:
    """Which LLM family a flat MGM config describes, from its fields (never from a path)."""
    hints = " ".join([str(raw.get("model_type", "")), *(raw.get("architectures") or [])]).lower()
    if "num_local_experts" in raw or "mixtral" in hints:
        return "mixtral"
    activation = str(raw.get("hidden_act") or raw.get("hidden_activation") or "silu")
    # Gemma is the only released backbone with a GELU MLP (the Llama family uses SiLU).
    if "gemma" in hints or activation.startswith("gelu"):
        return "gemma"
    if "mistral" in hints or "sliding_window" in raw:
        return "mistral"
    return "llama"


def build_text_config(raw: dict[str, Any], backbone: str) -> PretrainedConfig:
    fields = {k: v for k, v in raw.items() if k not in MGM_KEYS and k not in _BOOKKEEPING}
    with quiet_transformers():  # Gemma warns that it rewrites "gelu": we undo that rewrite just below
        text_config = BACKBONES[backbone].from_dict(fields)
    if backbone == "gemma":
        # The official MGM-2B runs under transformers 4.38, which reads hidden_act "gelu" as the exact erf GELU
        # (the oracle can tell: tanh-GELU moves its logits by 5e-4). Current transformers silently rewrites "gelu"
        # to the tanh approximation; pin what the checkpoint says.
        text_config.hidden_act = raw.get("hidden_act", text_config.hidden_act)
    return text_config


@dataclass
class MGMConfig:
    """MGM's multimodal settings plus the backbone's HF config (``text_config``)."""

    text_config: PretrainedConfig
    backbone: str = "llama"
    mm_hidden_size: int = 1024
    mm_hidden_size_aux: int = 2880
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    mm_vision_tower: str | None = "openai/clip-vit-large-patch14-336"
    mm_vision_tower_aux: str | None = "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    image_aspect_ratio: str = "pad"
    image_grid: int = 1
    image_global: bool = False
    image_size_aux: int = 768
    tokenizer_model_max_length: int = 2048
    tokenizer_padding_side: str = "right"
    # Every other MGM key of the file (training flags, legacy keys), written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)
    # Filled from the weights by the loader (or given when building a model from scratch).
    vision_config: CLIPVisionConfig | None = None
    aux_depths: tuple[int, ...] = (3, 3, 27, 3)
    aux_dims: tuple[int, ...] = (192, 384, 768, 1536)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "MGMConfig":
        model_type = str(raw.get("model_type", ""))
        if not model_type.startswith(("mgm", "mini_gemini", "minigemini")):
            raise InvalidInputError(
                f"config.json has model_type {model_type!r}: not a Mini-Gemini checkpoint "
                "(expected 'mgm*' or 'mini_gemini*')"
            )
        if raw.get("aux_with_fpn") or raw.get("aux_img_fold"):
            raise InvalidInputError(
                "config.json enables the experimental aux_with_fpn / aux_img_fold path, which no released "
                "Mini-Gemini uses and this implementation does not support"
            )
        if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise InvalidInputError(f"unsupported mm_projector_type {raw['mm_projector_type']!r} (only mlp2x_gelu)")
        if raw.get("mm_vision_select_feature", "patch") != "patch":
            # Patch info mining needs a square grid of CLIP tokens; every release drops CLS.
            raise InvalidInputError(
                f"unsupported mm_vision_select_feature {raw['mm_vision_select_feature']!r} (only 'patch')"
            )
        if raw.get("image_aspect_ratio", "pad") != "pad":
            raise InvalidInputError(f"unsupported image_aspect_ratio {raw['image_aspect_ratio']!r} (only 'pad')")
        backbone = detect_backbone(raw)
        known = {f.name for f in dataclasses.fields(cls)}
        settings = {k: v for k, v in raw.items() if k in MGM_KEYS and k in known and v is not None}
        extra = {k: v for k, v in raw.items() if k in MGM_KEYS and k not in known}
        return cls(text_config=build_text_config(raw, backbone), backbone=backbone, extra=extra, **settings)

    def to_dict(self) -> dict[str, Any]:
        """The flat official layout, as released checkpoints write it."""
        model_type, architecture = OFFICIAL_NAMES[self.backbone]
        raw = self.text_config.to_dict()
        for key in _BOOKKEEPING:
            raw.pop(key, None)
        raw.update(self.extra)
        raw.update(
            {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in MGM_KEYS}
        )
        raw.update(model_type=model_type, architectures=[architecture])
        return dict(sorted(raw.items()))

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def patches_per_side(self) -> int:
        """CLIP patches per side of one low-resolution view (24 for ViT-L/14 at 336)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens per CLIP view: one per patch (CLS dropped)."""
        return self.patches_per_side**2

    @property
    def views_per_image(self) -> int:
        """1 for normal models; grid^2 crops (+1 global view) for HD."""
        if self.image_grid == 1:
            return 1
        return self.image_grid**2 + int(self.image_global)

    @property
    def num_visual_tokens(self) -> int:
        return self.views_per_image * self.tokens_per_view
