"""Both caches through the public chat path: same answers, fewer computations, bounded bytes."""

import numpy as np
import pytest
import torch
from PIL import Image

from mgmflow.models.mgm import ChatRequest, MGMEngine, Message
from mgmflow.models.mgm.cache import ByteLRU

pytestmark = pytest.mark.timeout(180)


def _image(seed):
    return Image.fromarray((np.random.RandomState(seed).rand(40, 56, 3) * 255).astype("uint8"))


@pytest.fixture
def engine(mgmflow_home):
    return MGMEngine.from_pretrained("tiny")


def test_byte_lru_evicts_least_recently_used_within_its_budget():
    lru = ByteLRU(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # "b" is now the least recently used
    lru.put("c", 3, 40)
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    lru.put("huge", 4, 101)  # larger than the budget: not kept, nothing evicted for it
    stats = lru.stats()
    assert (stats.bytes, stats.entries, stats.evictions, stats.hits, stats.misses) == (80, 2, 1, 3, 1)


def test_visual_features_are_reused_by_image_content(engine, monkeypatch):
    calls = []
    encode = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda *a: calls.append(a[0].shape[0]) or encode(*a))
    question = [Message("user", "What is it?", [_image(0)])]
    [first] = engine.chat([ChatRequest(question, max_new_tokens=10)])
    # Same pixels in a new object: no second encoding.
    again = [Message("user", "What is it?", [_image(0).copy()])]
    [second] = engine.chat([ChatRequest(again, max_new_tokens=10)])
    assert calls == [1] and second.text == first.text
    assert engine.cache_stats()["visual"].hits == 1
    engine.chat([ChatRequest([Message("user", "And this?", [_image(1), _image(0)])], max_new_tokens=4)])
    assert calls == [1, 1]  # only the new image was encoded


def _second_turn(engine, first_answer, cache_key):
    messages = [Message("user", "What is in the image?", [_image(2)]), Message("assistant", first_answer),
                Message("user", "Tell me more about its colours.")]
    return engine.chat([ChatRequest(messages, max_new_tokens=16, cache_key=cache_key)])[0]


def test_next_turn_reuses_the_thread_prefix_and_answers_the_same(engine, monkeypatch):
    prefilled = []
    language_model = engine.model.language_model
    forward = language_model.forward

    def counting_forward(*args, **kwargs):
        if kwargs.get("inputs_embeds") is not None:
            prefilled.append(kwargs["inputs_embeds"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(language_model, "forward", counting_forward)
    [first] = engine.chat([ChatRequest([Message("user", "What is in the image?", [_image(2)])], max_new_tokens=12,
                                       cache_key="thread-1")])
    with_cache = _second_turn(engine, first.text, "thread-1")
    without_cache = _second_turn(engine, first.text, None)
    assert with_cache.text == without_cache.text
    assert with_cache.prompt_tokens == without_cache.prompt_tokens
    full, reused = prefilled[2], prefilled[1]
    assert full == with_cache.prompt_tokens and reused < full - engine.model.num_visual_tokens
    stats = engine.cache_stats()["prefix"]
    assert stats.hits == 1 and stats.entries == 1 and stats.bytes > 0


def test_prefix_cache_stays_within_its_byte_budget(mgmflow_home):
    engine = MGMEngine.from_pretrained("tiny", prefix_cache_bytes=300_000)
    for thread in range(4):
        engine.chat([ChatRequest([Message("user", "Describe it.", [_image(thread)])], max_new_tokens=8,
                                 cache_key=f"t{thread}")])
    stats = engine.cache_stats()["prefix"]
    assert 0 < stats.bytes <= 300_000 and stats.evictions >= 1 and stats.entries < 4


def test_cached_kv_is_detached_from_the_batch(engine):
    engine.chat([ChatRequest([Message("user", "a")], max_new_tokens=3, cache_key="x"),
                 ChatRequest([Message("user", "bbbbbbbb bbbbbbb")], max_new_tokens=3)])
    entry = engine.prefix_cache._lru.get("x")
    assert entry.past[0][0].shape[0] == 1 and not torch.isnan(entry.past[0][0]).any()


def _held_bytes(tensors):
    """Bytes of memory the tensors keep alive: each distinct storage once, whole, whatever the views."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_visual_cache_holds_no_more_bytes_than_its_budget(mgmflow_home):
    probe = MGMEngine.from_pretrained("tiny")
    one_image = probe.model.num_visual_tokens * probe.model.config.hidden_size * probe.model.dtype.itemsize
    engine = MGMEngine.from_pretrained("tiny", visual_cache_bytes=2 * one_image)
    images = [_image(seed) for seed in range(10, 16)]  # six new images in one request: one encoding batch
    engine.chat([ChatRequest([Message("user", "Compare them.", images)], max_new_tokens=2)])
    from mgmflow.models.mgm.cache import image_digest

    kept = [t for t in (engine.visual_cache.get(image_digest(i)) for i in images) if t is not None]
    assert len(kept) == 2
    assert _held_bytes(kept) <= 2 * one_image  # the entries own their rows; no batch tensor pinned behind them


def test_vision_encoders_run_in_chunks_within_their_byte_budget(mgmflow_home, monkeypatch):
    from mgmflow.models.mgm.engine import vision_bytes_per_image

    whole = MGMEngine.from_pretrained("tiny")
    per_image = vision_bytes_per_image(whole.model.config, whole.model.dtype)
    chunked = MGMEngine.from_pretrained("tiny", vision_batch_bytes=2 * per_image + 1)
    batches = []
    encode = chunked.model.encode_images
    monkeypatch.setattr(chunked.model, "encode_images", lambda *a: batches.append(a[0].shape[0]) or encode(*a))
    request = ChatRequest([Message("user", "Compare them.", [_image(seed) for seed in range(20, 25)])],
                          max_new_tokens=8)
    assert [r.text for r in chunked.chat([request])] == [r.text for r in whole.chat([request])]
    assert batches == [2, 2, 1]
