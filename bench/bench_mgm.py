"""Mini-Gemini engine benchmark on the ``small`` preset: one image per request, 64 new tokens.

Measures, with repetitions interleaved and medians reported:
- prefill latency (vision encoders + prompt, first token), split into the vision encoders and the LLM by the
  same request with the image's visual features cached; decode tokens/s;
- batch-8 throughput against the same 8 requests one by one (goal >= 3x), from scratch, and again with the
  images' visual features already cached (the language model's share alone);
- a second turn on the same image with the caches (visual features + the thread's KV prefix) against
  without them (goal <= 0.4x the latency), to the first token and to the 64th: both definitions of the latency
  are reported (the cache shortens the prefill only, so the whole request's ratio also depends on how long the
  decode is next to it).

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
from PIL import Image  # noqa: E402

from models.mgm import ChatRequest, MGMEngine, Message  # noqa: E402

NEW_TOKENS = 64
BATCH = 8
BATCH_GOAL = 3.0  # batch-8 throughput over sequential, at least
SECOND_TURN_GOAL = 0.4  # cached second turn over uncached, at most
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


def _second_turn(image, answer: str, max_new_tokens: int, cache_key: str | None) -> ChatRequest:
    messages = [Message("user", QUESTION, [image]), Message("assistant", answer),
                Message("user", "What stands out the most, and why?")]
    return ChatRequest(messages, max_new_tokens=max_new_tokens, cache_key=cache_key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()

    cached = MGMEngine.from_pretrained(args.model)
    uncached = MGMEngine.from_pretrained(args.model, visual_cache_bytes=0, prefix_cache_bytes=0)
    images = [_image(seed) for seed in range(BATCH)]
    _timed(uncached, [_ask(images[0], 4)])  # warm-up
    _timed(cached, [_ask(image, 1) for image in images])  # the cached engine has seen the 8 images

    samples: dict[str, list[float]] = {key: [] for key in (
        "prefill_s", "prefill_warm_s", "decode_tok_s", "seq_tok_s", "batch_tok_s", "seq_warm_tok_s", "batch_warm_tok_s",
        "turn2_ttft_cached", "turn2_ttft_uncached",
        "turn2_full_cached", "turn2_full_uncached")}
    for rep in range(args.reps):
        # Prefill and decode (no caches): one token, then 64.
        first, _ = _timed(uncached, [_ask(images[0], 1)])
        full, tokens = _timed(uncached, [_ask(images[0])])
        samples["prefill_s"].append(first)
        samples["prefill_warm_s"].append(_timed(cached, [_ask(images[0], 1)])[0])  # visual features cached
        samples["decode_tok_s"].append((tokens - 1) / (full - first))
        # 8 requests one by one, then as one batch (different images, no caches).
        seconds, tokens = zip(*(_timed(uncached, [_ask(image)]) for image in images))
        samples["seq_tok_s"].append(sum(tokens) / sum(seconds))
        seconds, tokens = _timed(uncached, [_ask(image) for image in images])
        samples["batch_tok_s"].append(tokens / seconds)
        seconds, tokens = zip(*(_timed(cached, [_ask(image)]) for image in images))
        samples["seq_warm_tok_s"].append(sum(tokens) / sum(seconds))
        seconds, tokens = _timed(cached, [_ask(image) for image in images])
        samples["batch_warm_tok_s"].append(tokens / seconds)
        # Second turn on the same image: with both caches (after a first turn of the thread) and without.
        image = images[rep % BATCH]
        for max_new_tokens, name in ((1, "ttft"), (NEW_TOKENS, "full")):
            thread = f"rep{rep}-{name}"
            [answer] = cached.chat([_ask(image, cache_key=thread)])
            samples[f"turn2_{name}_cached"].append(
                _timed(cached, [_second_turn(image, answer.text, max_new_tokens, thread)])[0])
            samples[f"turn2_{name}_uncached"].append(
                _timed(uncached, [_second_turn(image, answer.text, max_new_tokens, None)])[0])

    median = {key: statistics.median(values) for key, values in samples.items()}
    print(f"model {args.model}, {args.reps} interleaved repetitions, medians, OMP_NUM_THREADS="
          f"{os.environ['OMP_NUM_THREADS']}, {cached.model.num_visual_tokens} visual tokens per image")
    prefill, llm = median["prefill_s"], median["prefill_warm_s"]
    print(f"prefill (vision + prompt, first token): {prefill * 1000:.1f} ms = vision ~{(prefill - llm) * 1000:.1f} ms"
          f" ({(prefill - llm) / prefill:.0%}) + LLM prefill {llm * 1000:.1f} ms (features cached)")
    print(f"decode: {median['decode_tok_s']:.1f} tokens/s (batch 1)")
    print(f"batch {BATCH}: {median['batch_tok_s']:.1f} tokens/s vs sequential {median['seq_tok_s']:.1f} tokens/s"
          f" -> {_verdict(median['batch_tok_s'] / median['seq_tok_s'], BATCH_GOAL, at_least=True)}")
    print(f"batch {BATCH}, visual features cached: {median['batch_warm_tok_s']:.1f} tokens/s vs sequential "
          f"{median['seq_warm_tok_s']:.1f} tokens/s -> {median['batch_warm_tok_s'] / median['seq_warm_tok_s']:.2f}x")
    for name, label in (("ttft", "to first token"), ("full", f"to {NEW_TOKENS} tokens")):
        with_cache, without = median[f"turn2_{name}_cached"], median[f"turn2_{name}_uncached"]
        print(f"second turn {label}: cached {with_cache * 1000:.1f} ms vs uncached {without * 1000:.1f} ms"
              f" -> {_verdict(with_cache / without, SECOND_TURN_GOAL, at_least=False)}")
    print(f"cache stats: {cached.cache_stats()}")


if __name__ == "__main__":
    main()
