"""Loading released Mini-Gemini folders as they are: ``load_pretrained(path) -> (model, processor)``.

What comes from where:

- the LLM: the backbone's transformers class, built from the checkpoint's own fields and filled by
  ``from_pretrained`` on the folder (so transformers renames / fuses what it must, e.g. Mixtral's experts);
- the CLIP and ConvNeXt towers: from the checkpoint's keys when present (every release holds both), else from
  the tower folders given (a CLIP HF folder; an open_clip folder with ``open_clip_model.safetensors`` or
  ``open_clip_pytorch_model.bin``), else from the ``mm_vision_tower*`` paths of ``config.json`` if they exist
  relative to the checkpoint (never relative to the working directory);
- ``mm_projector`` and ``vlm_uni_*``: from the checkpoint.

Any weight that is missing, or that nothing consumes, is an error naming it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

from mgmflow.models.errors import InvalidInputError, ModelNotFoundError
from mgmflow.models.mgm.configuration import MGMConfig
from mgmflow.models.mgm.convnext import ConvNeXtTrunk
from mgmflow.models.mgm.hf_logging import quiet_transformers
from mgmflow.models.mgm.modeling import CHECKPOINT_PREFIXES, MGMForCausalLM, from_checkpoint_name, to_checkpoint_name
from mgmflow.models.mgm.presets import resolve
from mgmflow.models.paths import hub_cache
from mgmflow.models.mgm.processing import MGMProcessor
from mgmflow.models.mgm.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

CLIP_PREFIX = "model.vision_tower.vision_tower.vision_model."
AUX_PREFIXES = ("model.vision_tower_aux.vision_stem.", "model.vision_tower_aux.vision_stages.")
OPEN_CLIP_TRUNK = "visual.trunk."
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# Keys older checkpoints carry that are derived buffers, not weights.
DERIVED_KEY_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")
# The local paths of released configs and the hub repos they stand for (mgm-official.md, section 12).
KNOWN_TOWERS = {
    "clip-vit-large-patch14-336": "openai/clip-vit-large-patch14-336",
    "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup": (
        "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup"
    ),
}
CLIP_HEAD_DIM = 64  # every OpenAI CLIP ViT; used only when no tower config is at hand
QUANTIZATIONS = ("4bit", "8bit")
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's


# -- the checkpoint's files ------------------------------------------------------------------------------------


# (index of a sharded checkpoint, single file): safetensors first, as the official loader tries them.
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


class CheckpointFiles:
    """The weight files of a folder (safetensors or ``.bin``, sharded or not) and lazy access to their tensors."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files = self._find(folder)
        self.key_to_file = {key: file for file in self.files for key in self._keys(file)}

    @classmethod
    def _find(cls, folder: Path) -> list[Path]:
        for index_name, single_name in WEIGHT_LAYOUTS:
            if (folder / single_name).is_file():
                return [folder / single_name]
            index = folder / index_name
            if index.is_file():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                missing = [name for name in shards if not (folder / name).is_file()]
                if missing:
                    raise ModelNotFoundError(f"{index} lists shards that are not in the folder: {missing}")
                return [folder / name for name in shards]
        raise ModelNotFoundError(
            f"no weights in {folder}: expected model.safetensors(.index.json) or pytorch_model.bin(.index.json)"
        )

    @staticmethod
    def _keys(file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as f:
                return list(f.keys())
        return list(_torch_load(file).keys())

    def keys(self) -> set[str]:
        return set(self.key_to_file)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.key_to_file[key], []).append(key)
        tensors = {}
        for file, file_keys in by_file.items():
            if file.suffix == ".safetensors":
                with safe_open(file, framework="pt") as f:
                    tensors.update({key: f.get_tensor(key) for key in file_keys})
            else:
                state = _torch_load(file)
                tensors.update({key: state[key] for key in file_keys})
        return tensors


def _torch_load(file: Path) -> dict[str, torch.Tensor]:
    # weights_only: a checkpoint is data; mmap: only the tensors we touch are read.
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


