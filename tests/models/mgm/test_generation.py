"""The decoding loop: batched == alone, stops, streaming, sampling, cancellation (on a random tiny LLaMA)."""

import pytest
import torch

from models.errors import Cancelled, DeadlineExceeded, InvalidInputError
from models.mgm.generation import Prompt, SamplingParams, TextAssembler, _PreallocatedLayer, generate

pytestmark = pytest.mark.timeout(120)

TEXTS = ["hello", "The quick brown fox jumps over the lazy dog, twice", "what is in the image?", "A"]
# Logit gaps below this are float noise between a batched and a lone forward pass.
NOISE = 1e-4


def _prompt(model, tokenizer, text):
    ids = torch.tensor(tokenizer(text).input_ids)
    with torch.no_grad():
        return Prompt(model.get_input_embeddings()(ids))


def _clear_length(model, tokenizer, text, tokens):
    """How many of ``tokens`` were chosen with a top-2 margin above float noise (teacher-forced check)."""
    ids = torch.tensor([tokenizer(text).input_ids + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -len(tokens) - 1 : -1]
    top2 = logits.topk(2, dim=-1).values
    unclear = ((top2[:, 0] - top2[:, 1]) < NOISE).nonzero()
    return len(tokens) if len(unclear) == 0 else int(unclear[0])


def test_batched_greedy_equals_each_request_alone(tiny_llama, tiny_tokenizer):
    prompts = [_prompt(tiny_llama, tiny_tokenizer, t) for t in TEXTS]
    params = [SamplingParams(max_new_tokens=n) for n in (24, 7, 30, 16)]
    batched = generate(tiny_llama, tiny_tokenizer, prompts, params)
    for text, prompt, p, together in zip(TEXTS, prompts, params, batched):
        alone = generate(tiny_llama, tiny_tokenizer, [prompt], [p])[0]
        clear = _clear_length(tiny_llama, tiny_tokenizer, text, alone.token_ids)
        assert clear > 0
        assert together.token_ids[:clear] == alone.token_ids[:clear]
        assert len(together.token_ids) == p.max_new_tokens and together.finish_reason == "length"


def test_greedy_matches_transformers_generate(tiny_llama, tiny_tokenizer):
    ids = torch.tensor([tiny_tokenizer(TEXTS[1]).input_ids])
    expected = tiny_llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    ours = generate(tiny_llama, tiny_tokenizer, [_prompt(tiny_llama, tiny_tokenizer, TEXTS[1])],
                    [SamplingParams(max_new_tokens=20)])[0]
    assert ours.token_ids == expected[0, ids.shape[1] :].tolist()


def test_streamed_pieces_add_up_to_the_text(tiny_llama, tiny_tokenizer):
    pieces = {0: [], 1: []}
    prompts = [_prompt(tiny_llama, tiny_tokenizer, t) for t in TEXTS[:2]]
    results = generate(tiny_llama, tiny_tokenizer, prompts, [SamplingParams(max_new_tokens=25)] * 2,
                       on_token=lambda row, piece: pieces[row].append(piece))
    for row, result in enumerate(results):
        assert "".join(pieces[row]) == result.text
        assert result.text == tiny_tokenizer.decode(result.token_ids, skip_special_tokens=True)


def test_stop_string_ends_the_answer_before_it(tiny_llama, tiny_tokenizer):
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[2])
    free = generate(tiny_llama, tiny_tokenizer, [prompt], [SamplingParams(max_new_tokens=30)])[0]
    stop = free.text[len(free.text) // 2 : len(free.text) // 2 + 3]
    streamed = []
    stopped = generate(tiny_llama, tiny_tokenizer, [prompt], [SamplingParams(max_new_tokens=30, stop_strings=(stop,))],
                       on_token=lambda _, piece: streamed.append(piece))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert "".join(streamed) == stopped.text  # no part of the stop string was ever streamed


def test_stop_token_ends_the_answer_and_is_not_in_the_text(tiny_llama, tiny_tokenizer):
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[0])
    free = generate(tiny_llama, tiny_tokenizer, [prompt], [SamplingParams(max_new_tokens=12)])[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    result = generate(tiny_llama, tiny_tokenizer, [prompt],
                      [SamplingParams(max_new_tokens=12, stop_token_ids=(stop_id,))])[0]
    assert result.finish_reason == "stop"
    assert result.token_ids == free.token_ids[: first + 1]
    assert result.text == tiny_tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_alone_or_batched(tiny_llama, tiny_tokenizer):
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[1])
    other = _prompt(tiny_llama, tiny_tokenizer, TEXTS[3])

    def sample(seed, prompts):
        p = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.95, seed=seed)
        return generate(tiny_llama, tiny_tokenizer, prompts, [p] * len(prompts))[0].token_ids

    assert sample(7, [prompt]) == sample(7, [prompt, other])
    assert sample(7, [prompt]) != sample(8, [prompt])


