"""Named diffusion models: tiny ones built locally, real ones found on disk (never downloaded).

``resolve(name_or_path)`` turns a preset name, a diffusers folder, a single-file ``.safetensors`` checkpoint or a
hub id into a local path:

- tiny presets are built from seeded random weights (``mgmflow.models.diffusion.tiny``) once per machine, atomically, into
  ``$MGMFLOW_HOME/presets/diffusion/<name>-<hash>/`` (the hash covers the builder, the vocabulary and the library
  versions, so a change builds a new folder instead of reusing a stale one);
- real presets are looked for in ``$MGMFLOW_MODELS_DIR/<name>`` (default ``$MGMFLOW_HOME/models``), then in the
  Hugging Face cache; when absent they raise ``ModelNotFoundError`` naming both places.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from mgmflow.models.diffusion.defaults import SD, SDXL, ModelDefaults
from mgmflow.models.errors import ModelNotFoundError
from mgmflow.models.paths import hub_cache, mgmflow_home, models_dir

TASKS = ("text_to_image", "img2img", "instruct_edit", "inpaint")


@dataclass(frozen=True)
class Preset:
    """A named model: what it does, its family's defaults, and where its weights come from."""

    name: str
    task: str  # its main task (a text-to-image model also does img2img and inpainting)
    family: str  # "sdxl" or "sd" (1.x / 2.x)
    defaults: ModelDefaults
    tiny_kind: str | None = None  # built locally by models.diffusion.tiny.build_pipeline(tiny_kind)
    hub_id: str | None = None  # real weights, looked up in the local Hugging Face cache only
    description: str = ""


_TINY_SDXL = replace(SDXL, steps=4)
_TINY_SD = replace(SD, steps=4)

PRESETS = {
    preset.name: preset
    for preset in (
        Preset("tiny", "text_to_image", "sdxl", _TINY_SDXL, tiny_kind="sdxl",
               description="tiny random SDXL-architecture model, 64x64 (the embedded default)"),
        Preset("tiny-sd", "text_to_image", "sd", _TINY_SD, tiny_kind="sd",
               description="tiny random SD 1.x-architecture model, 64x64"),
        Preset("tiny-ip2p", "instruct_edit", "sd", _TINY_SD, tiny_kind="sd-ip2p",
               description="tiny random InstructPix2Pix (SD 1.x architecture)"),
        Preset("tiny-sdxl-ip2p", "instruct_edit", "sdxl", _TINY_SDXL, tiny_kind="sdxl-ip2p",
               description="tiny random InstructPix2Pix (SDXL architecture)"),
        Preset("tiny-inpaint", "inpaint", "sdxl", _TINY_SDXL, tiny_kind="sdxl-inpaint",
               description="tiny random SDXL inpainting model (9-channel UNet)"),
        Preset("sdxl-base", "text_to_image", "sdxl", SDXL, hub_id="stabilityai/stable-diffusion-xl-base-1.0",
               description="SDXL 1.0 base, the model Mini-Gemini was released with"),
        Preset("playground-v2.5", "text_to_image", "sdxl", replace(SDXL, guidance_scale=3.0),
               hub_id="playgroundai/playground-v2.5-1024px-aesthetic",
               description="Playground v2.5 (SDXL architecture, EDM scheduler)"),
        Preset("sd-1.5", "text_to_image", "sd", SD, hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
               description="Stable Diffusion 1.5"),
        Preset("sd-2.1", "text_to_image", "sd", SD, hub_id="stabilityai/stable-diffusion-2-1",
               description="Stable Diffusion 2.1 (768x768)"),
        Preset("instruct-pix2pix", "instruct_edit", "sd", replace(SD, steps=20),
               hub_id="timbrooks/instruct-pix2pix", description="InstructPix2Pix (SD 1.x)"),
        Preset("sdxl-ip2p", "instruct_edit", "sdxl", replace(SDXL, steps=30),
               hub_id="diffusers/sdxl-instructpix2pix-768", description="InstructPix2Pix (SDXL, 768x768)"),
        Preset("sdxl-inpaint", "inpaint", "sdxl", SDXL, hub_id="diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
               description="SDXL 1.0 inpainting"),
        Preset("sd-inpaint", "inpaint", "sd", SD, hub_id="stable-diffusion-v1-5/stable-diffusion-inpainting",
               description="Stable Diffusion 1.5 inpainting"),
    )
}

