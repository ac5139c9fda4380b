"""Every released Mini-Gemini geometry, on the meta device: shapes through the real code at the real widths.

The released ``config.json`` of each model (from ``bench/bench_geometry.py``, which runs the same models for real
in bf16 with random weights) is parsed as a checkpoint's would be, the model is built without memory, and
images of the released sizes go through both towers, patch info mining and the projector, then the LLM.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig

from bench.bench_geometry import CLIP_L_336, CONVNEXT_L_DIMS, FAMILIES, MODELS, released_config
from mgmflow.models.mgm.configuration import MGMConfig
from mgmflow.models.mgm.conversation import template_for_config
from mgmflow.models.mgm.modeling import MGMForCausalLM


def meta_model(name: str) -> MGMForCausalLM:
    """``name``'s released config parsed as a checkpoint's, with CLIP-L/14-336 and ConvNeXt-L, on the meta device."""
    config = MGMConfig.from_dict(released_config(name, llm_layers=1))
    config.vision_config = CLIPVisionConfig(num_hidden_layers=2, **CLIP_L_336)
    config.aux_dims = CONVNEXT_L_DIMS
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(config.text_config, dtype=torch.bfloat16)
        return MGMForCausalLM(config, language_model).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["mgm-7b", "mgm-7b-hd"])
def test_released_vision_geometry(name):
    """CLIP at 336 (24x24 patches) and ConvNeXt at 768 / HD 1536: 8x8 aux pixels under each token, 576 / 2880."""
    model = meta_model(name)
    hd = name.endswith("-hd")
    with torch.device("meta"):
        views = torch.empty(2, 5, 3, 336, 336) if hd else torch.empty(2, 3, 336, 336)
        images_aux = torch.empty(2, 3, 1536 if hd else 768, 1536 if hd else 768)
        assert model.aux_features(images_aux).shape == (2, 2880, *(2 * [384 if hd else 192]))
        clip, mined = model.patch_info_mining(views, images_aux)
    assert clip.shape == mined.shape == (2, 2880 if hd else 576, 1024) and mined.dtype == torch.bfloat16


@pytest.mark.parametrize("name", MODELS)
def test_released_model_geometry(name):
    """Each model's config picks its template and visual token count; its projector and LLM take the tokens."""
    raw, model = released_config(name, llm_layers=1), meta_model(name)
    config, hd = model.config, name.endswith("-hd")
    assert template_for_config(config).name == FAMILIES[name.removesuffix("-hd")][0]
    assert config.num_visual_tokens == (2880 if hd else 576) and config.image_size_aux == (1536 if hd else 768)
    with torch.device("meta"):
        features = model.mm_projector(torch.empty(2, config.num_visual_tokens, 1024, dtype=torch.bfloat16))
        logits = model.language_model(inputs_embeds=features, logits_to_keep=1).logits
    assert features.shape == (2, config.num_visual_tokens, raw["hidden_size"])
    assert logits.shape == (2, 1, raw["vocab_size"]) and logits.dtype == torch.bfloat16
