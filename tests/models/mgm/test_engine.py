"""MGMEngine.chat on the tiny preset: batching, streaming, structure, <GEN>, and typed errors."""

import json

import numpy as np
import pytest
from PIL import Image

from mgmflow.models.errors import Cancelled, InvalidImageError, InvalidInputError
from mgmflow.models.mgm import NEGATIVE_PROMPT, ChatRequest, MGMEngine, Message

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def engine(mgmflow_home):
    return MGMEngine.from_pretrained("tiny")


def _image(seed, size=(64, 48)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def _ask(text, *images, **options):
    return ChatRequest([Message("user", text, list(images))], **options)


def test_batched_requests_answer_as_each_alone(engine):
    requests = [
        _ask("What is in the image?", _image(0), max_new_tokens=12),
        _ask("Say something long about nothing at all", max_new_tokens=20),
        _ask("Compare them.", _image(1), _image(2), max_new_tokens=16),
    ]
    together = engine.chat(requests)
    for request, result in zip(requests, together):
        [alone] = engine.chat([request])
        assert result.text == alone.text
        assert result.completion_tokens == request.max_new_tokens and result.finish_reason == "length"
    visual = engine.model.num_visual_tokens
    assert together[2].prompt_tokens - together[1].prompt_tokens > 2 * visual - 10


def test_streamed_text_is_the_answer(engine):
    pieces = {0: [], 1: []}
    results = engine.chat([_ask("Hello?", max_new_tokens=15), _ask("Why?", _image(3), max_new_tokens=9)],
                          on_token=lambda i, piece: pieces[i].append(piece))
    assert ["".join(pieces[i]) for i in range(2)] == [r.text for r in results]


def test_json_schema_answer_is_valid(engine):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
              "count": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["colour", "count"], "additionalProperties": False}
    results = engine.chat([_ask("Describe as JSON", _image(s), json_schema=schema, temperature=1.0, seed=s,
                                max_new_tokens=40) for s in range(5)])
    for result in results:
        value = json.loads(result.text)
        assert value["colour"] in ("red", "green", "blue") and 0 <= value["count"] <= 99


def test_regex_answer_matches(engine):
    [result] = engine.chat([_ask("Yes or no?", regex=r"(yes|no), because [a-z ]{1,20}\.", max_new_tokens=40)])
    assert result.finish_reason == "stop"
    assert result.text.startswith(("yes, because ", "no, because ")) and result.text.endswith(".")


def test_generate_image_required_puts_gen_in_the_user_turn_and_returns_one_prompt(engine):
    request = _ask("Draw the weekend.", _image(4), generate_image="require", max_new_tokens=48)
    prompt = engine.tokenizer.decode([i for i in engine._prepare(request).ids if i >= 0])
    assert prompt.endswith("Draw the weekend. <GEN> ASSISTANT:")
    [result] = engine.chat([request])
    assert result.finish_reason == "stop"
    assert result.image_prompt and "<h>" not in result.text and "</h>" not in result.text
    assert "watermark" in NEGATIVE_PROMPT and NEGATIVE_PROMPT.startswith("out of frame, lowres")


def test_generate_image_allowed_is_optional_as_in_the_official_code(engine):
    request = _ask("Draw the weekend.", _image(4), generate_image="allow", max_new_tokens=40)
    prompt = engine.tokenizer.decode([i for i in engine._prepare(request).ids if i >= 0])
    assert prompt.endswith("Draw the weekend. <GEN> ASSISTANT:")
    [result] = engine.chat([request])
    # The random model writes no block: no prompt is made up, and its answer is not cut to make room for one.
    assert result.image_prompt is None and result.finish_reason == "length" and result.completion_tokens == 40


def test_generate_image_allowed_takes_the_block_the_model_writes(engine, monkeypatch):
    from testkit import script_mgm_answers

    script_mgm_answers(monkeypatch, "A dog, because weekends are for walks. <h>a happy dog in a sunny park</h>")
    [result] = engine.chat([_ask("Draw the weekend.", generate_image="allow", max_new_tokens=64)])
    assert result.finish_reason == "stop"
    assert result.text == "A dog, because weekends are for walks."
    assert result.image_prompt == "a happy dog in a sunny park"


