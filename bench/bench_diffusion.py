"""Diffusion engine overhead and batching, on the tiny presets, measured side by side in one run.

1. Our call against the bare diffusers pipeline call with the same inputs and weights (goal: ratio <= 1.05):
   text-to-image, img2img (tiny) and instruction editing (tiny-ip2p). Ours includes validation, a fresh
   scheduler and pipeline object, per-image CPU generators and PNG encoding with metadata.
2. A batch of 4 prompts in one call against 4 single calls (goal: throughput >= 1.5x).

Repetitions are interleaved (ours / bare alternate, order flipped every repetition); medians are reported.

    OMP_NUM_THREADS=1 python bench/bench_diffusion.py [--reps 15] [--steps 4] [--device cpu]
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
from diffusers import DiffusionPipeline, StableDiffusionXLImg2ImgPipeline  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from PIL import Image  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from mgmflow.models.diffusion import (  # noqa: E402
    DiffusionEngine,
    Img2ImgRequest,
    InstructEditRequest,
    TextToImageRequest,
    presets,
)

PROMPTS = ["a red house at sunset", "a cat in a hat", "a dog in the snow", "a blue sky over the sea"]


def timed(call) -> float:
    start = time.perf_counter()
    call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(first, second, reps: int) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, alternating which runs first; one warm-up call each."""
    first(), second()
    times_first, times_second = [], []
    for rep in range(reps):
        pair = [(first, times_first), (second, times_second)]
        for call, times in pair if rep % 2 == 0 else reversed(pair):
            times.append(timed(call))
    return statistics.median(times_first), statistics.median(times_second)


def bare_pipeline(name: str, device: str) -> DiffusionPipeline:
    pipeline = DiffusionPipeline.from_pretrained(presets.resolve(name)).to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    steps, device = args.steps, args.device
    photo = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))

    def generator(seed: int) -> list[torch.Generator]:
        return [torch.Generator("cpu").manual_seed(seed)]

    # Both sides in float32 so the comparison is of the code paths, not of precision.
    engine = DiffusionEngine.from_pretrained("tiny", device=device, dtype="float32")
    ip2p = DiffusionEngine.from_pretrained("tiny-ip2p", device=device, dtype="float32")
    bare = bare_pipeline("tiny", device)
    bare_img2img = StableDiffusionXLImg2ImgPipeline(**bare.components)
    bare_img2img.set_progress_bar_config(disable=True)
    bare_ip2p = bare_pipeline("tiny-ip2p", device)
    negative = engine.defaults.negative_prompt

    cases = {
        "text_to_image": (
            lambda: engine.text_to_image(TextToImageRequest(prompts=[PROMPTS[0]], seeds=[1], steps=steps)),
            lambda: bare(prompt=[PROMPTS[0]], negative_prompt=[negative], num_inference_steps=steps,
                         guidance_scale=5.0, generator=generator(1)),
        ),
        "img2img": (
            lambda: engine.img2img(Img2ImgRequest(prompts=[PROMPTS[0]], seeds=[1], steps=steps, image=photo)),
            lambda: bare_img2img(prompt=[PROMPTS[0]], negative_prompt=[negative], image=photo, strength=0.75,
                                 num_inference_steps=steps, guidance_scale=5.0, generator=generator(1)),
        ),
        "instruct_edit": (
            lambda: ip2p.instruct_edit(InstructEditRequest(prompts=["make it snowy"], seeds=[1], steps=steps,
                                                           image=photo)),
            lambda: bare_ip2p(prompt=["make it snowy"], image=photo, num_inference_steps=steps, guidance_scale=7.5,
                              image_guidance_scale=1.5, generator=generator(1)),
        ),
    }
    print(f"device={device} steps={steps} reps={args.reps} threads={torch.get_num_threads()}")
    print(f"{'case':<16}{'ours (s)':>10}{'bare (s)':>10}{'ratio':>8}   goal <= 1.05")
    for name, (ours, theirs) in cases.items():
        ours_s, bare_s = interleaved(ours, theirs, args.reps)
        print(f"{name:<16}{ours_s:>10.4f}{bare_s:>10.4f}{ours_s / bare_s:>8.3f}")

    seeds = [11, 12, 13, 14]
    batch = TextToImageRequest(prompts=PROMPTS, seeds=seeds, steps=steps)
    singles = [TextToImageRequest(prompts=[prompt], seeds=[seed], steps=steps) for prompt, seed in zip(PROMPTS, seeds)]
    batch_s, singles_s = interleaved(lambda: engine.text_to_image(batch),
                                     lambda: [engine.text_to_image(single) for single in singles], args.reps)
    print(f"\nbatch of 4: {batch_s:.4f} s   4 single calls: {singles_s:.4f} s   "
          f"throughput {singles_s / batch_s:.2f}x   goal >= 1.5x")


if __name__ == "__main__":
    main()
