"""Loading released layouts as they are: file formats, sharding, legacy names, towers from folders, bad weights.

Variants are built from the official LLaMA fixture in temporary folders; each must give the official logits.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mgmflow.models.errors import InvalidInputError, ModelNotFoundError
from mgmflow.models.mgm import MGMConfig, MGMForCausalLM, load_pretrained
from mgmflow.models.mgm.configuration import detect_backbone
from mgmflow.models.mgm.loading import resolve_device_dtype

CLIP_TOWER = "model_zoo/OpenAI/clip-vit-tiny-patch14-84"
AUX_TOWER = "model_zoo/OpenAI/openclip-convnext-large-d-320-tiny-random"


@pytest.fixture(scope="module")
def llama_root(oracle_dir):
    return oracle_dir / "mgm_llama"


@pytest.fixture(scope="module")
def reference_logits(llama_root):
    return torch.from_numpy(np.load(llama_root / "reference" / "logits.npy"))


@pytest.fixture
def checkpoint_copy(llama_root, tmp_path):
    """A writable copy of the fixture checkpoint (config and tower folders; weights left to the test) and its
    tensors. The tiny CLIP's 32-wide heads are not in its weights: its config comes from the tower folder."""
    folder = tmp_path / "checkpoint"
    source = llama_root / "checkpoint"
    shutil.copytree(source, folder, ignore=lambda path, names: [n for n in names if is_weights(path, n, source)])
    return folder, load_file(source / "model.safetensors")


def is_weights(path, name, source) -> bool:
    return path == str(source) and name.startswith("model.")


def without_clip(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("model.vision_tower.")}


def without_towers(tensors):
    return {k: v for k, v in tensors.items() if not k.startswith("model.vision_tower")}


@torch.inference_mode()
def logits_of(model, root):
    load = lambda name: torch.from_numpy(np.load(root / "inputs" / f"{name}.npy"))  # noqa: E731
    return model(input_ids=load("input_ids"), images=load("images"), images_aux=load("images_aux")).logits


def assert_official(folder, root, reference_logits, **kwargs):
    model, processor = load_pretrained(folder, **kwargs)
    assert (logits_of(model, root) - reference_logits).abs().max() <= 1e-4
    return model, processor


def test_single_bin_file(checkpoint_copy, llama_root, reference_logits):
    folder, tensors = checkpoint_copy
    torch.save(tensors, folder / "pytorch_model.bin")
    assert_official(folder, llama_root, reference_logits)


def test_sharded_safetensors_with_index(checkpoint_copy, llama_root, reference_logits):
    folder, tensors = checkpoint_copy
    write_shards(folder, tensors, "model-{i:05d}-of-00003.safetensors", "model.safetensors.index.json", save_file)
    assert_official(folder, llama_root, reference_logits)


def test_sharded_bin_with_index(checkpoint_copy, llama_root, reference_logits):
    folder, tensors = checkpoint_copy
    write_shards(folder, tensors, "pytorch_model-{i:05d}-of-00003.bin", "pytorch_model.bin.index.json", torch.save)
    assert_official(folder, llama_root, reference_logits)


def write_shards(folder, tensors, pattern, index_name, save):
    """Three shards that cut through both the LLM and the vision keys, plus the index."""
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate(np.array_split(np.array(keys), 3), start=1):
        part, name = part.tolist(), pattern.format(i=i)
        save({k: tensors[k] for k in part}, folder / name)
        weight_map.update({k: name for k in part})
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_legacy_mini_gemini_names_and_keys(checkpoint_copy, llama_root, reference_logits):
    folder, tensors = checkpoint_copy
    save_file(tensors, folder / "model.safetensors")
    raw = json.loads((folder / "config.json").read_text())
    raw.update(model_type="mini_gemini", architectures=["MiniGeminiLlamaForCausalLM"])
    raw.update(aux_img_fold=False, aux_with_fpn=False)
    for key in ("mm_hidden_size", "mm_hidden_size_aux", "image_grid", "image_global", "tokenizer_padding_side"):
        del raw[key]  # absent from configs older than these settings: their defaults / the towers stand in
    (folder / "config.json").write_text(json.dumps(raw))
    assert_official(folder, llama_root, reference_logits)


