"""The decoding loop: batched == alone, stops, streaming, sampling, cancellation (on a random tiny LLaMA)."""

import pytest
import torch

from mgmflow.models.errors import Cancelled, DeadlineExceeded, InvalidInputError
from mgmflow.models.mgm.generation import Prompt, SamplingParams, TextAssembler, _PreallocatedLayer, generate

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


# -- sampling on the model's device, batched (issue 11 item 9) ---------------------------------------------------

# Sampling work done per decoding step: calls of these must not grow with the batch.
_SAMPLING_OPS = {torch.softmax, torch.Tensor.softmax, torch.sort, torch.Tensor.sort, torch.topk, torch.Tensor.topk,
                 torch.multinomial, torch.Tensor.multinomial, torch.Tensor.masked_fill, torch.Tensor.masked_fill_,
                 torch.cumsum, torch.Tensor.cumsum, torch.Tensor.argmax, torch.argmax}


class _Watch(torch.overrides.TorchFunctionMode):
    """Counts sampling ops, and records every tensor of a full vocabulary row copied to the host."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.ops, self.to_host = vocab_size, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops += func in _SAMPLING_OPS
        is_host_copy = func in (torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy) or (
            func is torch.Tensor.to and "cpu" in map(str, [*args[1:], *kwargs.values()]))
        if is_host_copy and args[0].shape[-1:] == (self.vocab_size,):
            self.to_host.append(tuple(args[0].shape))
        return func(*args, **kwargs)


def _watched(model, tokenizer, prompts, params, constraints=None):
    with _Watch(model.config.vocab_size) as watch:
        generate(model, tokenizer, prompts, params, constraints=constraints)
    return watch


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 1},
                                      {"temperature": 0.8, "top_p": 0.9, "seed": 1}])
def test_sampling_runs_over_the_whole_batch_at_once_and_keeps_logits_on_the_device(
        tiny_llama, tiny_tokenizer, sampling):
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[1])
    params = SamplingParams(max_new_tokens=6, **sampling)
    alone = _watched(tiny_llama, tiny_tokenizer, [prompt], [params])
    batched = _watched(tiny_llama, tiny_tokenizer, [prompt] * 6, [params] * 6)
    assert batched.ops == alone.ops  # one batched op per step, not one per row
    assert batched.to_host == alone.to_host == []  # only the chosen ids leave the device


def test_grammar_masks_apply_to_the_whole_batch_at_once(tiny_llama, tiny_tokenizer):
    from mgmflow.models.mgm.constrained import GrammarCompiler

    compiler = GrammarCompiler(tiny_tokenizer, vocab_size=tiny_llama.config.vocab_size,
                               stop_token_ids=[tiny_tokenizer.eos_token_id])
    prompt = _prompt(tiny_llama, tiny_tokenizer, TEXTS[2])
    params = SamplingParams(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=3)
    alone = _watched(tiny_llama, tiny_tokenizer, [prompt], [params], [compiler.regex("[a-z]{8}")])
    batched = _watched(tiny_llama, tiny_tokenizer, [prompt] * 5, [params] * 5,
                       [compiler.regex("[a-z]{8}") for _ in range(5)])
    assert batched.ops == alone.ops and batched.to_host == alone.to_host == []


class _FixedLogits(torch.nn.Module):
    """A language model whose next-token logits are always ``logits``: sampling alone, at no model cost."""

    def __init__(self, logits):
        super().__init__()
        from transformers import LlamaConfig

        self.config = LlamaConfig(vocab_size=logits.numel(), num_hidden_layers=0)
        self.register_buffer("logits", logits)

    def forward(self, inputs_embeds=None, input_ids=None, **_):
        batch, length = (inputs_embeds if inputs_embeds is not None else input_ids).shape[:2]
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.logits.expand(batch, length, -1))


def test_top_p_samples_the_nucleus_in_proportion(tiny_tokenizer):
    probs = torch.tensor([0.05, 0.4, 0.02, 0.25, 0.2, 0.08])
    model = _FixedLogits(probs.log())
    prompt = Prompt(torch.zeros(1, 4))
    rows = 3000
    params = [SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.8, seed=seed) for seed in range(rows)]
    chosen = [g.token_ids[0] for g in generate(model, tiny_tokenizer, [prompt] * rows, params)]
    counts = torch.bincount(torch.tensor(chosen), minlength=6).float() / rows
    # Nucleus of 0.8: 0.4 + 0.25 + 0.2 = 0.85 >= 0.8; the others never come.
    expected = torch.tensor([0, 0.4, 0, 0.25, 0.2, 0]) / 0.85
    torch.testing.assert_close(counts, expected, rtol=0, atol=0.03)  # ~4 standard deviations at 3000 draws


def test_seeded_rows_sample_the_same_whatever_their_batch(tiny_llama, tiny_tokenizer):
    prompts = [_prompt(tiny_llama, tiny_tokenizer, text) for text in TEXTS]
    params = [SamplingParams(max_new_tokens=10, temperature=t, top_p=p, seed=s)
              for t, p, s in ((1.0, 0.9, 5), (0.0, 1.0, None), (0.7, 1.0, 6), (1.3, 0.5, 7))]
    batched = generate(tiny_llama, tiny_tokenizer, prompts, params)
    for prompt, param, row in zip(prompts, params, batched):
        assert generate(tiny_llama, tiny_tokenizer, [prompt], [param])[0].token_ids == row.token_ids


# -- KV rows selected on each layer's own device (issue 11 item 7) -------------------------------------------------


class _SameDeviceIndices(torch.overrides.TorchFunctionMode):
    """Refuses an index tensor on another device than the tensor it indexes.

    A bit stricter than CUDA, which also takes CPU indices but refuses ``cuda:0`` indices for a ``cuda:1``
    tensor; CPU and meta tensors take any index silently (meta even from the CPU's memory), so without this a
    CPU machine cannot see what fails on a model split across two GPUs.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.__getitem__, torch.Tensor.index_select, torch.index_select):
            source, index = args[0], args[1] if func is torch.Tensor.__getitem__ else args[2]
            for part in index if isinstance(index, tuple) else (index,):
                if isinstance(part, torch.Tensor) and part.device != source.device:
                    raise RuntimeError(f"indices on {part.device} for a tensor on {source.device}")
        return func(*args, **kwargs)


def test_kv_rows_are_selected_and_extracted_on_each_layers_device():
    from transformers.cache_utils import Cache

    from mgmflow.models.mgm.generation import _row_past

    # Layer 0 with the embeddings (and the mask) on the CPU, layer 1 on another device.
    cache = Cache(layers=[_PreallocatedLayer(8), _PreallocatedLayer(8)])
    states = torch.arange(3 * 2 * 4 * 2, dtype=torch.float32).reshape(3, 2, 4, 2)
    cache.layers[0].update(states, -states)
    cache.layers[1].update(states.to("meta"), states.to("meta"))
    with _SameDeviceIndices():
        cache.batch_select_indices(torch.tensor([0, 2]))
        past = _row_past(cache, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), 1)
    torch.testing.assert_close(cache.layers[0].keys, states[[0, 2]], rtol=0, atol=0)
    assert cache.layers[1].keys.shape == (2, 2, 4, 2) and cache.layers[1].keys.device.type == "meta"
    torch.testing.assert_close(past[0][0], states[2:3, :, 1:], rtol=0, atol=0)
    assert past[1][0].device.type == "meta" and past[1][0].shape == (1, 2, 3, 2)
