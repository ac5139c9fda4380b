"""Diffusion steps: ``diffusion.text2img``, ``edit.img2img``, ``edit.instruct``, ``edit.inpaint``.

Compatible requests (same model, operation and settings: ``mgmflow.models.diffusion.requests.batch_key``) that arrive
together are drawn in one pipeline call; each step stores its own PNGs, their parameters as metadata.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mgmflow.workers.batching import BatchItem
from mgmflow.workers.steps import StepContext, get_runtime, step


class LoraInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096)  # on the worker's disk (or shared volume)
    weight: float = Field(default=1.0, ge=-10, le=10)


class _DrawInput(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    loras: list[LoraInput] = Field(default_factory=list, max_length=8)
    prompts: list[str] = Field(min_length=1, max_length=16)
    seeds: list[int] | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None

    # Drawn alone, never merged with other tasks: batch composition changes a CPU/GPU result's last bits, so a
    # caller that needs byte-identical images whatever the arrival order (a story with --seed) asks for this.
    exclusive: bool = False
    preview_every: int = Field(default=0, ge=0)  # store a low-cost preview every N steps (0: none) in task.step


    def request_fields(self) -> dict:
        return self.model_dump(exclude={"model", "loras", "image", "mask", "exclusive", "preview_every"},
                               exclude_none=True)


class Text2ImgInput(_DrawInput):
    pass


class Img2ImgInput(_DrawInput):
    image: str  # artifact id
    strength: float | None = None


class InstructInput(_DrawInput):
    image: str
    image_guidance_scale: float | None = None


class InpaintInput(_DrawInput):
    image: str
    mask: str
    strength: float | None = None


def _draw(ctx: StepContext, family: str, operation: str, data: _DrawInput, request) -> dict:
    """Run ``request`` through the batcher of (operation, model) and store one PNG per image."""
    from mgmflow.models.diffusion.requests import batch_key, combine

    runtime = get_runtime()
    loras = tuple((lora.path, lora.weight) for lora in data.loras)

    def run(items: list[BatchItem], check) -> list:
        engine = runtime.models.get(family, data.model, loras)

        def on_step(step: int, total: int, preview=None) -> None:
            for index, item in enumerate(items):
                if not item.stopped:  # the engine's preview shows the batch's first image
                    item.on_progress(step, total, preview if index == 0 else None)

        with runtime.models.guard():
            images = getattr(engine, operation)(combine([item.request for item in items]), on_step=on_step,
                                                check=check)
        results, start = [], 0
        for item in items:
            count = len(item.request.prompts)
            results.append((images[start:start + count], len(items)))
            start += count
        return results

    batcher = runtime.batcher((operation, data.model, loras), run, max_size=runtime.settings.diffusion_batch_size)
    key = (batch_key(request), ctx.header.task_id) if data.exclusive else batch_key(request)

    def on_progress(step: int, total: int, preview=None) -> None:
        wanted = data.preview_every and (step % data.preview_every == 0 or step == total)
        ctx.on_step(step, total, preview if wanted else None)

    images, batch_size = batcher(BatchItem(request, key, check=ctx.check, on_progress=on_progress))
    stored = [{"artifact": ctx.put_artifact(image.png, media_type="image/png",
                                            metadata={"parameters": image.parameters, "model": data.model}),
               "seed": image.seed} for image in images]
    return {"images": stored, "model": data.model, "batch_size": batch_size}


@step("diffusion.text2img", Text2ImgInput)
def text2img(ctx: StepContext, data: Text2ImgInput) -> dict:
    from mgmflow.models.diffusion.requests import TextToImageRequest

    return _draw(ctx, "diffusion", "text_to_image", data, TextToImageRequest(**data.request_fields()))


@step("edit.img2img", Img2ImgInput)
def img2img(ctx: StepContext, data: Img2ImgInput) -> dict:
    from mgmflow.models.diffusion.requests import Img2ImgRequest

    request = Img2ImgRequest(image=ctx.read_artifact(data.image), **data.request_fields())
    return _draw(ctx, "edit", "img2img", data, request)


@step("edit.instruct", InstructInput)
def instruct(ctx: StepContext, data: InstructInput) -> dict:
    from mgmflow.models.diffusion.requests import InstructEditRequest

    request = InstructEditRequest(image=ctx.read_artifact(data.image), **data.request_fields())
    return _draw(ctx, "edit", "instruct_edit", data, request)


@step("edit.inpaint", InpaintInput)
def inpaint(ctx: StepContext, data: InpaintInput) -> dict:
    from mgmflow.models.diffusion.requests import InpaintRequest

    request = InpaintRequest(image=ctx.read_artifact(data.image), mask=ctx.read_artifact(data.mask),
                             **data.request_fields())
    return _draw(ctx, "edit", "inpaint", data, request)


KIND_OF_REQUEST = {"TextToImageRequest": "diffusion.text2img", "Img2ImgRequest": "edit.img2img",
                   "InstructEditRequest": "edit.instruct", "InpaintRequest": "edit.inpaint"}


def task_for(request, store, *, scope: str, model: str, loras=()) -> tuple[str, dict]:
    """The step kind and payload that run ``request`` (a ``mgmflow.models.diffusion`` request) on a worker.

    Its images are checked here and put in ``store`` under ``scope``; the payload carries their ids.
    """
    payload: dict = {"model": model}
    for field in dataclasses.fields(request):
        value = getattr(request, field.name)
        if field.name in ("image", "mask"):
            payload[field.name] = store.put(_image_bytes(value), scope=scope, media_type="image/png", metadata={}).id
        elif value is not None:
            payload[field.name] = list(value) if isinstance(value, tuple) else value
    if loras:
        payload["loras"] = [{"path": str(path), "weight": weight} for path, weight in loras]
    return KIND_OF_REQUEST[type(request).__name__], payload


def _image_bytes(source) -> bytes:
    from mgmflow.models.images import load_image

    image = load_image(source)  # refuses missing, corrupt and oversized images before anything is sent
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    if isinstance(source, (bytes, bytearray)):
        return bytes(source)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