# -- device, dtype, quantization -------------------------------------------------------------------------------


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {device} was asked for, but CUDA is not available here")
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype.removeprefix("torch."))
        except AttributeError:
            raise InvalidInputError(f"unknown dtype {dtype!r}") from None
    if dtype is None:
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32  # half precision on CPU is slow and, for some ops, unsupported
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidInputError(f"dtype must be a floating point torch dtype, not {dtype!r}")
    return device, dtype


def quantization_config(quantization: str | None, dtype: torch.dtype, device: torch.device):
    """The bitsandbytes config for the LLM (the towers stay in ``dtype``), as the official loader sets it."""
    if quantization is None:
        return None
    if quantization not in QUANTIZATIONS:
        raise InvalidInputError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    needs = f"{quantization} loading quantizes the LLM with bitsandbytes, which needs a CUDA GPU"
    if not torch.cuda.is_available():
        raise InvalidInputError(f"{needs}: there is no CUDA device here")
    if device.type != "cuda":
        raise InvalidInputError(f"{needs}: the model was asked for on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InvalidInputError(f"{needs} and the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_quant_type="nf4",
    )


def check_device_map(device_map: str | dict | None) -> None:
    """Refuse a device map transformers would trip over later (or, for a missing GPU, with an AssertionError).

    A map is a placement strategy (``"auto"`` …), one device for the whole LLM (``"cuda:1"``), or a dict from
    the LLM's module names (``model.layers.12``, ``lm_head``) to devices: a CUDA index, ``"cuda:N"``, ``"cpu"``
    or ``"disk"`` (weights streamed in from the checkpoint at each forward).
    """
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return
    if isinstance(device_map, str):
        placements = {"": device_map}
    elif isinstance(device_map, dict):
        if not device_map:
            raise InvalidInputError("device_map is empty: map the LLM's modules to devices, or use 'auto'")
        placements = device_map
    else:
        raise InvalidInputError(
            f"device_map must be a strategy ({', '.join(DEVICE_MAP_STRATEGIES)}), a device, or a dict from the "
            f"LLM's module names to devices; got {type(device_map).__name__}"
        )
    for module, placement in placements.items():
        if placement == "disk":
            continue
        what = f"device_map places {module or 'the LLM'} on {placement!r}"
        try:  # a bare index means a CUDA device (torch.device would take the build's default accelerator)
            device = torch.device("cuda", placement) if isinstance(placement, int) else torch.device(placement)
        except (RuntimeError, TypeError):
            if module == "":
                strategies = ", ".join(DEVICE_MAP_STRATEGIES)
                raise InvalidInputError(
                    f"device_map {placement!r} is neither a strategy ({strategies}) nor a device"
                ) from None
            raise InvalidInputError(f"{what}: not a device (a CUDA index, 'cuda:N', 'cpu' or 'disk')") from None
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise InvalidInputError(f"{what}, but this machine has {visible} visible CUDA device(s)")


# -- towers ----------------------------------------------------------------------------------------------------


def _tower_folder(given: str | Path | None, configured: str | None, checkpoint: Path) -> Path | None:
    """The folder a tower comes from: the one given (a folder or a cached hub repo), else config.json's path if
    it exists relative to the checkpoint (never to the working directory), else that tower's cached hub repo."""
    if given is not None:
        path = Path(given).expanduser()
        if path.is_dir():
            return path.resolve()
        cached = hub_cache(str(given))
        if cached is None:
            raise ModelNotFoundError(f"vision tower folder not found: {given}")
        return cached
    if not configured:
        return None
    path = Path(configured).expanduser()
    folder = path if path.is_absolute() else checkpoint / path
    if folder.is_dir():
        return folder.resolve()
    return hub_cache(KNOWN_TOWERS.get(path.name, configured))


