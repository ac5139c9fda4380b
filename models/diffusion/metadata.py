"""Parameters inside the PNG: AUTOMATIC1111's ``parameters`` text chunk and a lossless JSON chunk.

The ``parameters`` chunk is what AUTOMATIC1111's PNG Info (and the tools that copied it: InvokeAI's importer,
civitai, ComfyUI nodes) read::

    a cat in a hat
    Negative prompt: lowres, blurry
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.0, Seed: 42, Size: 1024x1024,
    Model hash: 31e35c80fc, Model: sdxl-base, Lora hashes: "pixel_art: 0ae9ac13f1e4"

Samplers carry AUTOMATIC1111's names (``a1111_sampler``), ``Model hash`` is its short hash of a single-file
checkpoint (sha256 of the file, 10 hex digits) and ``Lora hashes`` its short LoRA hash (sha256 of a
``.safetensors`` file's tensor data after its header, 12 hex digits), so civitai-style lookups find them. Values
holding a comma, colon or newline are JSON-quoted, as AUTOMATIC1111 does. The ``mgmflow`` chunk holds the same
parameters as JSON, exactly (the diffusers class in ``scheduler``). Nothing that varies between runs is written (no time, run id or path), so
the same request gives the same bytes.
"""

from __future__ import annotations

import io
import json
import re

from PIL import Image, PngImagePlugin

from mgmflow.models.errors import InvalidImageError

PARAMETERS_CHUNK = "parameters"
JSON_CHUNK = "mgmflow"

# Infotext fields in AUTOMATIC1111's order -> (our key, type). Size ("WxH") and LoRAs are handled on their own.
_FIELDS = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "Schedule type": ("schedule_type", str),
    "CFG scale": ("guidance_scale", float),
    "Image CFG scale": ("image_guidance_scale", float),
    "Seed": ("seed", int),
    "Size": None,
    "Model hash": ("model_hash", str),
    "Model": ("model", str),
    "Denoising strength": ("strength", float),
}
# diffusers scheduler -> AUTOMATIC1111 sampler (the diffusers docs' mapping table). DPM-Solver++ is refined by
# its config below; a scheduler A1111 lacks keeps its class name.
_SAMPLERS = {
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverSinglestepScheduler": "DPM++ SDE",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DDIMScheduler": "DDIM",
    "PNDMScheduler": "PLMS",
    "UniPCMultistepScheduler": "UniPC",
    "LCMScheduler": "LCM",
}
_MULTISTEP_SDE = {2: "DPM++ 2M SDE", 3: "DPM++ 3M SDE"}
# Sigma schedules A1111 writes as "Schedule type" (diffusers config flag -> name).
_SCHEDULE_TYPES = {"use_karras_sigmas": "Karras", "use_exponential_sigmas": "Exponential", "use_beta_sigmas": "Beta"}
# One "Key: value" pair of the last line; values may be JSON strings holding commas (AUTOMATIC1111's pattern).
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"