DEFAULT_MODEL = "tiny"


@dataclass(frozen=True)
class PresetInfo:
    """One line of ``mgmflow models``: a preset and where its weights are expected."""

    name: str
    task: str
    family: str
    location: str
    available: bool
    description: str


def tiny_presets_dir() -> Path:
    return mgmflow_home() / "presets" / "diffusion"


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local diffusers folder or single-file checkpoint for a preset name, a path, or a (cached) hub id."""
    name = str(name_or_path)
    preset = PRESETS.get(name)
    if preset is not None and preset.tiny_kind is not None:
        return _build_tiny(preset)
    if preset is not None:
        return _find_real(preset)
    path = Path(name).expanduser()
    if path.exists():
        return _check_local(path)
    if looks_like_hub_id(name):
        cached = _hub_cache(name)
        if cached is None:
            raise ModelNotFoundError(
                f"model {name!r} is not in the Hugging Face cache and mgmflow never downloads at run time; "
                f"fetch it first (`hf download {name}`) or pass a local folder"
            )
        return cached
    raise ModelNotFoundError(
        f"unknown diffusion model {name!r}: not a preset ({', '.join(PRESETS)}), "
        "not an existing folder or .safetensors file, not a hub id"
    )


def list_presets() -> list[PresetInfo]:
    """Every preset, with where its weights are (or would be) and whether they are there now."""
    infos = []
    for preset in PRESETS.values():
        if preset.tiny_kind is not None:
            location, available = f"built locally under {tiny_presets_dir()}", True
        else:
            local = models_dir() / preset.name
            location = f"{local} or the Hugging Face cache ({preset.hub_id})"
            available = local.is_dir() or _hub_cache(preset.hub_id) is not None
        infos.append(PresetInfo(preset.name, preset.task, preset.family, location, available, preset.description))
    return infos


def _find_real(preset: Preset) -> Path:
    local = models_dir() / preset.name
    if local.is_dir():
        return _check_local(local)
    cached = _hub_cache(preset.hub_id)
    if cached is not None:
        return cached
    raise ModelNotFoundError(
        f"model {preset.name!r} is not available: put its diffusers folder at {local} "
        f"(or set MGMFLOW_MODELS_DIR), e.g. `hf download {preset.hub_id} --local-dir {local}`; "
        "mgmflow never downloads at run time"
    )


def _check_local(path: Path) -> Path:
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
        return path
    if path.suffix.lower() != ".safetensors":
        raise ModelNotFoundError(f"{path} is neither a diffusers folder nor a single-file .safetensors checkpoint")
    return path


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _hub_cache(hub_id: str) -> Path | None:
    """The cached snapshot of ``hub_id`` if it is a diffusers folder, or None."""
    folder = hub_cache(hub_id)
    return folder if folder is not None and (folder / "model_index.json").is_file() else None


def _build_tiny(preset: Preset) -> Path:
    """The cached folder of a tiny preset, built first if needed; safe when several processes build at once."""
    folder = tiny_presets_dir() / f"{preset.name}-{_tiny_fingerprint(preset.tiny_kind)}"
    if folder.is_dir():
        return folder
    from mgmflow.models.diffusion.tiny import build_pipeline

    folder.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_pipeline(preset.tiny_kind).save_pretrained(building, safe_serialization=True)
        # A rename is atomic: readers see no folder or a complete one. If another process won the race, its
        # folder is identical (same seed, same code); ours is dropped.
        os.replace(building, folder)
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return folder


def _tiny_fingerprint(kind: str) -> str:
    import diffusers
    import torch
    import transformers

    from mgmflow.models.diffusion import tiny

    versions = [kind, torch.__version__, diffusers.__version__, transformers.__version__]
    digest = hashlib.sha256(json.dumps(versions).encode())
    for source in (Path(tiny.__file__), tiny.TOKENIZER_DIR / "vocab.json", tiny.TOKENIZER_DIR / "merges.txt"):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]
