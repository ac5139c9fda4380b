"""Worker parts without services: model cache, queue resolution, per-GPU processes."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from pydantic import ValidationError

from mgmflow.models.errors import InvalidInputError, ResourceExhaustedError
from mgmflow.workers.model_cache import ModelCache, engine_bytes
from mgmflow.workers.settings import Settings
from mgmflow.workers.worker import WorkerStartError, concurrency_for, parse_models, resolve_queues, run_per_gpu


class FakeEngine:
    def __init__(self, name: str, floats: int):
        self.name = name
        self.pipeline = {"unet": torch.nn.Linear(floats, 1, bias=False)}


def test_model_cache_keeps_within_budget_evicting_the_least_recently_used():
    loads = []

    def loader(engine, name, loras):
        loads.append(name)
        return FakeEngine(name, 1000)  # 4000 bytes

    cache = ModelCache(budget_bytes=9000, loader=loader)
    a = cache.get("diffusion", "a")
    assert engine_bytes(a) == 4000 and cache.get("edit", "a") is a  # edit and diffusion share engines
    cache.get("vlm", "b")
    cache.get("diffusion", "a")  # a is now the most recently used
    cache.get("diffusion", "c")  # evicts b
    assert [name for _, name, _, _ in cache.loaded()] == ["a", "c"]
    cache.get("diffusion", "a", (("style.safetensors", 0.5),))  # adapters make another engine; evicts plain a
    assert [(name, loras) for _, name, loras, _ in cache.loaded()] == [("c", ()), ("a", (("style.safetensors", 0.5),))]
    assert loads == ["a", "b", "c", "a"]


def test_out_of_memory_becomes_a_retryable_error():
    cache = ModelCache()
    with pytest.raises(ResourceExhaustedError) as caught:
        with cache.guard():
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert caught.value.retryable
    with pytest.raises(ValueError):
        with cache.guard():
            raise ValueError("not a memory problem")


def test_queues_models_and_threads():
    settings = Settings(vlm_batch_size=8, diffusion_batch_size=4)
    assert resolve_queues(settings, [], {}) == ["vlm.tiny", "diffusion.tiny", "edit.tiny", "edit.tiny-ip2p",
                                                "orchestrator"]
    assert resolve_queues(settings, ["vlm", "diffusion.sdxl-base"], {"vlm": "mgm-7b"}) == ["vlm.mgm-7b",
                                                                                           "diffusion.sdxl-base"]
    assert parse_models(["mgm-7b"], ["vlm"]) == {"vlm": "mgm-7b"}
    with pytest.raises(WorkerStartError, match="say which family"):
        parse_models(["mgm-7b"], ["vlm", "diffusion"])
    assert concurrency_for(settings, ["vlm.tiny"]) == 8
    assert concurrency_for(settings, ["edit.tiny"]) == 4
    assert concurrency_for(settings, ["test"]) == 1
    assert settings.visibility_timeout == 15 and Settings(vlm_model="mgm-7b").visibility_timeout == 3600


def test_one_process_per_gpu_each_seeing_only_its_gpu(tmp_path):
    script = ("import os, sys, pathlib; gpu = os.environ['CUDA_VISIBLE_DEVICES']; "
              f"pathlib.Path(r'{tmp_path}', gpu).write_text(' '.join(sys.argv[1:]))")
    assert run_per_gpu([sys.executable, "-c", script], ["0", "1"], "gpu") == 0
    assert (tmp_path / "0").read_text() == "--gpus=0 --name=gpu0"
    assert (tmp_path / "1").read_text() == "--gpus=1 --name=gpu1"


def test_chat_turns_are_laid_out_as_the_templates_were_trained():
    from mgmflow.models.mgm.conversation import Turn, get_template
    from mgmflow.workers.tasks.vlm import MessageInput, template_turns

    def turns(*pairs):
        return [MessageInput(role=role, text=text) for role, text in pairs]

    # Runs of one role become one turn; an opening or closing assistant turn gets an empty user turn beside it.
    laid_out = template_turns(turns(("system", "s"), ("assistant", "hello"), ("user", "a"), ("user", "b"),
                                    ("assistant", "c"), ("assistant", "d")))
    assert [(t.role, t.text) for t in laid_out] == [("system", "s"), ("user", ""), ("assistant", "hello"),
                                                    ("user", "a\n\nb"), ("assistant", "c\n\nd"), ("user", "")]
    assert template_turns(turns(("user", "q"))) == turns(("user", "q"))  # already alternating: unchanged
    long = "x" * 10_000  # two tool results, each within a message's limit, merged past it
    assert len(template_turns(turns(("user", long), ("user", long)))[0].text) == 20_002
    # The pictures an assistant drew open the user turn after it (MGM sees images in user turns only).
    drew = template_turns([MessageInput(role="user", text="Draw a dog."),
                           MessageInput(role="assistant", text="Here it is.", images=["dog"]),
                           MessageInput(role="user", text="What colour is it?", images=["cat"])])
    assert [(t.role, t.images) for t in drew] == [("user", []), ("assistant", []), ("user", ["dog", "cat"])]
    prompt = get_template("vicuna_v1").render([Turn(t.role, t.text, len(t.images)) for t in laid_out])
    assert prompt.endswith("ASSISTANT: c\n\nd</s>USER:  ASSISTANT:")  # the reply is a new assistant turn


SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "cpu"}


def test_vlm_placement_and_quantization_settings_reach_the_loader(monkeypatch, mgmflow_home):
    """MGMFLOW_VLM_DEVICE_MAP / MGMFLOW_VLM_QUANTIZATION → Settings → the worker's model cache → load_pretrained."""
    monkeypatch.setenv("MGMFLOW_VLM_DEVICE_MAP", json.dumps(SPLIT))
    settings = Settings()
    assert settings.vlm_device_map == SPLIT and settings.vlm_quantization is None
    engine = ModelCache.from_settings(settings).get("vlm", "tiny")
    assert engine.model.language_model.hf_device_map == SPLIT
    assert engine_bytes(engine) < engine_bytes(ModelCache().get("vlm", "tiny"))  # disk-offloaded weights: no RAM
    monkeypatch.setenv("MGMFLOW_VLM_DEVICE_MAP", "auto")
    assert Settings().vlm_device_map == "auto"

    monkeypatch.delenv("MGMFLOW_VLM_DEVICE_MAP")
    monkeypatch.setenv("MGMFLOW_VLM_QUANTIZATION", "4bit")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InvalidInputError, match="4bit loading quantizes the LLM with bitsandbytes, which needs a CUDA"):
        ModelCache.from_settings(Settings()).get("vlm", "tiny")
    ModelCache.from_settings(Settings()).get("diffusion", "tiny")  # VLM settings never reach the diffusion engine
    monkeypatch.setenv("MGMFLOW_VLM_QUANTIZATION", "3bit")
    with pytest.raises(ValidationError, match="vlm_quantization"):
        Settings()
    monkeypatch.delenv("MGMFLOW_VLM_QUANTIZATION")
    monkeypatch.setenv("MGMFLOW_VLM_DEVICE_MAP", "quick")
    with pytest.raises(ValidationError, match="vlm_device_map"):
        Settings()
