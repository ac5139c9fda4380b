"""Decoding constrained while it runs: a random model still returns valid JSON / regex matches, every time."""

import json
import re
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.mgm.constrained import GrammarCompiler
from mgmflow.models.mgm.gen_protocol import gen_grammar, split_image_prompt
from mgmflow.models.mgm.generation import Prompt, SamplingParams, generate

pytestmark = pytest.mark.timeout(180)


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=12)
    kind: Literal["cat", "dog", "axolotl"]
    age: int = Field(ge=0, le=30)
    tags: list[Annotated[str, Field(max_length=10)]] = Field(min_length=1, max_length=3)
    weight: float | None = Field(default=None, ge=0, le=1000)


@pytest.fixture(scope="module")
def compiler(tiny_tokenizer, tiny_llama):
    return GrammarCompiler(tiny_tokenizer, vocab_size=tiny_llama.config.vocab_size,
                           stop_token_ids=[tiny_tokenizer.eos_token_id])


def _run(model, tokenizer, constraints, *, max_new_tokens, text="Describe the pet as JSON:", temperature=1.0,
         first_seed=0):
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    embeds = model.get_input_embeddings()(ids).detach()
    n = len(constraints)
    params = [SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=first_seed + i)
              for i in range(n)]
    return generate(model, tokenizer, [Prompt(embeds)] * n, params, constraints=constraints)


def test_random_model_returns_schema_valid_json_100_times_out_of_100(tiny_llama, tiny_tokenizer, compiler):
    schema = Pet.model_json_schema()
    results = []
    for batch in range(4):  # 4 batches of 25 rows, each row with its own matcher and seed
        results += _run(tiny_llama, tiny_tokenizer, [compiler.json_schema(schema) for _ in range(25)],
                        max_new_tokens=160, first_seed=25 * batch)
    assert len(results) == 100
    for result in results:
        assert result.finish_reason == "stop", result.text
        json.loads(result.text)  # strict: raw control characters in strings are rejected
        Pet.model_validate_json(result.text)
    assert len({r.text for r in results}) > 50  # sampled, not one memorised answer


def test_greedy_constrained_json_is_valid_too(tiny_llama, tiny_tokenizer, compiler):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}
    result = _run(tiny_llama, tiny_tokenizer, [compiler.json_schema(schema)], max_new_tokens=40, temperature=0)[0]
    value = json.loads(result.text)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 1 <= value["n"] <= 9


def test_regex_constraint(tiny_llama, tiny_tokenizer, compiler):
    pattern = r"[A-Z][a-z]{2,8} (cat|dog)s?, [0-9]{1,3} years"
    results = _run(tiny_llama, tiny_tokenizer, [compiler.regex(pattern) for _ in range(20)], max_new_tokens=40)
    for result in results:
        assert result.finish_reason == "stop"
        assert re.fullmatch(pattern, result.text), result.text


def test_gen_grammar_gives_one_complete_block_within_the_budget(tiny_llama, tiny_tokenizer, compiler):
    results = _run(tiny_llama, tiny_tokenizer, [compiler.lark(gen_grammar(48)) for _ in range(10)],
                   max_new_tokens=48)
    for result in results:
        assert result.finish_reason == "stop"
        assert result.text.count("<h>") == 1 and result.text.count("</h>") == 1
        assert result.text.endswith("</h>")
        text, prompt = split_image_prompt(result.text)
        assert prompt and "<" not in prompt and ">" not in prompt
        assert text == result.text[: result.text.index("<h>")].strip()


@pytest.mark.parametrize("schema", [{"type": "objekt"}, {"type": "object", "properties": {"a": {"minimum": "x"}}}])
def test_invalid_schema_is_a_typed_error(compiler, schema):
    with pytest.raises(InvalidInputError, match="invalid JSON schema"):
        compiler.json_schema(schema)


def test_invalid_regex_is_a_typed_error(compiler):
    with pytest.raises(InvalidInputError, match="invalid regex"):
        compiler.regex("[a-z")


def test_split_image_prompt_takes_the_last_complete_block():
    assert split_image_prompt("A picnic. <h>sunny park, picnic blanket</h>") == (
        "A picnic.", "sunny park, picnic blanket")
    assert split_image_prompt("<h>first</h> then <h>second</h>") == ("<h>first</h> then", "second")
    assert split_image_prompt("no block <h>unfinished") == ("no block <h>unfinished", None)
    assert split_image_prompt("empty <h> </h>") == ("empty", None)


def test_answer_complete_at_the_budget_is_a_stop_and_a_cut_one_a_length(tiny_llama, tiny_tokenizer, compiler):
    # Complete after one token, though the grammar would take more: the answer is whole and valid.
    [whole] = _run(tiny_llama, tiny_tokenizer, [compiler.regex("a+")], max_new_tokens=1)
    assert (whole.text, whole.finish_reason) == ("a", "stop")
    [cut] = _run(tiny_llama, tiny_tokenizer, [compiler.regex("abcdefgh")], max_new_tokens=2)
    assert cut.finish_reason == "length" and cut.text != "abcdefgh"
