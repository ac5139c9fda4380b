"""Presets: the fixed tiny tokenizer, deterministic tiny checkpoints built atomically, released names."""

import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest

from mgmflow.models.errors import ModelNotFoundError
from mgmflow.models.mgm import presets
from mgmflow.models.mgm.tokenizer import VOCAB_FILE, load_tiny_tokenizer, vocabulary_sha256

# Changes only when scripts/build_tiny_tokenizer.py is rerun on purpose.
TINY_VOCABULARY_SHA256 = "acf259fabf8d85a1592eb4040ad7efe41861c7692ca5eb680b0813c3ebeea451"
TEMPLATE_TOKENS = [
    "<s>", "</s>", "<unk>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>",
    "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("family", "bos"), [("llama", "<s>"), ("gemma", "<bos>")])
def test_tiny_tokenizer_is_the_committed_vocabulary(family, bos):
    tokenizer = load_tiny_tokenizer(family)
    assert vocabulary_sha256(tokenizer) == TINY_VOCABULARY_SHA256
    assert len(tokenizer) == 1024
    text = "<start_of_turn>user\nWhat is in the picture?<end_of_turn>"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.convert_tokens_to_ids(bos) and ids.count(ids[0]) == 1  # BOS added, once
    assert tokenizer.decode(ids, skip_special_tokens=False) == bos + text
    for token in TEMPLATE_TOKENS:
        assert tokenizer(token, add_special_tokens=False).input_ids == [tokenizer.convert_tokens_to_ids(token)]
    assert tokenizer.decode(tokenizer("naïve café ✓ 😀").input_ids, skip_special_tokens=True) == "naïve café ✓ 😀"


def test_tiny_preset_builds_identically_twice(tmp_path):
    for home in ("a", "b"):
        presets.build_tiny(presets.TINY_PRESETS["tiny-gemma"], tmp_path / home)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert sha256(tmp_path / "a" / name) == sha256(tmp_path / "b" / name), name
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "mgm_gemma" and config["hidden_act"] == "gelu"  # the official layout


def test_tiny_preset_loads_in_released_layout(tiny_mgm, mgmflow_home):
    model, processor = tiny_mgm
    folder = presets.resolve("tiny")
    assert folder == presets.resolve("tiny-llama")
    assert folder.parent == mgmflow_home / "presets" and folder.name.startswith("tiny-llama-")
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert processor.tokenizer is not None and model.config.backbone == "llama"
    assert processor.tokenizer.bos_token_id == model.config.text_config.bos_token_id


def _race(barrier, results, name):
    barrier.wait()  # all processes enter the build at once
    results.put(str(presets.resolve(name)))


@pytest.mark.timeout(120)
def test_concurrent_builds_end_with_one_complete_folder(tmp_path, monkeypatch):
    """Three processes (forked: torch is already imported) build the same preset at the same moment."""
    monkeypatch.setenv("MGMFLOW_HOME", str(tmp_path))
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(3), context.Queue()
    racers = [context.Process(target=_race, args=(barrier, results, "tiny-gemma")) for _ in range(3)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(timeout=100)
    assert [racer.exitcode for racer in racers] == [0, 0, 0]
    outputs = {results.get(timeout=5) for _ in racers}
    assert len(outputs) == 1
    entries = list((tmp_path / "presets").iterdir())
    assert [e.name for e in entries] == [Path(outputs.pop()).name]  # no staging folder left behind
    from mgmflow.models.mgm import load_pretrained

    load_pretrained(entries[0])  # complete and loadable


def test_released_presets_point_to_hub_ids_or_local_folders(tmp_path, monkeypatch, oracle_dir):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    monkeypatch.setenv("MGMFLOW_MODELS_DIR", str(tmp_path / "models"))
    with pytest.raises(ModelNotFoundError, match=r"YanweiLi/MGM-8x7B-HD.*`hf download YanweiLi/MGM-8x7B-HD --local-dir ") as error:
        presets.resolve("mgm-8x7b-hd")
    assert str(tmp_path / "models" / "mgm-8x7b-hd") in str(error.value)

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "mgm-7b").symlink_to(oracle_dir / "mgm_llama" / "checkpoint")
    assert presets.resolve("MGM-7B") == tmp_path / "models" / "mgm-7b"

    listed = {info.name: info for info in presets.list_presets()}
    # Tiny presets are named as every command names them ("tiny", not "tiny-llama"), and are always available.
    assert set(presets.REAL_PRESETS) | {"tiny", "tiny-gemma", "tiny-hd", "small"} == set(listed)
    assert all(listed[name].available and listed[name].kind == "tiny" for name in ("tiny", "tiny-gemma", "small"))
    assert listed["mgm-7b"].available and not listed["mgm-34b"].available
    assert "YanweiLi/MGM-34B" in listed["mgm-34b"].location


def test_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError, match="presets: tiny"):
        presets.resolve("mgm-70b")
    with pytest.raises(ModelNotFoundError):
        presets.resolve(tmp_path / "nothing-here")


def test_vocabulary_file_is_committed_data():
    """The tokenizer is loaded from the data file, never trained at run time."""
    assert VOCAB_FILE.is_file() and json.loads(VOCAB_FILE.read_text())["model"]["type"] == "BPE"