def encode_png(image: Image.Image, parameters: dict) -> bytes:
    """``image`` as PNG bytes carrying ``parameters`` (see ``mgmflow.models.diffusion.engine`` for the keys)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, infotext(parameters))  # tEXt, or iTXt when the prompt is not Latin-1
    info.add_text(JSON_CHUNK, json.dumps(parameters, sort_keys=True, ensure_ascii=True, separators=(",", ":")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_parameters(png: bytes) -> dict:
    """The parameters of a PNG: our JSON chunk when present, else a parse of an AUTOMATIC1111 ``parameters`` chunk.

    Raises ``InvalidImageError`` for bytes that are not a PNG or carry neither chunk.
    """
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.format != "PNG":
                raise InvalidImageError(f"not a PNG but {image.format}")
            chunks = dict(image.text)
    except (OSError, SyntaxError, ValueError) as error:
        raise InvalidImageError(f"not a readable PNG: {error}") from error
    if JSON_CHUNK in chunks:
        return json.loads(chunks[JSON_CHUNK])
    if PARAMETERS_CHUNK in chunks:
        return parse_infotext(chunks[PARAMETERS_CHUNK])
    raise InvalidImageError("the PNG carries no generation parameters")


def a1111_sampler(scheduler) -> tuple[str, str | None]:
    """(``Sampler``, ``Schedule type`` or None) as AUTOMATIC1111 names a diffusers scheduler object."""
    name, config = type(scheduler).__name__, scheduler.config
    sampler = _SAMPLERS.get(name, name)
    if name == "DPMSolverMultistepScheduler" and config.get("algorithm_type") in ("sde-dpmsolver++", "sde-dpmsolver"):
        sampler = _MULTISTEP_SDE.get(config.get("solver_order"), sampler)
    schedule = next((label for flag, label in _SCHEDULE_TYPES.items() if config.get(flag)), None)
    return sampler, schedule


def infotext(parameters: dict) -> str:
    """The AUTOMATIC1111 ``parameters`` text of ``parameters``."""
    lines = [parameters["prompt"]]
    if parameters.get("negative_prompt"):
        lines.append(f"{_NEGATIVE} {parameters['negative_prompt']}")
    size = f"{parameters['width']}x{parameters['height']}"
    fields = {label: size if spec is None else parameters.get(spec[0]) for label, spec in _FIELDS.items()}
    loras = parameters.get("loras") or []
    if loras:
        fields["Lora hashes"] = ", ".join(f"{lora['name']}: {lora['hash'][:12]}" for lora in loras)
        fields["Lora weights"] = ", ".join(f"{lora['name']}: {lora['weight']}" for lora in loras)
    pairs = [f"{label}: {_quote(value)}" for label, value in fields.items() if value is not None]
    lines.append(", ".join(pairs))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict:
    """Parse an AUTOMATIC1111 ``parameters`` text into our keys; fields we do not know keep their label."""
    *lines, last = text.strip().split("\n")
    if len(_PAIR.findall(last)) < 3:  # no settings line: the whole text is prompts
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            negative.append(line[len(_NEGATIVE):].strip())
        else:
            (negative if in_negative else prompt).append(line)
    parameters: dict = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    raw = {label: _unquote(value) for label, value in _PAIR.findall(last)}
    for label, value in raw.items():
        if label == "Size" and re.fullmatch(r"\d+x\d+", value):
            width, height = value.split("x")
            parameters["width"], parameters["height"] = int(width), int(height)
        elif _FIELDS.get(label):
            key, kind = _FIELDS[label]
            try:
                parameters[key] = kind(value)
            except ValueError:  # another tool's spelling: keep it as text under its label
                parameters[label] = value
        elif label not in ("Lora hashes", "Lora weights"):
            parameters[label] = value
    scheduler = {sampler: name for name, sampler in _SAMPLERS.items()}.get(parameters.get("sampler", ""))
    if scheduler or parameters.get("sampler") in _SAMPLERS:  # A1111's name, or a diffusers class name as-is
        parameters["scheduler"] = scheduler or parameters["sampler"]
    if "Lora hashes" in raw:
        weights = _name_values(raw.get("Lora weights", ""))
        parameters["loras"] = [
            {"name": name, "hash": short_hash, "weight": float(weights.get(name, 1.0))}
            for name, short_hash in _name_values(raw["Lora hashes"]).items()
        ]
    return parameters


def _quote(value: object) -> str:
    text = str(value)
    if "," in text or ":" in text or "\n" in text or '"' in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def _unquote(value: str) -> str:
    if value.startswith('"') and value.endswith('"') and len(value) > 1:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _name_values(text: str) -> dict[str, str]:
    pairs = (item.rsplit(":", 1) for item in text.split(",") if ":" in item)
    return {name.strip(): value.strip() for name, value in pairs}
