"""Released geometry: every Mini-Gemini family at its real widths, through the loader and one multimodal forward.

The tiny presets and the oracle fixtures use small widths, so the shapes of the released models are never
exercised there. This check writes, per released model, a random checkpoint laid out as the released folder:
``config.json`` with the released keys and values (only ``num_hidden_layers`` cut to ``--llm-layers``), sharded
``model-0000k-of-0000n.safetensors`` + index under the released key names (Mixtral's experts as
``block_sparse_moe.experts.{e}.w1/w2/w3``), both towers inside. Real: CLIP ViT-L/14 at 336 (1024 wide, 16 heads,
576 tokens), ConvNeXt-L (192/384/768/1536 = 2880 channels) at 768, or 1536 for HD (4 crops + global = 2880
tokens), the projectors, every LLM's hidden size, heads, KV heads, MLP (or experts) and vocabulary. Cut, because
depth changes no shape: the LLM to ``--llm-layers`` layers, CLIP to 2 layers, each ConvNeXt stage to 1 block.

Each model then loads through ``load_pretrained`` in bf16 on the CPU, picks its conversation template from the
config, and runs one multimodal forward (a real-size picture through the processor) and ``--decode-steps``
cached decode steps; logits must be finite and of the vocabulary's width. Each model runs in its own process, so
its peak memory (printed: anonymous, and resident including the mapped checkpoint's page cache) is its own.
Measured on one CPU core: 1.3-1.6 GiB anonymous for the 336 models, 2.3 GiB for MGM-7B-HD, 3.9 GiB for
MGM-8x7B (one 8-expert layer holds 2.8 GB of experts); 7/7 ok in about 8 minutes.

Usage: OMP_NUM_THREADS=1 python bench/bench_geometry.py [--models mgm-7b,mgm-7b-hd,...] [--llm-layers 1]
(default: the six released families at 336 and MGM-7B-HD; ``--models all`` adds every HD variant; a few minutes
on one CPU core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The keys every released config.json carries besides the LLM's own (as the official code writes them).
MGM_FIELDS = {
    "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
    "mm_hidden_size": 1024, "mm_hidden_size_aux": 2880, "mm_projector_lr": None, "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2, "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
    "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
    "optimize_vision_tower": False, "optimize_vision_tower_aux": False, "tokenizer_padding_side": "right",
    "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "torch_dtype": "bfloat16",
}  # fmt: skip
_LLAMA = {
    "architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm", "attention_bias": False, "attention_dropout": 0.0,
    "hidden_act": "silu", "initializer_range": 0.02, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "transformers_version": "4.36.2",
}  # fmt: skip
# The base LLM of each released family (its own config.json values), and the template it was trained with.
FAMILIES = {
    "mgm-2b": ("gemma", {
        "architectures": ["MiniGeminiGemmaForCausalLM"], "model_type": "mgm_gemma", "attention_bias": False,
        "attention_dropout": 0.0, "hidden_act": "gelu", "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "hidden_size": 2048, "intermediate_size": 16384, "num_attention_heads": 8, "num_key_value_heads": 1,
        "head_dim": 256, "max_position_embeddings": 8192, "rope_theta": 10000.0, "vocab_size": 256000,
        "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "aux_img_fold": False, "aux_with_fpn": False,
        "transformers_version": "4.38.2",
    }),
    "mgm-7b": ("vicuna_v1", {
        **_LLAMA, "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
        "num_key_value_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0, "vocab_size": 32000,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }),
    "mgm-13b": ("vicuna_v1", {
        **_LLAMA, "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40,
        "num_key_value_heads": 40, "max_position_embeddings": 4096, "rope_theta": 10000.0, "vocab_size": 32000,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    }),
    "mgm-8b": ("llama_3", {
        **_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0, "vocab_size": 128256,
        "bos_token_id": 128000, "eos_token_id": 128001,
    }),
    "mgm-8x7b": ("mistral_instruct", {
        "architectures": ["MGMMixtralForCausalLM"], "model_type": "mgm_mixtral", "attention_dropout": 0.0,
        "hidden_act": "silu", "initializer_range": 0.02, "rms_norm_eps": 1e-05, "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "output_router_logits": False, "router_aux_loss_coef": 0.02,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "sliding_window": None, "vocab_size": 32000,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "transformers_version": "4.36.2",
    }),
    "mgm-34b": ("chatml_direct", {
        **_LLAMA, "hidden_size": 7168, "intermediate_size": 20480, "num_attention_heads": 56,
        "num_key_value_heads": 8, "max_position_embeddings": 4096, "rope_theta": 5000000.0, "vocab_size": 64000,
        "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
    }),
}  # fmt: skip
MODELS = [*FAMILIES, *(f"{name}-hd" for name in FAMILIES if name != "mgm-2b")]  # no MGM-2B-HD was released
DEFAULT_MODELS = [*FAMILIES, "mgm-7b-hd"]
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336,
              "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
CONVNEXT_L_DIMS = (192, 384, 768, 1536)
TOWER_LAYERS, AUX_DEPTHS = 2, (1, 1, 1, 1)
SHARD_BYTES = 512 * 2**20


def released_config(name: str, llm_layers: int) -> dict:
    """The released ``config.json`` of ``name`` (e.g. ``mgm-8x7b-hd``) with ``llm_layers`` LLM layers."""
    family, hd = name.removesuffix("-hd"), name.endswith("-hd")
    _, llm = FAMILIES[family]
    geometry = {"image_grid": 2, "image_global": True, "image_size_aux": 1536, "tokenizer_model_max_length": 4096} \
        if hd else {"image_grid": 1, "image_global": False, "image_size_aux": 768, "tokenizer_model_max_length": 2048}
    return dict(sorted({**MGM_FIELDS, **llm, **geometry, "num_hidden_layers": llm_layers,
                        "_name_or_path": f"work_dirs/MGM/{name.upper()}"}.items()))


def _llm_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """The LLM's weights under the released checkpoint names."""
    hidden, inter, vocab = raw["hidden_size"], raw["intermediate_size"], raw["vocab_size"]
    head_dim = raw.get("head_dim", hidden // raw["num_attention_heads"])
    q, kv = raw["num_attention_heads"] * head_dim, raw["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not raw.get("tie_word_embeddings", raw["model_type"] == "mgm_gemma"):
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(raw["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        shapes |= {f"{layer}.input_layernorm.weight": (hidden,), f"{layer}.post_attention_layernorm.weight": (hidden,),
                   f"{layer}.self_attn.q_proj.weight": (q, hidden), f"{layer}.self_attn.k_proj.weight": (kv, hidden),
                   f"{layer}.self_attn.v_proj.weight": (kv, hidden), f"{layer}.self_attn.o_proj.weight": (hidden, q)}
        if "num_local_experts" in raw:
            shapes[f"{layer}.block_sparse_moe.gate.weight"] = (raw["num_local_experts"], hidden)
            for e in range(raw["num_local_experts"]):
                expert = f"{layer}.block_sparse_moe.experts.{e}"
                shapes |= {f"{expert}.w1.weight": (inter, hidden), f"{expert}.w2.weight": (hidden, inter),
                           f"{expert}.w3.weight": (inter, hidden)}
        else:
            shapes |= {f"{layer}.mlp.gate_proj.weight": (inter, hidden), f"{layer}.mlp.up_proj.weight": (inter, hidden),
                       f"{layer}.mlp.down_proj.weight": (hidden, inter)}
    return shapes


def _vision_weights(raw: dict):
    """Random towers and projectors at the released widths, under their checkpoint names (bf16)."""
    import torch
    from transformers import CLIPVisionConfig

    from mgmflow.models.mgm.configuration import MGMConfig
    from mgmflow.models.mgm.modeling import MGMForCausalLM

    config = MGMConfig.from_dict(raw)
    config.vision_config = CLIPVisionConfig(num_hidden_layers=TOWER_LAYERS, **CLIP_L_336)
    config.aux_depths, config.aux_dims = AUX_DEPTHS, CONVNEXT_L_DIMS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision = MGMForCausalLM(config, language_model=None).to(torch.bfloat16)
    return vision.checkpoint_state_dict()


def write_checkpoint(name: str, folder: Path, llm_layers: int) -> dict:
    """A random checkpoint of ``name`` in the released layout; only one shard is in memory at a time."""
    import torch
    from safetensors.torch import save_file

    raw = released_config(name, llm_layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    generator = torch.Generator().manual_seed(0)
    gemma = raw["model_type"] == "mgm_gemma"

    def tensors():
        yield from _vision_weights(raw).items()
        for key, shape in _llm_shapes(raw).items():
            if len(shape) == 1:  # norms: LLaMA scales by w, Gemma by (1 + w)
                yield key, (torch.zeros if gemma else torch.ones)(shape, dtype=torch.bfloat16)
            else:
                scale = 1.0 if key.endswith("embed_tokens.weight") else 1 / math.sqrt(shape[1])
                yield key, _random_rows(shape, scale, generator)

    shards, shard, size = [], {}, 0
    for key, tensor in tensors():
        shard[key] = tensor.contiguous()
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            shards.append(_save_shard(folder, len(shards), shard, save_file))
            shard, size = {}, 0
    if shard:
        shards.append(_save_shard(folder, len(shards), shard, save_file))
    weight_map = {}
    for index, keys in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{index}.safetensors").rename(folder / final)
        weight_map |= dict.fromkeys(keys, final)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return raw


def _random_rows(shape: tuple[int, int], scale: float, generator) -> "torch.Tensor":
    """N(0, scale^2) rows in bf16; past 509 rows (a prime, so no head or expert boundary aligns) they repeat:
    drawing billions of normals would take minutes, and a shape check needs no more randomness than this."""
    import torch

    block = torch.randn((min(shape[0], 509), shape[1]), generator=generator) * scale
    return block.to(torch.bfloat16).repeat(math.ceil(shape[0] / block.shape[0]), 1)[: shape[0]]


def _save_shard(folder: Path, index: int, shard: dict, save_file) -> list[str]:
    save_file(shard, folder / f"shard-{index}.safetensors", metadata={"format": "pt"})
    return list(shard)


class PeakMemory:
    """The largest anonymous resident memory (RssAnon: heap and tensors, not the page cache of mapped checkpoint
    files, which the kernel can drop) seen by a sampling thread, plus the kernel's own peak of everything."""

    def __init__(self, interval_s: float = 0.02):
        import threading

        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)
        self._thread.start()

    def _sample(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            status = Path("/proc/self/status").read_text()
            anon = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("RssAnon:"))
            self.peak_anon = max(self.peak_anon, anon * 1024)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_anon_gib": round(self.peak_anon / 2**30, 2),
                "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def check_model(name: str, llm_layers: int, decode_steps: int) -> dict:
    """Write, load and run one released geometry; returns its figures (raises on any failure)."""
    memory = PeakMemory()
    import numpy as np
    import torch
    from PIL import Image

    from mgmflow.models.mgm import IMAGE_TOKEN_INDEX, load_pretrained
    from mgmflow.models.mgm.conversation import template_for_config

    family = name.removesuffix("-hd")
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        started = time.perf_counter()
        raw = write_checkpoint(name, Path(tmp) / name, llm_layers)
        written = time.perf_counter()
        model, processor = load_pretrained(Path(tmp) / name, device="cpu", dtype=torch.bfloat16)
        loaded = time.perf_counter()
    template = template_for_config(model.config).name
    expected_template = FAMILIES[family][0]
    if template != expected_template:
        raise AssertionError(f"{name} picked the {template} template, not {expected_template}")
    expected_tokens = 2880 if name.endswith("-hd") else 576
    if model.num_visual_tokens != expected_tokens:
        raise AssertionError(f"{name} has {model.num_visual_tokens} visual tokens per image, not {expected_tokens}")

    picture = Image.fromarray((np.random.RandomState(0).rand(480, 640, 3) * 255).astype("uint8"))
    images, images_aux = processor.preprocess([picture])
    ids = torch.tensor([[raw["bos_token_id"], 319, 13563, IMAGE_TOKEN_INDEX, 13, 1724, 338, 445, 29973]])
    vocab = raw["vocab_size"]
    with torch.inference_mode():
        output = model(input_ids=ids, images=images, images_aux=images_aux, use_cache=True, logits_to_keep=1)
        prefilled = time.perf_counter()
        _check_logits(name, "prefill", output.logits, vocab)
        cache, generated = output.past_key_values, []
        for step in range(decode_steps):
            next_id = output.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(int(next_id))
            output = model(input_ids=next_id, past_key_values=cache, use_cache=True)
            _check_logits(name, f"decode step {step + 1}", output.logits, vocab)
        cache_length = cache.get_seq_length()
    finished = time.perf_counter()
    prompt_length = ids.shape[1] - 1 + expected_tokens
    if cache_length != prompt_length + decode_steps:
        raise AssertionError(f"{name}: the cache holds {cache_length} positions, not {prompt_length + decode_steps}")
    return {
        "model": name, "hidden": raw["hidden_size"], "vocab": vocab, "template": template,
        "visual_tokens": expected_tokens, "prompt_tokens": prompt_length, "decoded": generated,
        "write_s": round(written - started, 1), "load_s": round(loaded - written, 1),
        "prefill_s": round(prefilled - loaded, 1), "decode_s_per_step": round((finished - prefilled) / decode_steps, 2),
        **memory.stop(),
    }


def _check_logits(name: str, where: str, logits, vocab: int) -> None:
    import torch

    if logits.shape != (1, 1, vocab) or logits.dtype != torch.bfloat16 or not torch.isfinite(logits).all():
        raise AssertionError(f"{name} {where}: logits {tuple(logits.shape)} {logits.dtype}, finite: "
                             f"{bool(torch.isfinite(logits).all())} (expected (1, 1, {vocab}) bf16, finite)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, or all: {MODELS}")
    parser.add_argument("--llm-layers", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=3)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: check this model, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check_model(args.one, args.llm_layers, args.decode_steps)))
        return 0
    names = MODELS if args.models == "all" else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; known: {MODELS}")
    failed = []
    # Hermetic: a tower cached from the hub must not stand in for the random towers written here.
    env = {**os.environ, "HF_HUB_CACHE": tempfile.mkdtemp(prefix="empty-hub-")}
    for name in names:
        child = subprocess.run([sys.executable, __file__, "--one", name, f"--llm-layers={args.llm_layers}",
                                f"--decode-steps={args.decode_steps}"], capture_output=True, text=True, env=env)
        if child.returncode:
            failed.append(name)
            print(f"{name}: FAILED\n{child.stderr[-3000:]}", flush=True)
            continue
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        print(" ".join(f"{key}={value}" for key, value in figures.items()), flush=True)
    print(f"released geometry: {len(names) - len(failed)}/{len(names)} models ok" +
          (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