def test_towers_from_folders_when_absent_from_checkpoint(checkpoint_copy, llama_root, reference_logits, tmp_path):
    folder, tensors = checkpoint_copy
    save_file(without_towers(tensors), folder / "model.safetensors")
    shutil.rmtree(folder / "model_zoo")

    with pytest.raises(ModelNotFoundError, match="vision_tower="):
        load_pretrained(folder)  # the config's model_zoo/ paths do not exist next to this copy

    # An open_clip folder in its .bin form, and the CLIP HF folder as released.
    aux_folder = tmp_path / "convnext"
    aux_folder.mkdir()
    source_aux = llama_root / "checkpoint" / AUX_TOWER
    torch.save(load_file(source_aux / "open_clip_model.safetensors"), aux_folder / "open_clip_pytorch_model.bin")
    shutil.copy(source_aux / "open_clip_config.json", aux_folder)
    assert_official(
        folder,
        llama_root,
        reference_logits,
        vision_tower=llama_root / "checkpoint" / CLIP_TOWER,
        vision_tower_aux=aux_folder,
    )


def test_full_clip_folder_as_vision_tower(checkpoint_copy, llama_root, reference_logits, tmp_path):
    """openai/clip-vit-large-patch14-336 is a whole CLIPModel (text tower included): its vision part is used."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    folder, tensors = checkpoint_copy
    save_file(without_clip(tensors), folder / "model.safetensors")
    vision = CLIPVisionModel.from_pretrained(llama_root / "checkpoint" / CLIP_TOWER)
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.config.to_dict(), projection_dim=16))
    clip.vision_model.load_state_dict(vision.state_dict())
    clip.save_pretrained(tmp_path / "clip-vit-full")
    shutil.rmtree(folder / "model_zoo" / "OpenAI" / "clip-vit-tiny-patch14-84")
    assert_official(folder, llama_root, reference_logits, vision_tower=tmp_path / "clip-vit-full")


def test_tower_paths_of_config_resolve_against_the_checkpoint(checkpoint_copy, llama_root, reference_logits):
    """Without tower keys and without arguments, config.json's relative model_zoo/ paths are used if present."""
    folder, tensors = checkpoint_copy
    save_file(without_towers(tensors), folder / "model.safetensors")
    assert_official(folder, llama_root, reference_logits)


def test_tower_keys_without_tower_config(checkpoint_copy, llama_root, reference_logits):
    """Tower weights in the checkpoint but no CLIP config anywhere: a 32-wide tower's head count is unknowable
    (released ViT-L/14 towers have OpenAI's 64-wide heads and need nothing); a given folder supplies it."""
    folder, tensors = checkpoint_copy
    save_file(tensors, folder / "model.safetensors")
    shutil.move(folder / "model_zoo", folder.parent / "towers")
    with pytest.raises(ModelNotFoundError, match="head count"):
        load_pretrained(folder)
    clip_folder = folder.parent / "towers" / CLIP_TOWER.removeprefix("model_zoo/")
    assert_official(folder, llama_root, reference_logits, vision_tower=clip_folder)


@pytest.mark.parametrize(
    "key",
    ["model.vlm_uni_query_projector.1.weight", "model.layers.1.mlp.up_proj.weight", "lm_head.weight"],
)
def test_missing_weight_is_named(checkpoint_copy, key):
    folder, tensors = checkpoint_copy
    del tensors[key]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match=f"missing weights: .*{key.replace('.', '[.]')}"):
        load_pretrained(folder)


@pytest.mark.parametrize("key", ["model.vlm_uni_extra_projector.weight", "model.layers.7.mlp.up_proj.weight"])
def test_unexpected_weight_is_named(checkpoint_copy, key):
    folder, tensors = checkpoint_copy
    tensors[key] = torch.zeros(3)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match=f"unexpected weights: .*{key.replace('.', '[.]')}"):
        load_pretrained(folder)


