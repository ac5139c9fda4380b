"""Deterministic random weights for tiny models, keyed by parameter name.

Library defaults (LayerScale 1e-6, zero biases, unit norms) would hide bugs: a dropped bias or a skipped
LayerScale changes nothing. So, as in the parity fixtures: matrices N(0,1)/sqrt(fan_in), lm_head twice that,
biases 0.05 N, norm weights 1 + 0.1 N (Gemma's (1 + w) norms: 0.1 N, its final norm -1 + N so that tied
embeddings do not just echo the prompt), LayerScale 0.5 + 0.1 N, CLIP class/position embeddings 0.5 N.
Each tensor's values depend only on its name and the seed, never on creation order.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _is_offset_norm(module: nn.Module) -> bool:
    """Gemma-style RMSNorm, which scales by (1 + weight)."""
    return type(module).__name__.startswith("Gemma") and "RMSNorm" in type(module).__name__


@torch.no_grad()
def init_deterministic_(model: nn.Module, seed: int) -> None:
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}"
            noise = torch.randn(param.shape, generator=_generator(seed, name), dtype=torch.float32)
            is_norm = isinstance(module, nn.LayerNorm) or "RMSNorm" in type(module).__name__
            if is_norm and param_name == "weight":
                if _is_offset_norm(module):
                    value = noise - 1 if module_name.endswith("model.norm") else 0.1 * noise
                else:
                    value = 1 + 0.1 * noise
            elif param_name == "bias":
                value = 0.05 * noise
            elif param_name == "gamma":  # ConvNeXt LayerScale
                value = 0.5 + 0.1 * noise
            elif param_name == "class_embedding" or module_name.endswith("position_embedding"):
                value = 0.5 * noise
            elif isinstance(module, nn.Embedding):
                # Gemma multiplies embeddings by sqrt(hidden): keep its inputs in the same range as LLaMA's.
                value = noise * (0.25 if hasattr(module, "embed_scale") else 1.0)
            else:
                fan_in = param[0].numel() if param.ndim == 4 else param.shape[-1]
                value = noise / fan_in**0.5 * (2.0 if module_name.endswith("lm_head") else 1.0)
            param.copy_(value.to(param.dtype))
