"""Presets: tiny ones built deterministically and cached atomically; real ones found locally or named as missing."""

import hashlib
import io
import os
import shutil
import threading

import pytest
import torch
from diffusion_support import pixels
from PIL import Image
from safetensors.torch import save_file

from mgmflow.models.diffusion import presets
from mgmflow.models.diffusion.loading import display_name, inspect_checkpoint, load_pipeline
from mgmflow.models.diffusion.tiny import build_pipeline, build_tokenizer
from mgmflow.models.errors import InvalidInputError, ModelNotFoundError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def no_real_weights(tmp_path, monkeypatch):
    """Empty local model folder and an empty Hugging Face cache, whatever the machine holds."""
    import huggingface_hub.constants

    monkeypatch.setenv("MGMFLOW_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "models"


def test_tokenizer_is_the_fixed_vocabulary_with_clip_limits():
    tokenizer = build_tokenizer()
    assert tokenizer.model_max_length == 77
    ids = tokenizer("A photo of a cat, 猫!").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat , 猫 !"
    assert len(tokenizer("word " * 200, truncation=True).input_ids) == 77


def test_tiny_builds_are_deterministic():
    first, second = build_pipeline("sd").unet.state_dict(), build_pipeline("sd").unet.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    state = torch.random.get_rng_state()
    build_pipeline("sd")
    assert torch.equal(state, torch.random.get_rng_state()), "building must not move the caller's RNG"


def test_tiny_presets_are_cached_under_mgmflow_home(mgmflow_home):
    folder = presets.resolve("tiny")
    assert folder.parent == mgmflow_home / "presets" / "diffusion"
    assert folder.name.startswith("tiny-") and (folder / "model_index.json").is_file()
    assert presets.resolve("tiny") == folder


def test_concurrent_builders_agree_and_leave_no_temporary_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MGMFLOW_HOME", str(tmp_path))
    results, errors = [], []

    def build():
        try:
            results.append(presets.resolve("tiny-sd"))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(results)) == 1
    assert os.listdir(tmp_path / "presets" / "diffusion") == [results[0].name]


def test_missing_real_preset_names_both_places(no_real_weights):
    with pytest.raises(ModelNotFoundError) as caught:
        presets.resolve("sdxl-base")
    message = str(caught.value)
    assert str(no_real_weights / "sdxl-base") in message
    assert "stabilityai/stable-diffusion-xl-base-1.0" in message and "never downloads" in message
    assert f"`hf download stabilityai/stable-diffusion-xl-base-1.0 --local-dir {no_real_weights / 'sdxl-base'}`" in message


def test_real_preset_from_the_local_models_folder(no_real_weights):
    shutil.copytree(presets.resolve("tiny"), no_real_weights / "sdxl-base")
    assert presets.resolve("sdxl-base") == no_real_weights / "sdxl-base"
    ready = {info.name: info.available for info in presets.list_presets()}
    assert ready["sdxl-base"] and ready["tiny"] and not ready["sd-1.5"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("no-such-preset", "unknown diffusion model"),
        ("someone/not-cached", "not in the Hugging Face cache"),
    ],
)
def test_unknown_models_are_typed_errors(no_real_weights, name, message):
    with pytest.raises(ModelNotFoundError, match=message):
        presets.resolve(name)


