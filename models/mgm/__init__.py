"""Mini-Gemini on current transformers: faithful to the released checkpoints.

``load_pretrained(path_or_preset) -> (model, processor)`` is the stable entry point; see ``loading.py``.

The names below load lazily, so importing this package (or ``presets``, which the orchestrator reads for prompt
budgets) does not import torch or transformers: a run's first step would wait seconds for them.
"""

from mgmflow.models.lazy import lazy_exports
from mgmflow.models.mgm import presets

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
__getattr__ = lazy_exports(__name__, _EXPORTS)