def test_structured_answer_cut_by_max_new_tokens_says_so(engine):
    [result] = engine.chat([_ask("JSON please", json_schema={"type": "object", "properties": {
        "story": {"type": "string"}}, "required": ["story"]}, temperature=1.0, seed=1, max_new_tokens=4)])
    assert result.finish_reason == "length"
    with pytest.raises(ValueError):
        json.loads(result.text)


def test_template_stop_token_is_a_stop(engine):
    assert engine.template.name == "vicuna_v1"
    assert engine.tokenizer.convert_tokens_to_ids("</s>") in engine.stop_token_ids


def test_prompt_longer_than_the_context_is_refused(engine):
    with pytest.raises(InvalidInputError, match="context"):
        engine.chat([_ask("word " * 5000)])


@pytest.mark.parametrize(
    "request_",
    [_ask("word " * 5000), _ask("x", json_schema={"type": "objekt"}),
     _ask("x", regex="(unclosed"), _ask("x", generate_image="require", max_new_tokens=8)],
)
def test_validate_finds_bad_requests_without_running_the_model(engine, request_, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("validate ran the model")

    monkeypatch.setattr(engine.model, "encode_images", no_model_work)
    monkeypatch.setattr("mgmflow.models.mgm.engine.generate", no_model_work)
    with pytest.raises(InvalidInputError):
        engine.validate(request_)


def test_validate_accepts_a_good_request(engine):
    engine.validate(_ask("What is it?", _image(0), json_schema={"type": "object"}))


def test_bad_image_is_a_typed_error(engine):
    with pytest.raises(InvalidImageError):
        engine.chat([_ask("what?", b"not an image")])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"json_schema": {"type": "object"}, "generate_image": "allow"},
        {"generate_image": True},
        {"generate_image": "always"},
        {"json_schema": {"type": "object"}, "regex": "a"},
        {"max_new_tokens": 0},
        {"temperature": -0.5},
        {"stop": "x"},
    ],
)
def test_bad_requests_are_refused(kwargs):
    with pytest.raises(InvalidInputError):
        _ask("hi", **kwargs)


def test_bad_roles_are_refused(engine):
    with pytest.raises(InvalidInputError):
        Message("robot", "hi")
    with pytest.raises(InvalidInputError):
        engine.chat([ChatRequest([Message("assistant", "hi")])])


def test_check_cancels_between_tokens(engine):
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Cancelled("user cancelled")

    with pytest.raises(Cancelled):
        engine.chat([_ask("Go on", max_new_tokens=50)], check=check)


def test_compatibility_key_groups_by_image_count(engine):
    assert engine.compatibility_key(_ask("a", _image(0))) == engine.compatibility_key(_ask("b", _image(1)))
    assert engine.compatibility_key(_ask("a")) != engine.compatibility_key(_ask("a", _image(0)))


def test_gemma_preset_uses_the_gemma_template_and_its_stops(mgmflow_home):
    engine = MGMEngine.from_pretrained("tiny-gemma")
    vocab = engine.tokenizer.get_vocab()
    assert engine.template.name == "gemma"
    assert {vocab["<end_of_turn>"], engine.tokenizer.eos_token_id} <= set(engine.stop_token_ids)
    request = _ask("What is it?", _image(5), max_new_tokens=6)
    prompt = engine.tokenizer.decode([i for i in engine._prepare(request).ids if i >= 0])
    assert prompt.endswith("What is it?<end_of_turn>\n<start_of_turn>model\n")
    [result] = engine.chat([request])
    assert result.completion_tokens <= 6


def test_llama3_override_stops_on_eot(engine):
    llama3 = MGMEngine(engine.model, engine.processor, model_id="tiny", template="llama_3")
    assert llama3.template.name == "llama_3"
    assert engine.tokenizer.convert_tokens_to_ids("<|eot_id|>") in llama3.stop_token_ids
    with pytest.raises(InvalidInputError, match="unknown conversation template"):
        MGMEngine(engine.model, engine.processor, model_id="tiny", template="alpaca")
