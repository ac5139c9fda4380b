"""Named Mini-Gemini checkpoints: tiny random ones built locally, and the released ones.

- ``tiny`` (= ``tiny-llama``, a Vicuna-like LLaMA backbone), ``tiny-gemma``, ``tiny-hd`` (LLaMA, HD geometry)
  and ``small`` (for benchmarks: compute dominates on a CPU) are built on first use from a spec, deterministic
  random weights and the fixed tiny tokenizer, in the released layout (official config keys, both towers inside
  ``model.safetensors``), under ``$MGMFLOW_HOME/presets/<name>-<content hash>/``. The build happens in a
  temporary folder renamed into place, so processes racing to build the same preset all end up with one
  complete folder.
- ``mgm-2b`` ... ``mgm-34b-hd`` are the released checkpoints: ``$MGMFLOW_MODELS_DIR/<name>`` if it exists, else
  the Hugging Face cache of ``YanweiLi/MGM-...``; nothing is ever downloaded here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mgmflow.models.errors import ModelNotFoundError
from mgmflow.models.paths import hub_cache, mgmflow_home, models_dir

# Bump when the build procedure changes: the content hash (and so the folder) changes with it.
BUILD_VERSION = 1
INIT_SEED = 1234


@dataclass(frozen=True)
class TinySpec:
    """Everything a random preset is built from (hashed into its folder name)."""

    backbone: str
    text: dict
    clip: dict  # hidden_size, num_hidden_layers, intermediate_size, image_size, patch_size
    aux_depths: tuple[int, ...] = (1, 1, 2, 1)
    aux_dims: tuple[int, ...] = (8, 16, 32, 64)
    image_size_aux: int = 192
    image_grid: int = 1
    image_global: bool = False
    tokenizer_model_max_length: int = 2048
    extra: dict = field(default_factory=dict)


_TINY_CLIP = {"hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 512, "image_size": 84, "patch_size": 14}
_TINY_LLAMA_TEXT = {
    "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}  # fmt: skip

TINY_PRESETS: dict[str, TinySpec] = {
    "tiny-llama": TinySpec("llama", _TINY_LLAMA_TEXT, _TINY_CLIP),
    "tiny-gemma": TinySpec(
        "gemma",
        {
            "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 1, "head_dim": 16, "hidden_act": "gelu", "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        },  # fmt: skip
        _TINY_CLIP,
    ),
    "tiny-hd": TinySpec(
        "llama", _TINY_LLAMA_TEXT, _TINY_CLIP, image_size_aux=384, image_grid=2, image_global=True,
        tokenizer_model_max_length=4096,
    ),  # fmt: skip
    # Benchmarks, in a released model's proportions at CPU scale: the real visual geometry (CLIP 336/14 -> 24x24 =
    # 576 tokens per image; ConvNeXt at 768 -> a 192x192 map, so an 8x8 mining window under each token) with
    # narrow, shallow towers, and a 52M-parameter GQA LLM whose prefill of a one-image prompt (~620 tokens)
    # outweighs both towers several times over, as the 7B LLM outweighs CLIP-L + ConvNeXt-L.
    "small": TinySpec(
        "llama",
        {
            "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
            "num_key_value_heads": 4, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },  # fmt: skip
        {"hidden_size": 128, "num_hidden_layers": 3, "intermediate_size": 512, "image_size": 336, "patch_size": 14},
        aux_depths=(1, 1, 3, 1),
        aux_dims=(8, 16, 32, 64),
        image_size_aux=768,
    ),
}
ALIASES = {"tiny": "tiny-llama"}

REAL_PRESETS: dict[str, str] = {
    name: f"YanweiLi/MGM-{name.removeprefix('mgm-').upper().replace('X', 'x')}"
    for name in (
        "mgm-2b", "mgm-7b", "mgm-7b-hd", "mgm-13b", "mgm-13b-hd", "mgm-8b", "mgm-8b-hd",
        "mgm-8x7b", "mgm-8x7b-hd", "mgm-34b", "mgm-34b-hd",
    )
}  # fmt: skip


@dataclass(frozen=True)
class PresetInfo:
    name: str
    kind: str  # "tiny" (built locally) or "released"
    location: str  # the folder it is (or will be) in, or where its weights are expected
    available: bool


def resolve(name_or_path: str | Path) -> Path:
    """A checkpoint folder for a folder path, a preset name, or a cached hub id (tiny presets are built here)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path.resolve()
    name = ALIASES.get(str(name_or_path).lower(), str(name_or_path).lower())
    if name in TINY_PRESETS:
        return _ensure_built(name)
    if name in REAL_PRESETS:
        return _released_folder(name)
    cached = hub_cache(str(name_or_path))  # e.g. "YanweiLi/MGM-7B" already in the HF cache
    if cached is not None:
        return cached
    presets = ", ".join([*ALIASES, *TINY_PRESETS, *REAL_PRESETS])
    raise ModelNotFoundError(f"no such model folder or preset: {name_or_path} (presets: {presets})")


