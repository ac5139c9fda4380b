"""Mini-Gemini on current transformers: faithful to the released checkpoints.

``load_pretrained(path_or_preset) -> (model, processor)`` is the stable entry point; see ``loading.py``.

The names below load lazily, so importing this package (or ``mgmflow.models.mgm.presets``, which the orchestrator
reads for prompt budgets) does not import torch or transformers: a run's first step would wait seconds for them.
"""

import importlib

_EXPORTS = {
    "MGMConfig": "configuration",
    "ChatRequest": "engine",
    "ChatResult": "engine",
    "MGMEngine": "engine",
    "Message": "engine",
    "NEGATIVE_PROMPT": "gen_protocol",
    "load_pretrained": "loading",
    "IMAGE_TOKEN_INDEX": "modeling",
    "MGMForCausalLM": "modeling",
    "MGMProcessor": "processing",
}

__all__ = sorted([*_EXPORTS, "presets"])


def __getattr__(name: str):
    if name == "presets":
        return importlib.import_module(f"{__name__}.presets")
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