def _clip_config_from_shapes(weights: dict[str, torch.Tensor]) -> CLIPVisionConfig:
    """A CLIP vision config from its weights; the head count follows OpenAI's 64-wide heads."""
    hidden = weights["embeddings.class_embedding"].shape[0]
    patch = weights["embeddings.patch_embedding.weight"].shape[-1]
    positions = weights["embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers."))
    if hidden % CLIP_HEAD_DIM:
        raise ModelNotFoundError(
            f"cannot tell the head count of a {hidden}-wide CLIP tower from its weights: pass vision_tower= "
            "a CLIP folder with its config.json"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=weights["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers,
        num_attention_heads=hidden // CLIP_HEAD_DIM,
        patch_size=patch,
        image_size=patch * math.isqrt(positions - 1),
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _clip_config_from_folder(folder: Path) -> CLIPVisionConfig:
    return CLIPVisionConfig.from_pretrained(folder)  # reads a CLIPVisionConfig or a full CLIPConfig's vision part


def _clip_tower(checkpoint: CheckpointFiles, config: MGMConfig, given: str | Path | None):
    """(CLIP weights under our module names, CLIPVisionConfig)."""
    folder = _tower_folder(given, config.mm_vision_tower, checkpoint.folder)
    keys = [k for k in checkpoint.keys() if k.startswith(CLIP_PREFIX) and not k.endswith(DERIVED_KEY_SUFFIXES)]
    if keys:
        weights = {k[len(CLIP_PREFIX) :]: v for k, v in checkpoint.read(keys).items()}
        vision_config = _clip_config_from_folder(folder) if folder else _clip_config_from_shapes(weights)
    elif folder is not None:
        with quiet_transformers():
            tower, info = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)
        if info["missing_keys"]:
            raise ModelNotFoundError(f"CLIP tower in {folder} lacks weights: {sorted(info['missing_keys'])}")
        weights, vision_config = tower.state_dict(), tower.config
    else:
        raise ModelNotFoundError(
            f"{checkpoint.folder} holds no CLIP tower weights ({CLIP_PREFIX}*) and no tower folder was found: pass "
            f"vision_tower= a folder of {KNOWN_TOWERS['clip-vit-large-patch14-336']} (config path: "
            f"{config.mm_vision_tower!r})"
        )
    logger.info("CLIP tower: %s", "checkpoint weights" if keys else folder)
    return {"vision_tower." + k: v for k, v in weights.items()}, vision_config


def _aux_tower(checkpoint: CheckpointFiles, config: MGMConfig, given: str | Path | None):
    """ConvNeXt trunk weights under our module names (``vision_tower_aux.stem.*``, ``.stages.*``)."""
    keys = [k for k in checkpoint.keys() if k.startswith(AUX_PREFIXES)]
    if keys:
        return {from_checkpoint_name(k): v for k, v in checkpoint.read(keys).items()}
    folder = _tower_folder(given, config.mm_vision_tower_aux, checkpoint.folder)
    files = [folder / name for name in OPEN_CLIP_FILES if folder and (folder / name).is_file()]
    if not files:
        where = f"in {folder}" if folder else "(no tower folder was found)"
        raise ModelNotFoundError(
            f"{checkpoint.folder} holds no ConvNeXt tower weights ({AUX_PREFIXES[0]}*) and there is no "
            f"{' / '.join(OPEN_CLIP_FILES)} {where}: pass vision_tower_aux= a folder of "
            f"{KNOWN_TOWERS['openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup']} "
            f"(config path: {config.mm_vision_tower_aux!r})"
        )
    if files[0].suffix == ".safetensors":
        with safe_open(files[0], framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(OPEN_CLIP_TRUNK)}
    else:
        state = {k: v for k, v in _torch_load(files[0]).items() if k.startswith(OPEN_CLIP_TRUNK)}
    # Only the trunk's stem and stages are used (its norm_pre / head and the text tower are not).
    trunk = {k[len(OPEN_CLIP_TRUNK) :]: v for k, v in state.items()}
    weights = {"vision_tower_aux." + k: v for k, v in trunk.items() if k.startswith(("stem.", "stages."))}
    if not weights:
        raise ModelNotFoundError(f"{files[0]} holds no {OPEN_CLIP_TRUNK}stem/stages weights")
    logger.info("ConvNeXt tower: %s", files[0])
    return weights


# -- the LLM ---------------------------------------------------------------------------------------------------


def _load_language_model(folder: Path, config: MGMConfig, *, dtype, device, device_map, quantization_cfg):
    kwargs = {
        "config": config.text_config,
        "dtype": dtype,
        "output_loading_info": True,
        "ignore_mismatched_sizes": True,  # reported in the loading info, then raised by us naming them
    }
    if quantization_cfg is not None:
        kwargs["quantization_config"] = quantization_cfg
        device_map = device_map or {"": device.index or 0}
    if device_map is None and device.type != "cpu":
        device_map = {"": str(device)}  # straight onto the accelerator, not through host memory
    if device_map is not None:
        kwargs["device_map"] = device_map
    with quiet_transformers():
        language_model, info = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return language_model, info


# -- what a folder must be -------------------------------------------------------------------------------------

STAGE1_FILE = "mm_projector.bin"


def check_supported_folder(folder: Path, raw_config: dict) -> None:
    """Refuse, by name, the folders the official inference code loads differently (before anything is read)."""
    has_weights = any((folder / name).is_file() for layout in WEIGHT_LAYOUTS for name in layout)
    if (folder / STAGE1_FILE).is_file() and not has_weights:
        raise ModelNotFoundError(
            f"{folder} is a stage-1 (pretraining) folder: {STAGE1_FILE} holds only the projectors, trained with "
            "the `plain` captioning template on a frozen LLM; mgmflow serves the stage-2 checkpoints (MGM-2B ... "
            "MGM-34B-HD), which hold every weight"
        )
    # The official loader adds <im_start>/<im_end>/<im_patch> tokens around each image for these; no released
    # checkpoint sets them, and the image layout here is the released one.
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw_config.get(key):
            raise ModelNotFoundError(
                f"{folder / 'config.json'} sets {key}: true; mgmflow supports the released layout (false), where "
                "an image is one <image> placeholder"
            )


# -- public entry point ----------------------------------------------------------------------------------------


def load_pretrained(
    path: str | Path,
    *,
    vision_tower: str | Path | None = None,
    vision_tower_aux: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    quantization: str | None = None,
) -> tuple[MGMForCausalLM, MGMProcessor]:
    """Load a Mini-Gemini checkpoint folder (or a preset name) into ``(model, processor)``, in eval mode.

    ``device``/``dtype`` default to CUDA in bf16 (fp16 where bf16 is unsupported) or CPU in fp32.
    ``device_map`` (e.g. ``"auto"``, see :func:`check_device_map`) spreads the LLM over several GPUs (or parts of
    it to ``"cpu"`` / ``"disk"``); the towers sit with its embeddings. ``quantization`` ``"4bit"`` / ``"8bit"``
    quantizes the LLM with bitsandbytes (CUDA only). Both are checked before any weight is read.
    """
    folder = resolve(path)  # a folder, or a preset name (tiny presets are built on first use)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelNotFoundError(f"{folder} has no config.json: not a checkpoint folder")
    raw_config = json.loads(config_file.read_text())
    check_supported_folder(folder, raw_config)
    config = MGMConfig.from_dict(raw_config)
    tokenizer = load_tokenizer(folder, config.backbone)  # a missing library fails here, not after the weights
    if tokenizer is not None and len(tokenizer.tokenizer) > config.text_config.vocab_size:
        raise ModelNotFoundError(
            f"the tokenizer in {folder} has {len(tokenizer.tokenizer)} tokens, more than the model's vocabulary "
            f"({config.text_config.vocab_size}): the tokenizer files are not this checkpoint's"
        )
    device, dtype = resolve_device_dtype(device, dtype)
    # Placement and quantization are checked before any weight is read.
    check_device_map(device_map)
    quantization_cfg = quantization_config(quantization, dtype, device)
    checkpoint = CheckpointFiles(folder)

    # The vision side is read and checked first: its errors come before the (long) LLM load.
    clip_weights, config.vision_config = _clip_tower(checkpoint, config, vision_tower)
    aux_weights = _aux_tower(checkpoint, config, vision_tower_aux)
    trunk = ConvNeXtTrunk.from_state_dict_shapes({k.split(".", 1)[1]: v for k, v in aux_weights.items()})
    config.aux_depths, config.aux_dims = trunk.depths, trunk.dims
    # Older configs may not record the tower widths; the towers themselves do.
    config.mm_hidden_size = raw_config.get("mm_hidden_size", config.vision_config.hidden_size)
    config.mm_hidden_size_aux = raw_config.get("mm_hidden_size_aux", trunk.hidden_size)
    projector_keys = [k for k in checkpoint.keys() if k.startswith(tuple(CHECKPOINT_PREFIXES.values()))]
    projector_keys = [k for k in projector_keys if not k.startswith((CLIP_PREFIX, *AUX_PREFIXES))]
    weights = {**clip_weights, **aux_weights}
    weights.update({from_checkpoint_name(k): v for k, v in checkpoint.read(projector_keys).items()})
    _check_vision_weights(folder, config, weights)

    language_model, info = _load_language_model(
        folder, config, dtype=dtype, device=device, device_map=device_map, quantization_cfg=quantization_cfg
    )
    if device_map is not None:
        logger.info("LLM placement: %s", getattr(language_model, "hf_device_map", device_map))
    ours = {k for k in checkpoint.keys() if from_checkpoint_name(k) is not None}
    unexpected = sorted(k for k in set(info["unexpected_keys"]) - ours if not k.endswith(DERIVED_KEY_SUFFIXES))
    missing = sorted(k for k in info["missing_keys"] if not k.endswith(DERIVED_KEY_SUFFIXES))
    mismatched = [f"{key} {list(found)} (expected {list(wanted)})" for key, found, wanted in info["mismatched_keys"]]
    if missing or unexpected or mismatched:
        raise ModelNotFoundError(_describe_keys(folder, missing, unexpected, mismatched))

    vision_device = language_model.get_input_embeddings().weight.device
    with torch.device(vision_device):
        model = MGMForCausalLM(config, language_model)
    model.load_state_dict(weights, strict=False)  # exact key sets were checked above
    for name, module in model.named_children():
        if name != "language_model":  # the LLM is placed (and maybe quantized) by transformers
            module.to(vision_device, dtype)
    model.eval().requires_grad_(False)  # an inference model; fine-tuning code can switch parts back on
    processor = MGMProcessor.from_config(
        config, tokenizer=tokenizer.tokenizer if tokenizer else None, prompt_tokenizer=tokenizer
    )
    return model, processor


def _check_vision_weights(folder: Path, config: MGMConfig, weights: dict[str, torch.Tensor]) -> None:
    """Every tower/projector weight present, none extra, each of the right shape (against a weightless model)."""
    with torch.device("meta"):
        expected = MGMForCausalLM(config, language_model=None).state_dict()
    missing = sorted(to_checkpoint_name(k) for k in expected.keys() - weights.keys())
    unexpected = sorted(to_checkpoint_name(k) for k in weights.keys() - expected.keys())
    mismatched = [
        f"{to_checkpoint_name(k)} {list(weights[k].shape)} (expected {list(v.shape)})"
        for k, v in expected.items()
        if k in weights and weights[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ModelNotFoundError(_describe_keys(folder, missing, unexpected, mismatched))


def _describe_keys(folder: Path, missing, unexpected, mismatched=None) -> str:
    def sample(keys) -> str:
        keys = list(keys)
        return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")

    parts = [f"checkpoint {folder} does not match the model:"]
    if missing:
        parts.append(f"missing weights: {sample(missing)}")
    if unexpected:
        parts.append(f"unexpected weights: {sample(unexpected)}")
    if mismatched:
        parts.append(f"weights of the wrong shape: {sample(mismatched)}")
    return " ".join(parts)