@pytest.mark.parametrize(
    ("key", "shape"), [("model.mm_projector.2.weight", [64, 63]), ("model.layers.0.mlp.up_proj.weight", [170, 64])]
)
def test_wrong_shape_is_named(checkpoint_copy, key, shape):
    folder, tensors = checkpoint_copy
    tensors[key] = torch.zeros(shape)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match=rf"wrong shape: {key.replace('.', '[.]')} \[{shape[0]}, {shape[1]}\]"):
        load_pretrained(folder)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_pretrained(tmp_path)  # no config.json
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InvalidInputError, match="not a Mini-Gemini"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("fields", "backbone"),
    [
        ({"model_type": "mgm", "hidden_act": "silu"}, "llama"),
        ({"model_type": "mgm", "hidden_act": "gelu", "head_dim": 256}, "gemma"),  # a gemma config under "mgm"
        ({"model_type": "mini_gemini_gemma", "hidden_act": "gelu_pytorch_tanh"}, "gemma"),
        ({"model_type": "mgm", "hidden_act": "silu", "num_local_experts": 8}, "mixtral"),
        ({"model_type": "mgm_mistral", "hidden_act": "silu", "sliding_window": 4096}, "mistral"),
    ],
)
def test_backbone_from_fields(fields, backbone):
    assert detect_backbone(fields) == backbone


def test_tiny_mixtral_round_trip_through_transformers(tmp_path):
    """transformers 5 fuses Mixtral's experts on load; the saved folder keeps the released (unfused) names."""
    from transformers import CLIPVisionConfig, MixtralConfig

    from mgmflow.models.mgm.initialization import init_deterministic_

    text_config = MixtralConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
    )  # fmt: skip
    config = MGMConfig(
        text_config=text_config,
        backbone="mixtral",
        mm_hidden_size=64,
        mm_hidden_size_aux=120,
        image_size_aux=192,
        vision_config=CLIPVisionConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=84,
            patch_size=14, hidden_act="quick_gelu",
        ),  # fmt: skip
        aux_depths=(1, 1, 2, 1),
        aux_dims=(8, 16, 32, 64),
    )
    original = MGMForCausalLM.from_config(config)
    init_deterministic_(original, seed=7)
    original.save_pretrained(tmp_path)

    keys = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys  # as MGM-8x7B ships
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "mgm_mixtral"

    loaded, _ = load_pretrained(tmp_path)
    assert type(loaded.language_model).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([[1, 5, 9, -200, 17, 3]])
    images, images_aux = torch.randn(1, 3, 84, 84), torch.randn(1, 3, 192, 192)
    with torch.inference_mode():
        expected = original(input_ids=ids, images=images, images_aux=images_aux).logits
        actual = loaded(input_ids=ids, images=images, images_aux=images_aux).logits
    assert torch.equal(expected, actual)


def test_device_and_dtype_defaults():
    assert resolve_device_dtype("cpu", None) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(InvalidInputError):
        resolve_device_dtype("cpu", "int8")
    with pytest.raises(InvalidInputError):
        resolve_device_dtype("cpu", "float17")


def test_half_precision_load_runs(llama_root, reference_logits):
    model, _ = load_pretrained(llama_root / "checkpoint", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.language_model.dtype == torch.bfloat16
    logits = logits_of(model, llama_root)
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - reference_logits).abs().max() < 0.5  # bf16 rounding, not a different model


def test_device_map_path(llama_root, reference_logits):
    """The multi-GPU path (transformers places the LLM, the towers follow its embeddings), on the one CPU."""
    model, _ = assert_official(llama_root / "checkpoint", llama_root, reference_logits, device_map={"": "cpu"})
    assert model.device == torch.device("cpu") and not any(p.requires_grad for p in model.parameters())


def test_missing_tower_folder_is_named(llama_root):
    with pytest.raises(ModelNotFoundError, match="no-such-clip"):
        load_pretrained(llama_root / "checkpoint", vision_tower="/nowhere/no-such-clip")
