"""Loading pipelines from diffusers folders and single-file checkpoints, and attaching LoRA adapters.

Everything loads with ``local_files_only``: a missing file is a ``ModelNotFoundError``, never a download.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLInstructPix2PixPipeline,
    StableDiffusionXLPipeline,
)
from safetensors import SafetensorError, safe_open

from mgmflow.models.diffusion import presets
from mgmflow.models.errors import InvalidInputError, ModelNotFoundError

# Single-file checkpoints: (family, UNet input channels) -> the pipeline class and the preset whose diffusers
# folder supplies the component configs (a single file holds weights only; diffusers needs configs offline).
_SINGLE_FILE = {
    ("sdxl", 4): (StableDiffusionXLPipeline, "sdxl-base"),
    ("sdxl", 8): (StableDiffusionXLInstructPix2PixPipeline, "sdxl-ip2p"),
    ("sdxl", 9): (StableDiffusionXLInpaintPipeline, "sdxl-inpaint"),
    ("sd", 4): (StableDiffusionPipeline, "sd-1.5"),
    ("sd", 8): (StableDiffusionInstructPix2PixPipeline, "instruct-pix2pix"),
    ("sd", 9): (StableDiffusionInpaintPipeline, "sd-inpaint"),
    ("sd2", 4): (StableDiffusionPipeline, "sd-2.1"),
}
_UNET_INPUT = "model.diffusion_model.input_blocks.0.0.weight"
MAX_LORA_WEIGHT = 10.0


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA adapter file (diffusers or kohya ``.safetensors``) and the weight it is applied with."""

    path: str | Path
    weight: float = 1.0


def load_pipeline(path: Path, *, dtype: torch.dtype) -> DiffusionPipeline:
    """The pipeline stored at ``path`` (a diffusers folder or a single-file checkpoint), on the CPU."""
    if path.is_file():
        return _load_single_file(path, dtype)
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    options: dict = {"dtype": dtype, "local_files_only": True}
    if "safety_checker" in index:
        # As every Stable Diffusion UI does: no NSFW classifier blanking images (and no 1.2 GB model loaded).
        options |= {"safety_checker": None, "requires_safety_checker": False}
    if dtype == torch.float16 and any(path.glob("*/*.fp16.safetensors")):
        options["variant"] = "fp16"
    try:
        return DiffusionPipeline.from_pretrained(path, **options)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"could not load the diffusion model in {path.name}: {error}") from error


def family_of(pipeline: DiffusionPipeline) -> str:
    """``"sdxl"`` for pipelines with SDXL's two text encoders, else ``"sd"`` (1.x / 2.x)."""
    return "sdxl" if getattr(pipeline, "text_encoder_2", None) is not None else "sd"


def display_name(name_or_path: str) -> str:
    """The model's name as recorded in PNGs: a preset or hub id as given, a path by its last part only."""
    name = str(name_or_path)
    if name in presets.PRESETS or (presets.looks_like_hub_id(name) and not Path(name).exists()):
        return name
    path = Path(name)
    return path.stem if path.is_file() else path.name


def attach_loras(pipeline: DiffusionPipeline, loras: tuple[LoraSpec, ...]) -> list[dict]:
    """Load each adapter into ``pipeline`` at its weight; returns what the PNGs record: name, weight, the file's
    sha256 and ``hash``, AUTOMATIC1111's LoRA hash (``lora_hash``)."""
    records: list[dict] = []
    for lora in loras:
        path = Path(lora.path).expanduser()
        weight = lora.weight
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or abs(weight) > MAX_LORA_WEIGHT:
            raise InvalidInputError(f"LoRA weight must be a number in [-{MAX_LORA_WEIGHT:g}, {MAX_LORA_WEIGHT:g}]")
        if not path.is_file():
            raise ModelNotFoundError(f"LoRA file not found: {path}")
        name = re.sub(r"[^\w-]", "_", path.stem)  # peft adapter names may not hold dots
        if any(record["name"] == name for record in records):
            name = f"{name}_{len(records)}"
        try:
            pipeline.load_lora_weights(str(path), adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as error:
            raise InvalidInputError(f"LoRA {path.name} does not fit this model: {error}") from error
        records.append({"name": name, "weight": float(weight), "sha256": sha256_of(path), "hash": lora_hash(path)})
    if records:
        pipeline.set_adapters([r["name"] for r in records], adapter_weights=[r["weight"] for r in records])
    return records


def inspect_checkpoint(path: Path) -> tuple[str, int]:
    """(family, UNet input channels) of a single-file Stable Diffusion checkpoint, from its header only."""
    try:
        with safe_open(str(path), framework="pt") as checkpoint:
            keys = set(checkpoint.keys())
            in_channels = checkpoint.get_slice(_UNET_INPUT).get_shape()[1] if _UNET_INPUT in keys else None
    except (SafetensorError, OSError) as error:
        raise InvalidInputError(f"{path.name} is not a readable .safetensors file: {error}") from error
    if in_channels is None:
        raise InvalidInputError(f"{path.name} is not a Stable Diffusion / SDXL checkpoint (no UNet weights)")
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        family = "sdxl"
    elif any(key.startswith("cond_stage_model.model.") for key in keys):
        family = "sd2"
    else:
        family = "sd"
    if (family, in_channels) not in _SINGLE_FILE:
        raise InvalidInputError(f"{path.name}: unsupported {family} checkpoint with {in_channels} UNet input channels")
    return family, in_channels


def _load_single_file(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    family, in_channels = inspect_checkpoint(path)
    pipeline_class, config_preset = _SINGLE_FILE[(family, in_channels)]
    try:
        config = presets.resolve(config_preset)
    except ModelNotFoundError as error:
        raise ModelNotFoundError(
            f"{path.name} is a single-file {family} checkpoint; loading it offline needs the component configs "
            f"of {config_preset!r}: {error}"
        ) from error
    try:
        return pipeline_class.from_single_file(str(path), config=str(config), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ModelNotFoundError(f"could not load the checkpoint {path.name}: {error}") from error


def sha256_of(path: Path, *, offset: int = 0) -> str:
    """The sha256 of a file's bytes from ``offset`` on, read in blocks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        file.seek(offset)
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lora_hash(path: Path) -> str:
    """AUTOMATIC1111's LoRA hash (its "addnet" hash): for a ``.safetensors`` file, the sha256 of the tensor data
    after the 8-byte header length and the JSON header, so editing the metadata keeps the hash; else the file's."""
    if path.suffix != ".safetensors":
        return sha256_of(path)
    with path.open("rb") as file:
        header_length = int.from_bytes(file.read(8), "little")
    return sha256_of(path, offset=8 + header_length)


def model_hash(path: Path) -> str | None:
    """AUTOMATIC1111's ``Model hash`` of a single-file checkpoint (the file's sha256, 10 hex digits); None for a
    diffusers folder, which A1111 cannot load and so has no hash to match."""
    return sha256_of(path)[:10] if path.is_file() else None
