"""Numerical parity with the official Mini-Gemini code on its own tiny checkpoints (LLaMA, Gemma, LLaMA-HD).

Everything goes through the public ``load_pretrained`` on the untouched fixture folders, from an unrelated
working directory (the folders' tower paths are relative). Tolerances are the issue's: preprocessed pixels
1e-5, logits 1e-4 (fp32), intermediates 2e-5 (the fixtures' README), greedy ids identical.
"""

import json
import os

import numpy as np
import pytest
import torch

VARIANTS = ["mgm_llama", "mgm_gemma", "mgm_llama_hd"]
INTERMEDIATE_ATOL = 2e-5


@pytest.fixture(scope="module", params=VARIANTS)
def oracle(request, oracle_dir, tmp_path_factory):
    """(model, processor, fixture folder), loaded with the working directory somewhere else entirely."""
    from mgmflow.models.mgm import load_pretrained

    root = oracle_dir / request.param
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        model, processor = load_pretrained(root / "checkpoint")
    finally:
        os.chdir(cwd)
    return model, processor, root


def load(root, name):
    return torch.from_numpy(np.load(root / f"{name}.npy"))


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_preprocessing_matches_official(oracle):
    _, processor, root = oracle
    images, images_aux = processor.preprocess([root / "inputs" / "test_image.png"])
    assert images.shape == load(root, "inputs/images").shape
    assert max_diff(images_aux, load(root, "inputs/images_aux")) <= 1e-5
    assert max_diff(images, load(root, "inputs/images")) <= 1e-5


@torch.inference_mode()
def test_vision_intermediates_match_official(oracle):
    model, _, root = oracle
    images, images_aux = load(root, "inputs/images"), load(root, "inputs/images_aux")
    views = images.flatten(0, 1) if images.ndim == 5 else images  # HD: [crop0..crop3, global], as the reference

    assert max_diff(model.clip_features(views), load(root, "reference/clip_features")) <= INTERMEDIATE_ATOL
    aux = model.aux_features(images_aux)
    assert max_diff(aux[:, :, :8, :8], load(root, "reference/aux_features_crop")) <= INTERMEDIATE_ATOL
    stats = json.loads((root / "reference" / "result.json").read_text())["aux_features_stats"]
    assert list(aux.shape) == stats["shape"]

    clip, mined = model.patch_info_mining(images, images_aux)
    reference_mined = load(root, "reference/mined_aux_tokens")  # HD: [global call, crop call] rows
    assert max_diff(mined.reshape(reference_mined.shape), reference_mined) <= INTERMEDIATE_ATOL
    assert max_diff(clip + mined, load(root, "reference/pre_projector_tokens")) <= INTERMEDIATE_ATOL

    visual_tokens = model.encode_images(images, images_aux)
    assert max_diff(visual_tokens, load(root, "reference/visual_tokens")) <= INTERMEDIATE_ATOL
    assert visual_tokens.shape[1] == model.num_visual_tokens == stats_tokens(root)


def stats_tokens(root) -> int:
    return json.loads((root / "reference" / "result.json").read_text())["n_visual_tokens"]


@torch.inference_mode()
def test_inputs_embeds_match_official(oracle):
    model, _, root = oracle
    images, images_aux = load(root, "inputs/images"), load(root, "inputs/images_aux")
    features = model.encode_images(images, images_aux)
    inputs_embeds, mask = model.embed_multimodal(load(root, "inputs/input_ids"), features)
    # The reference is taken before Gemma's sqrt(hidden) scaling, which transformers 5 applies in the embedding.
    scale = getattr(model.language_model.get_input_embeddings(), "embed_scale", torch.tensor(1.0))
    assert max_diff(inputs_embeds / scale, load(root, "reference/inputs_embeds")) <= INTERMEDIATE_ATOL
    assert mask.all() and mask.shape == inputs_embeds.shape[:2]


@torch.inference_mode()
def test_logits_match_official(oracle):
    model, _, root = oracle
    output = model(
        input_ids=load(root, "inputs/input_ids"),
        images=load(root, "inputs/images"),
        images_aux=load(root, "inputs/images_aux"),
    )
    reference = load(root, "reference/logits")
    assert output.logits.shape == reference.shape
    assert max_diff(output.logits, reference) <= 1e-4


@torch.inference_mode()
def test_greedy_tokens_match_official(oracle):
    """A plain argmax loop over the full multimodal forward, as the reference's no-cache check."""
    model, processor, root = oracle
    images, images_aux = processor.preprocess([root / "inputs" / "test_image.png"])  # end to end from the PNG
    ids = load(root, "inputs/input_ids")
    new_tokens = []
    for _ in range(8):
        next_id = model(input_ids=ids, images=images, images_aux=images_aux).logits[0, -1].argmax()
        new_tokens.append(int(next_id))
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    expected = json.loads((root / "reference" / "result.json").read_text())["greedy_new_token_ids"]
    assert new_tokens == expected


def test_gemma_mlp_uses_exact_gelu(oracle_dir):
    """transformers 5 rewrites Gemma's hidden_act "gelu" to tanh-GELU; MGM-2B (transformers 4.38) used erf."""
    from mgmflow.models.mgm import MGMConfig

    raw = json.loads((oracle_dir / "mgm_gemma" / "checkpoint" / "config.json").read_text())
    config = MGMConfig.from_dict(raw)
    assert config.backbone == "gemma"
    assert config.text_config.hidden_act == "gelu"
    from transformers.activations import ACT2FN

    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(ACT2FN[config.text_config.hidden_act](x), torch.nn.functional.gelu(x), atol=0)


@torch.inference_mode()
def test_oracle_tells_the_two_gelus_apart(oracle_dir):
    """The pin matters: with tanh-GELU (what transformers 5 would pick) the logits leave the tolerance."""
    from mgmflow.models.mgm import load_pretrained
    from transformers.activations import ACT2FN

    root = oracle_dir / "mgm_gemma"
    model, _ = load_pretrained(root / "checkpoint")
    for layer in model.language_model.model.layers:
        layer.mlp.act_fn = ACT2FN["gelu_pytorch_tanh"]
    logits = model(
        input_ids=load(root, "inputs/input_ids"),
        images=load(root, "inputs/images"),
        images_aux=load(root, "inputs/images_aux"),
    ).logits
    assert max_diff(logits, load(root, "reference/logits")) > 1e-4
