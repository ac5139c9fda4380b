"""Mini-Gemini engine benchmark on the ``small`` preset: one image per request, 64 new tokens, by parts.

On a CPU a prefill costs as much as ~45 decode steps, so whole-request ratios hide what batching and caching
do. Each part is measured on its own, with repetitions interleaved and medians reported:

- decode throughput of a batch of 8 over a batch of 1 (goal >= 4x): tokens after the first over the time
  after the first token (the 64-token call minus the 1-token call of the same requests; visual features
  cached, so both calls prefill the same);
- time to first token of a second turn on the same image with the caches (visual features + the thread's KV
  prefix) over the same turn without them (goal <= 0.2x);
- top-p sampling cost per token for a batch of 8 at a 128k vocabulary (LLaMA-3's 128256), the per-row host
  path this project had before (kept below as the reference, ``_before_top_p``) against the batched sampler
  of ``mgmflow.models.mgm.generation`` (goal >= 10x cheaper), on the same logits. Two distributions: a peaked one, as a
  trained model's (nucleus of a few hundred tokens), and a flat one, as a random model's or a high temperature's
  (nucleus of most of the vocabulary: the batched path then sorts the vocabulary too).

Each ratio is printed with its goal and whether this run met it.

Usage: OMP_NUM_THREADS=1 python bench/bench_mgm.py [--reps 5] [--model small]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from mgmflow.models.mgm import ChatRequest, MGMEngine, Message  # noqa: E402
from mgmflow.models.mgm.generation import SamplingParams, _Row, _Sampler  # noqa: E402

NEW_TOKENS = 64
BATCH = 8
DECODE_GOAL = 4.0  # batch-8 decode throughput over batch 1, at least
SECOND_TURN_GOAL = 0.2  # time to first token, cached second turn over uncached, at most
SAMPLING_GOAL = 10.0  # top-p cost per token, before over after, at least
VOCAB = 128_256
TOP_P, TEMPERATURE = 0.9, 0.8
QUESTION = "Describe the image in detail."


def _image(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(300, 400, 3) * 255).astype("uint8"))


def _timed(engine: MGMEngine, requests: list[ChatRequest]) -> tuple[float, int]:
    """(seconds, completion tokens) of one chat call."""
    start = time.perf_counter()
    results = engine.chat(requests)
    return time.perf_counter() - start, sum(r.completion_tokens for r in results)


def _verdict(ratio: float, goal: float, at_least: bool) -> str:
    met = ratio >= goal if at_least else ratio <= goal
    return f"{ratio:.2f}x (goal {'>=' if at_least else '<='} {goal:g}x: {'met' if met else 'NOT met'})"


def _ask(image, max_new_tokens=NEW_TOKENS, **options) -> ChatRequest:
    return ChatRequest([Message("user", QUESTION, [image])], max_new_tokens=max_new_tokens, **options)


def _second_turn(image, answer: str, cache_key: str | None) -> ChatRequest:
    messages = [Message("user", QUESTION, [image]), Message("assistant", answer),
                Message("user", "What stands out the most, and why?")]
    return ChatRequest(messages, max_new_tokens=1, cache_key=cache_key)


def _decode_tokens_per_s(engine: MGMEngine, images: list) -> float:
    """Tokens after each row's first, per second after the first token (the prefill is subtracted)."""
    first, _ = _timed(engine, [_ask(image, 1) for image in images])
    full, tokens = _timed(engine, [_ask(image) for image in images])
    return (tokens - len(images)) / (full - first)


# -- top-p sampling, before and after --------------------------------------------------------------------------


