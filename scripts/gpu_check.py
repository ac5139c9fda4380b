"""What only a GPU shows, in a few minutes on one card, ending with one summary line.

1. parity: the official tiny oracles (``shared/fixtures/mgm-oracle``; else the tiny presets against their own
   fp32 run) loaded in fp16 and in bf16, logits against the fp32 reference;
2. batch: the Mini-Gemini engine's batched generation (4 requests with images, greedy) against the same
   requests one by one, with decode throughput;
3. diffusion: the SDXL-architecture tiny presets in fp16 through every task kind (text-to-image, img2img,
   inpainting, instruction editing), with every module's dtype and the peak VRAM of each task;
4. multi-GPU (two or more devices visible): the tiny LLM split over two GPUs by a device map, answering as on one.

On a machine without CUDA the same script runs on the CPU and says which GPU-only parts it skipped (VRAM, the
multi-GPU split), so a CPU test keeps it working. Exit status 1 if any part failed.

Usage: .venv/bin/python scripts/gpu_check.py [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE_CANDIDATES = (REPO / "shared" / "fixtures" / "mgm-oracle", REPO.parent / "shared" / "fixtures" / "mgm-oracle")
ORACLES = ("mgm_llama", "mgm_gemma", "mgm_llama_hd")
# Logit tolerance relative to the largest reference logit: a few units of each format's epsilon (fp16 2^-10,
# bf16 2^-7) per layer of the tiny models, whose logits are O(1-10). fp16 and bf16 runs of the whole model
# (two towers, mining, a 2-layer LLM) stay well inside; a wrong op order or a cast that loses range does not.
RELATIVE_TOLERANCE = {torch.float16: 0.02, torch.bfloat16: 0.1}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def picture(seed: int, size=(160, 120)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


def vram(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a on CPU"
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:.1f} MiB peak"


def reset_vram(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


# -- 1. half-precision parity ----------------------------------------------------------------------------------


def check_parity(device: torch.device, fixtures: Path | None) -> str:
    from mgmflow.models.mgm import load_pretrained

    cases = []  # (name, folder, (input_ids, images, images_aux), reference logits)
    if fixtures is not None:
        for name in ORACLES:
            root = fixtures / name
            inputs = [torch.from_numpy(np.load(root / "inputs" / f"{x}.npy")) for x in ("input_ids", "images",
                                                                                          "images_aux")]
            reference = torch.from_numpy(np.load(root / "reference" / "logits.npy"))
            cases.append((name, root / "checkpoint", inputs, reference))
    else:
        print("parity: oracle fixtures not found; comparing the tiny presets with their own fp32 run")
        for name in ("tiny", "tiny-gemma", "tiny-hd"):
            model, processor = load_pretrained(name, device="cpu", dtype=torch.float32)
            images, images_aux = processor.preprocess([picture(1)])
            ids = torch.tensor([[1, 30, 31, -200, 40, 41, 42]])
            with torch.inference_mode():
                reference = model(input_ids=ids, images=images, images_aux=images_aux).logits
            cases.append((name, name, [ids, images, images_aux], reference))
    worst = {}
    for label, dtype in DTYPES.items():
        for name, folder, inputs, reference in cases:
            model, _ = load_pretrained(folder, device=device, dtype=dtype)
            with torch.inference_mode():
                logits = model(input_ids=inputs[0], images=inputs[1], images_aux=inputs[2]).logits.float().cpu()
            if not torch.isfinite(logits).all():
                raise AssertionError(f"{name} in {label}: non-finite logits")
            relative = ((logits - reference).abs().max() / reference.abs().max()).item()
            print(f"parity {label} {name}: max |logits - fp32| / max |fp32| = {relative:.2e} "
                  f"(tolerance {RELATIVE_TOLERANCE[dtype]:g}), model dtype {model.dtype}")
            if relative > RELATIVE_TOLERANCE[dtype]:
                raise AssertionError(f"{name} in {label}: relative logit error {relative:.2e}")
            worst[label] = max(worst.get(label, 0.0), relative)
            del model
    return " ".join(f"{label} {error:.1e}" for label, error in worst.items())


# -- 2. batched generation -------------------------------------------------------------------------------------


def check_batch(device: torch.device) -> str:
    from mgmflow.models.mgm import ChatRequest, MGMEngine, Message

    engine = MGMEngine.from_pretrained("tiny", device=device, visual_cache_bytes=0, prefix_cache_bytes=0)
    requests = [ChatRequest([Message("user", f"Describe picture {i} in detail.", [picture(i)])], max_new_tokens=32)
                for i in range(4)]
    engine.chat(requests[:1])  # warm-up (kernels, allocator)
    reset_vram(device)
    started = time.perf_counter()
    batched = engine.chat(requests)
    batch_s = time.perf_counter() - started
    started = time.perf_counter()
    alone = [engine.chat([request])[0] for request in requests]
    alone_s = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in batched)
    if not tokens or any(r.completion_tokens == 0 for r in batched):
        raise AssertionError("a batched request produced no token")
    same = sum(b.text == a.text for b, a in zip(batched, alone))
    print(f"batch: 4 requests in {engine.model.dtype} on {device}: {tokens / batch_s:.0f} tok/s batched, "
          f"{sum(r.completion_tokens for r in alone) / alone_s:.0f} tok/s one by one; greedy texts equal to the "
          f"one-by-one run: {same}/4 (half-precision kernels may differ by batch shape); VRAM {vram(device)}")
    return f"{tokens / batch_s:.0f} tok/s ({batch_s and alone_s / batch_s:.1f}x), same {same}/4"


# -- 3. diffusion in fp16 --------------------------------------------------------------------------------------


def check_diffusion(device: torch.device) -> str:
    from mgmflow.models.diffusion import (
        DiffusionEngine,
        Img2ImgRequest,
        InpaintRequest,
        InstructEditRequest,
        TextToImageRequest,
    )

    photo = picture(3, (64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    engines = {"tiny": DiffusionEngine.from_pretrained("tiny", device=device, dtype="float16"),
               "tiny-sdxl-ip2p": DiffusionEngine.from_pretrained("tiny-sdxl-ip2p", device=device, dtype="float16")}
    tasks = [
        ("text_to_image", "tiny", TextToImageRequest(prompts=["a red house"], seeds=[1], steps=4)),
        ("img2img", "tiny", Img2ImgRequest(prompts=["a cat"], seeds=[2], image=photo, steps=4)),
        ("inpaint", "tiny", InpaintRequest(prompts=["a door"], seeds=[3], image=photo, mask=mask, steps=4)),
        ("instruct", "tiny-sdxl-ip2p", InstructEditRequest(prompts=["make it snowy"], seeds=[4], image=photo, steps=4)),
        ("text_to_image again", "tiny", TextToImageRequest(prompts=["a red house"], seeds=[1], steps=4)),
    ]
    pngs, peaks = {}, []
    for task, name, request in tasks:
        engine = engines[name]
        reset_vram(device)
        [image] = engine.run(request)
        dtypes = {key: str(module.dtype).removeprefix("torch.") for key, module in engine._pipeline.components.items()
                  if isinstance(module, torch.nn.Module)}
        print(f"diffusion {task} ({name}, fp16): {len(image.png)} B PNG, dtypes {dtypes}, VRAM {vram(device)}")
        if set(dtypes.values()) != {"float16"}:
            raise AssertionError(f"{task} left the modules in {dtypes}")
        pngs[task] = image.png
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) / 2**20)
    if pngs["text_to_image again"] != pngs["text_to_image"]:
        raise AssertionError("text-to-image bytes changed after the edits")
    return "5 tasks fp16" + (f", peak VRAM {max(peaks):.0f} MiB" if peaks else "")


# -- 4. multi-GPU ----------------------------------------------------------------------------------------------


def check_multi_gpu() -> str:
    from mgmflow.models.mgm import ChatRequest, MGMEngine, Message, load_pretrained

    split = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
             "model.norm": 1, "lm_head": 1}
    requests = [ChatRequest([Message("user", "What is this?", [picture(5)])], max_new_tokens=16),
                ChatRequest([Message("user", "Tell me a story.")], max_new_tokens=16, temperature=0.7, seed=1)]
    one = MGMEngine(*load_pretrained("tiny", device="cuda:0", dtype=torch.float32), model_id="tiny")
    two = MGMEngine(*load_pretrained("tiny", dtype=torch.float32, device_map=split), model_id="tiny")
    placed = sorted({str(p.device) for p in two.model.language_model.parameters()})
    expected, answered = one.chat(requests), two.chat(requests)
    same = sum(a.text == b.text for a, b in zip(expected, answered))
    print(f"multi-gpu: LLM over {placed}: {same}/2 answers equal to one GPU's (fp32)")
    if len(placed) < 2 or same != 2:
        raise AssertionError(f"split over {placed}, {same}/2 answers equal")
    return f"split over {len(placed)} GPUs, answers equal"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fixtures", type=Path, default=None, help="the mgm-oracle folder (default: shared/...)")
    args = parser.parse_args()
    os.environ.setdefault("MGMFLOW_HOME", tempfile.mkdtemp(prefix="gpu-check-"))  # tiny presets built here
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()  # e.g. the SDXL VAE's fp32 upcast warns at every fp16 decode
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    fixtures = args.fixtures or next((c for c in FIXTURE_CANDIDATES if c.is_dir()), None)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA: VRAM figures and the multi-GPU split skipped)"
    print(f"device: {name}; torch {torch.__version__}; {torch.cuda.device_count() if cuda else 0} CUDA device(s)")
    parts = {
        "parity": lambda: check_parity(device, fixtures),
        "batch": lambda: check_batch(device),
        "diffusion": lambda: check_diffusion(device),
    }
    if cuda and torch.cuda.device_count() > 1:
        parts["multi-gpu"] = check_multi_gpu
    results, failed = {}, []
    started = time.perf_counter()
    for part, run in parts.items():
        try:
            results[part] = f"ok ({run()})"
        except Exception as error:  # noqa: BLE001 — report every part, then fail
            traceback.print_exc()
            results[part] = f"FAILED ({type(error).__name__}: {error})"
            failed.append(part)
    if "multi-gpu" not in parts:
        results["multi-gpu"] = "skipped (needs 2+ CUDA devices)"
    print(f"gpu_check {'FAILED' if failed else 'ok'} on {name.split(' (')[0]} in {time.perf_counter() - started:.0f}s: "
          + "; ".join(f"{part} {result}" for part, result in results.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
