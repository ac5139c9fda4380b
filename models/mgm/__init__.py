"""Mini-Gemini on current transformers: faithful to the released checkpoints.

``load_pretrained(path_or_preset) -> (model, processor)`` is the stable entry point; see ``loading.py``.
"""

from mgmflow.models.mgm import presets
from mgmflow.models.mgm.configuration import MGMConfig
from mgmflow.models.mgm.engine import ChatRequest, ChatResult, MGMEngine, Message
from mgmflow.models.mgm.gen_protocol import NEGATIVE_PROMPT
from mgmflow.models.mgm.loading import load_pretrained
from mgmflow.models.mgm.modeling import IMAGE_TOKEN_INDEX, MGMForCausalLM
from mgmflow.models.mgm.processing import MGMProcessor

__all__ = [
    "IMAGE_TOKEN_INDEX", "MGMConfig", "MGMForCausalLM", "MGMProcessor", "load_pretrained", "presets",
    "ChatRequest", "ChatResult", "MGMEngine", "Message", "NEGATIVE_PROMPT",
]  # fmt: skip