def test_tiny_top_p_is_greedy(tiny_llama, tiny_tokenizer):
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[1])
    greedy = generate(tiny_llama, tiny_tokenizer, [prompt], [SamplingParams(max_new_tokens=15)])[0]
    nucleus = generate(tiny_llama, tiny_tokenizer, [prompt],
                       [SamplingParams(max_new_tokens=15, temperature=0.7, top_p=1e-6, seed=1)])[0]
    assert nucleus.token_ids == greedy.token_ids


@pytest.mark.parametrize("error", [Cancelled, DeadlineExceeded])
def test_check_stops_between_tokens(tiny_llama, tiny_tokenizer, error):
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 3:
            raise error("stop")

    streamed = []
    with pytest.raises(error):
        generate(tiny_llama, tiny_tokenizer, [_prompt(tiny_llama, tiny_tokenizer, TEXTS[0])],
                 [SamplingParams(max_new_tokens=50)], check=check, on_token=lambda _, p: streamed.append(p))
    assert len(calls) == 4  # prefill + 3 decode steps were allowed


def test_continuing_from_a_returned_kv_prefix_equals_a_full_prefill(tiny_llama, tiny_tokenizer):
    embed = tiny_llama.get_input_embeddings()
    ids = tiny_tokenizer(TEXTS[1]).input_ids
    first = generate(tiny_llama, tiny_tokenizer, [_prompt(tiny_llama, tiny_tokenizer, TEXTS[1])],
                     [SamplingParams(max_new_tokens=6)], keep_past=True)[0]
    history = ids + first.token_ids + tiny_tokenizer(" and then", add_special_tokens=False).input_ids
    fed = first.past[0][0].shape[-2]
    assert fed == len(ids) + len(first.token_ids) - 1
    with torch.no_grad():
        resumed = Prompt(embed(torch.tensor(history[fed:])), first.past)
        full = Prompt(embed(torch.tensor(history)))
    params = [SamplingParams(max_new_tokens=10)]
    other = _prompt(tiny_llama, tiny_tokenizer, TEXTS[0])  # a row without a prefix in the same batch
    assert (generate(tiny_llama, tiny_tokenizer, [resumed, other], params * 2)[0].token_ids
            == generate(tiny_llama, tiny_tokenizer, [full], params)[0].token_ids)


def test_kv_layer_writes_in_place_keeps_rows_and_grows_past_its_plan():
    layer = _PreallocatedLayer(capacity=5)
    prompt, step, more = torch.randn(2, 1, 3, 4), torch.randn(2, 1, 1, 4), torch.randn(1, 1, 3, 4)
    keys, _ = layer.update(prompt, -prompt)
    address = keys.data_ptr()
    keys, values = layer.update(step, -step)
    assert keys.data_ptr() == address  # no copy of the cache per token
    torch.testing.assert_close(keys, torch.cat([prompt, step], -2), rtol=0, atol=0)
    torch.testing.assert_close(values, -keys, rtol=0, atol=0)
    layer.batch_select_indices(torch.tensor([1]))
    keys, values = layer.update(more, -more)  # 7 positions > capacity 5
    torch.testing.assert_close(keys, torch.cat([prompt[1:], step[1:], more], -2), rtol=0, atol=0)
    torch.testing.assert_close(values, -keys, rtol=0, atol=0)
    assert layer.get_seq_length() == 7


def test_incremental_detokenization_keeps_multibyte_characters_whole(tiny_tokenizer):
    text = "naïve café — 東京 🙂 done"
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assembler = TextAssembler(tiny_tokenizer)
    pieces = [assembler.add(i) for i in ids] + [assembler.finish()]
    assert "".join(pieces) == tiny_tokenizer.decode(ids)
    assert not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}])
def test_bad_sampling_parameters_are_refused(kwargs):
    with pytest.raises(InvalidInputError):
        SamplingParams(**kwargs)