def list_presets() -> list[PresetInfo]:
    infos = []
    shown = {target: alias for alias, target in ALIASES.items()}  # "tiny", as every command names it
    for name in TINY_PRESETS:
        # Always available: built locally, deterministically, on first use.
        infos.append(PresetInfo(shown.get(name, name), "tiny", f"built locally under {_tiny_folder(name)}", True))
    for name, repo in REAL_PRESETS.items():
        found = _find_released(name)
        expected = f"{_local_folder(name)} or hub {repo}"
        infos.append(PresetInfo(name, "released", str(found or expected), found is not None))
    return infos


# -- released checkpoints --------------------------------------------------------------------------------------


def _local_folder(name: str) -> Path:
    """Where ``$MGMFLOW_MODELS_DIR`` says a released checkpoint lives (whether or not it is there)."""
    return models_dir() / name


def _find_released(name: str) -> Path | None:
    local = _local_folder(name)
    return local if local.is_dir() else hub_cache(REAL_PRESETS[name])


def _released_folder(name: str) -> Path:
    folder = _find_released(name)
    if folder is not None:
        return folder
    repo, local = REAL_PRESETS[name], _local_folder(name)
    raise ModelNotFoundError(
        f"weights of {name} not found: looked in {local} ($MGMFLOW_MODELS_DIR) and the Hugging Face cache "
        f"for {repo}. Download them first, e.g. `hf download {repo} --local-dir {local}`"
    )


# -- tiny presets ----------------------------------------------------------------------------------------------


def _tiny_folder(name: str) -> Path:
    from mgmflow.models.mgm.tokenizer import VOCAB_FILE

    recipe = {
        "spec": asdict(TINY_PRESETS[name]),
        "build_version": BUILD_VERSION,
        "seed": INIT_SEED,
        "tokenizer": hashlib.sha256(VOCAB_FILE.read_bytes()).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return mgmflow_home() / "presets" / f"{name}-{digest}"


def _ensure_built(name: str) -> Path:
    target = _tiny_folder(name)
    if target.is_dir():
        return target  # only ever created complete, by the rename below
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny(TINY_PRESETS[name], staging)
        try:
            os.replace(staging, target)  # atomic; refuses a non-empty target
        except OSError:
            if not target.is_dir():
                raise  # another process did not win the race: a real error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_tiny(spec: TinySpec, folder: Path) -> None:
    """Write a random preset (config, weights, tokenizer) into ``folder``; same spec -> same bytes."""
    from transformers import CLIPVisionConfig

    from mgmflow.models.mgm.configuration import BACKBONES, MGMConfig
    from mgmflow.models.mgm.hf_logging import quiet_transformers
    from mgmflow.models.mgm.initialization import init_deterministic_
    from mgmflow.models.mgm.modeling import MGMForCausalLM
    from mgmflow.models.mgm.tokenizer import load_tiny_tokenizer

    tokenizer = load_tiny_tokenizer("gemma" if spec.backbone == "gemma" else "llama")
    with quiet_transformers():
        text_config = BACKBONES[spec.backbone](
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec.text,
        )
    if "hidden_act" in spec.text:
        text_config.hidden_act = spec.text["hidden_act"]  # GemmaConfig rewrites "gelu"; keep MGM-2B's value
    clip = spec.clip
    vision_config = CLIPVisionConfig(
        num_attention_heads=clip["hidden_size"] // 64, hidden_act="quick_gelu", layer_norm_eps=1e-5, **clip
    )
    config = MGMConfig(
        text_config=text_config,
        backbone=spec.backbone,
        mm_hidden_size=clip["hidden_size"],
        mm_hidden_size_aux=sum(spec.aux_dims),
        mm_vision_tower=None,
        mm_vision_tower_aux=None,
        image_size_aux=spec.image_size_aux,
        image_grid=spec.image_grid,
        image_global=spec.image_global,
        tokenizer_model_max_length=spec.tokenizer_model_max_length,
        extra={
            "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "optimize_vision_tower": False,
            "optimize_vision_tower_aux": False, "use_mm_proj": True, "image_grid_pinpoints": None,
            **spec.extra,
        },  # fmt: skip
        vision_config=vision_config,
        aux_depths=spec.aux_depths,
        aux_dims=spec.aux_dims,
    )
    model = MGMForCausalLM.from_config(config)
    init_deterministic_(model, seed=INIT_SEED)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
