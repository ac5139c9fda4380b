"""Where the weights go: a device map splitting the LLM over two placements, and 4/8-bit quantization's limits.

A CPU has one compute device, so the split here is CPU + disk: accelerate's hooks stream the offloaded layer's
weights in for each forward, the same dispatch path that moves activations between GPUs of a multi-GPU map.
"""

import pytest
import torch
from test_modeling import picture

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm import ChatRequest, MGMEngine, Message, load_pretrained
from mgmflow.models.mgm import loading

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "cpu"}


def test_a_device_map_splits_the_llm_and_answers_as_the_whole_model(tiny_mgm):
    whole, processor = tiny_mgm
    split, _ = load_pretrained("tiny", device_map=SPLIT)
    llm = split.language_model
    assert llm.hf_device_map == SPLIT
    assert llm.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # streamed in from the checkpoint
    assert llm.model.layers[0].mlp.down_proj.weight.device.type == "cpu"
    assert split.vision_tower.device == split.mm_projector[0].weight.device == torch.device("cpu")

    requests = [
        ChatRequest([Message("user", "what is this?", [picture(1)])], max_new_tokens=8),
        ChatRequest([Message("user", "a story, please")], max_new_tokens=8, temperature=0.8, seed=3),
    ]
    expected = MGMEngine(whole, processor, model_id="tiny").chat(requests)
    answered = MGMEngine(split, processor, model_id="tiny").chat(requests)
    assert [r.text for r in answered] == [r.text for r in expected]


def test_the_engine_passes_placement_and_quantization_to_the_loader(monkeypatch):
    engine = MGMEngine.from_pretrained("tiny", device_map=SPLIT)
    assert engine.model.language_model.hf_device_map == SPLIT
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="4bit loading quantizes the LLM"):
        MGMEngine.from_pretrained("tiny", quantization="4bit")


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_is_refused_before_any_weight_is_read_where_it_cannot_run(quantization, monkeypatch):
    def no_reading(folder):
        raise AssertionError("weights were read before the quantization was checked")

    monkeypatch.setattr(loading, "CheckpointFiles", no_reading)
    with pytest.raises(InvalidInputError, match="quantization must be one of"):
        load_pretrained("tiny", quantization="3bit")
    needs = f"{quantization} loading quantizes the LLM with bitsandbytes, which needs a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match=f"{needs}: there is no CUDA device here"):
        load_pretrained("tiny", quantization=quantization)
    # A CUDA machine: the model must be asked for there, and bitsandbytes must be installed.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(InvalidInputError, match=f"{needs}: the model was asked for on cpu"):
        load_pretrained("tiny", device="cpu", quantization=quantization)
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidInputError, match=f"{needs} and the bitsandbytes package: pip install bitsandbytes"):
        loading.quantization_config(quantization, torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ("quick", "device_map 'quick' is neither a strategy .*auto.*nor a device"),
        ({"model.layers.1": "cuda:31"}, "model.layers.1 on .cuda:31., but this machine has 0 visible CUDA device"),
        ({"model.layers.1": 31}, "model.layers.1 on 31, but this machine has 0 visible CUDA device"),
        ({"model.layers.1": "tpu"}, "model.layers.1 on 'tpu'"),
        ({}, "device_map is empty"),
        (["cpu"], "device_map must be"),
    ],
)
def test_bad_device_maps_are_typed_errors(device_map, message):
    with pytest.raises(InvalidInputError, match=message):
        load_pretrained("tiny", device_map=device_map)


def test_mgmflow_chat_takes_the_placement_flags(mgmflow_home, monkeypatch):
    import json

    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main

    ask = ["chat", "hello there", "--max-new-tokens", "6"]
    whole = CliRunner().invoke(main, ask)
    split = CliRunner().invoke(main, [*ask, "--device-map", json.dumps(SPLIT)])
    assert whole.exit_code == split.exit_code == 0, split.output
    assert split.stdout == whole.stdout
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused = CliRunner().invoke(main, [*ask, "--load-4bit"])
    assert refused.exit_code == 2
    assert "error: 4bit loading quantizes the LLM with bitsandbytes, which needs a CUDA GPU" in refused.output