def _before_top_p(logits: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """The per-row host path this project sampled with before (the reference): logits copied to the host, then
    for each row a softmax, a sort of the whole vocabulary, the nucleus, and a multinomial draw."""
    host = logits.float().cpu()
    chosen = []
    for row, generator in zip(host, generators):
        probs = torch.softmax(row / TEMPERATURE, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= TOP_P
        probs = probs.scatter(0, order[outside], 0.0)
        chosen.append(int(torch.multinomial(probs, 1, generator=generator)))
    return chosen


def _sampling_ms(logits: torch.Tensor, tokenizer, steps: int) -> tuple[float, float, int]:
    """(before, after) milliseconds per token for the batch ``logits`` [B, V], and the after path's nucleus
    size (median over rows of the first step)."""
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(logits))]
    start = time.perf_counter()
    for _ in range(steps):
        _before_top_p(logits, generators)
    before = (time.perf_counter() - start) / steps
    params = [SamplingParams(max_new_tokens=steps, temperature=TEMPERATURE, top_p=TOP_P, seed=seed)
              for seed in range(len(logits))]
    rows = [_Row(i, p, tokenizer, None) for i, p in enumerate(params)]
    sampler = _Sampler(rows, logits.shape[-1], logits.device)
    start = time.perf_counter()
    for _ in range(steps):
        sampler.choose(logits, rows).tolist()  # the ids reach the host, as in generate()
    after = (time.perf_counter() - start) / steps
    probs = torch.softmax(logits / TEMPERATURE, dim=-1).sort(dim=-1, descending=True).values
    nucleus = int(((probs.cumsum(-1) - probs) < TOP_P).sum(-1).median())
    return before * 1000, after * 1000, nucleus


def _logits(kind: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scale = 4.0 if kind == "peaked" else 0.5  # standard deviation of the logits over the vocabulary
    return torch.randn(BATCH, VOCAB, generator=generator) * scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()

    cached = MGMEngine.from_pretrained(args.model)
    uncached = MGMEngine.from_pretrained(args.model, visual_cache_bytes=0, prefix_cache_bytes=0)
    images = [_image(seed) for seed in range(BATCH)]
    _timed(uncached, [_ask(images[0], 4)])  # warm-up
    _timed(cached, [_ask(image, 4) for image in images])  # the cached engine has seen the 8 images

    samples: dict[str, list[float]] = {key: [] for key in (
        "decode_1", "decode_8", "ttft_cached", "ttft_uncached", "prefill_s", "prefill_warm_s")}
    for rep in range(args.reps):
        samples["decode_1"].append(_decode_tokens_per_s(cached, images[rep % BATCH : rep % BATCH + 1]))
        samples["decode_8"].append(_decode_tokens_per_s(cached, images))
        samples["prefill_s"].append(_timed(uncached, [_ask(images[0], 1)])[0])
        samples["prefill_warm_s"].append(_timed(cached, [_ask(images[0], 1)])[0])
        # Second turn on the same image: with both caches (after a first turn of the thread) and without.
        image, thread = images[rep % BATCH], f"rep{rep}"
        [answer] = cached.chat([_ask(image, cache_key=thread)])
        samples["ttft_cached"].append(_timed(cached, [_second_turn(image, answer.text, thread)])[0])
        samples["ttft_uncached"].append(_timed(uncached, [_second_turn(image, answer.text, None)])[0])
    median = {key: statistics.median(values) for key, values in samples.items()}

    print(f"model {args.model}, {args.reps} interleaved repetitions, medians, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, {cached.model.num_visual_tokens} visual tokens per image, "
          f"{NEW_TOKENS} new tokens")
    prefill, llm = median["prefill_s"], median["prefill_warm_s"]
    print(f"prefill (vision + prompt, first token): {prefill * 1000:.1f} ms = vision ~{(prefill - llm) * 1000:.1f} ms"
          f" + LLM prefill {llm * 1000:.1f} ms (features cached)")
    one, eight = median["decode_1"], median["decode_8"]
    print(f"decode: batch {BATCH} {eight:.1f} tokens/s vs batch 1 {one:.1f} tokens/s -> "
          f"{_verdict(eight / one, DECODE_GOAL, at_least=True)}")
    with_cache, without = median["ttft_cached"], median["ttft_uncached"]
    print(f"second turn, time to first token: cached {with_cache * 1000:.1f} ms vs uncached {without * 1000:.1f} ms"
          f" -> {_verdict(with_cache / without, SECOND_TURN_GOAL, at_least=False)}")
    for kind in ("peaked", "flat"):
        logits = _logits(kind)
        runs = [_sampling_ms(logits, cached.tokenizer, steps=10) for _ in range(args.reps)]
        before = statistics.median(r[0] for r in runs)
        after = statistics.median(r[1] for r in runs)
        print(f"top-p {TOP_P} sampling, batch {BATCH} x {VOCAB} vocabulary, {kind} logits (nucleus ~{runs[0][2]} "
              f"tokens): per-row host path {before:.1f} ms/token vs batched {after:.2f} ms/token -> "
              f"{_verdict(before / after, SAMPLING_GOAL, at_least=True)}")
    print(f"cache stats: {cached.cache_stats()}")


if __name__ == "__main__":
    main()