def test_local_paths_must_be_pipelines(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no model_index.json"):
        presets.resolve(tmp_path)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(ModelNotFoundError, match="neither a diffusers folder nor"):
        presets.resolve(other)


def test_a_folder_path_is_recorded_by_its_name_only(tmp_path):
    folder = tmp_path / "my-model"
    shutil.copytree(presets.resolve("tiny-sd"), folder)
    assert presets.resolve(str(folder)) == folder
    assert display_name(str(folder)) == "my-model"
    assert display_name("sdxl-base") == "sdxl-base" and display_name("org/model") == "org/model"


def test_list_presets_says_where_weights_are_expected(no_real_weights):
    infos = {info.name: info for info in presets.list_presets()}
    assert set(infos) >= {"tiny", "tiny-sd", "tiny-ip2p", "tiny-sdxl-ip2p", "tiny-inpaint", "sdxl-base",
                          "playground-v2.5", "sd-1.5", "sd-2.1", "instruct-pix2pix", "sdxl-inpaint"}
    assert infos["tiny-ip2p"].task == "instruct_edit" and infos["tiny-inpaint"].task == "inpaint"
    assert "playgroundai/playground-v2.5-1024px-aesthetic" in infos["playground-v2.5"].location
    assert not infos["playground-v2.5"].available


def _checkpoint(path, keys: dict):
    save_file({key: torch.zeros(shape) for key, shape in keys.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("text_encoder_key", "in_channels", "expected"),
    [
        ("conditioner.embedders.1.model.ln_final.weight", 4, ("sdxl", 4)),
        ("conditioner.embedders.1.model.ln_final.weight", 9, ("sdxl", 9)),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", 8, ("sd", 8)),
        ("cond_stage_model.model.ln_final.weight", 4, ("sd2", 4)),
    ],
)
def test_single_file_checkpoints_are_recognised_from_their_header(tmp_path, text_encoder_key, in_channels, expected):
    path = _checkpoint(tmp_path / "model.safetensors", {
        text_encoder_key: (2,), "model.diffusion_model.input_blocks.0.0.weight": (8, in_channels, 3, 3)})
    assert inspect_checkpoint(path) == expected


def test_single_file_needs_its_configs_offline(tmp_path, no_real_weights):
    path = _checkpoint(tmp_path / "juggernaut.safetensors", {
        "conditioner.embedders.1.model.ln_final.weight": (2,),
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)})
    with pytest.raises(ModelNotFoundError, match="single-file sdxl checkpoint.*'sdxl-base'"):
        load_pipeline(presets.resolve(path), dtype=torch.float32)
    not_sd = _checkpoint(tmp_path / "other.safetensors", {"encoder.weight": (2,)})
    with pytest.raises(InvalidInputError, match="not a Stable Diffusion / SDXL checkpoint"):
        load_pipeline(not_sd, dtype=torch.float32)


def test_a_single_file_checkpoint_loads_offline_with_its_configs(tmp_path, no_real_weights, engines):
    """An SD 1.x checkpoint in the original single-file layout, configs from $MGMFLOW_MODELS_DIR/sd-1.5."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from ldm_format import ldm_state_dict

    from mgmflow.models.diffusion import DiffusionEngine, TextToImageRequest

    source = DiffusionPipeline.from_pretrained(presets.resolve("tiny-sd"))
    checkpoint = ldm_state_dict(source)
    # The stand-in is what diffusers' own conversion maps back to the very same weights.
    for converted, module in ((convert_ldm_unet_checkpoint(checkpoint, source.unet.config), source.unet),
                              (convert_ldm_vae_checkpoint(checkpoint, source.vae.config), source.vae)):
        expected = module.state_dict()
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[key].reshape(expected[key].shape), expected[key]) for key in expected)
    path = tmp_path / "dreamshaper_8.safetensors"
    save_file(checkpoint, str(path))
    shutil.copytree(presets.resolve("tiny-sd"), no_real_weights / "sd-1.5")

    engine = DiffusionEngine.from_pretrained(str(path))
    request = TextToImageRequest(prompts=["a cat"], seeds=[1], steps=2)
    [from_file] = engine.text_to_image(request)
    [from_folder] = engines("tiny-sd").text_to_image(request)
    assert from_file.parameters["model"] == "dreamshaper_8"  # the file's name, never its path
    # A1111's model hash: the checkpoint file's sha256, 10 hex digits (folders have none)
    assert from_file.parameters["model_hash"] == hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    assert f"Model hash: {from_file.parameters['model_hash']}, Model: dreamshaper_8" in Image.open(
        io.BytesIO(from_file.png)).text["parameters"]
    assert from_file.parameters | {"model": "tiny-sd", "model_hash": None} == from_folder.parameters
    assert (pixels(from_file.png) == pixels(from_folder.png)).all()
