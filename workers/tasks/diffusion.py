"""Diffusion steps: ``diffusion.text2img``, ``edit.img2img``, ``edit.instruct``, ``edit.inpaint``.

Compatible requests (same model, operation and settings: ``models.diffusion.requests.batch_key``) that arrive
together are drawn in one pipeline call; each step stores its own PNGs, their parameters as metadata.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from workers.batching import BatchItem
from workers.steps import StepContext, get_runtime, step


class _DrawInput(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    prompts: list[str] = Field(min_length=1, max_length=16)
    seeds: list[int] | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None

    def request_fields(self) -> dict:
        return self.model_dump(exclude={"model", "image", "mask"}, exclude_none=True)


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
    from models.diffusion.requests import batch_key, combine

    runtime = get_runtime()

    def run(items: list[BatchItem], check) -> list:
        engine = runtime.models.get(family, data.model)

        def on_step(step: int, total: int, preview=None) -> None:
            for item in items:
                if not item.stopped:
                    item.on_progress(step, total)

        with runtime.models.guard():
            images = getattr(engine, operation)(combine([item.request for item in items]), on_step=on_step,
                                                check=check)
        results, start = [], 0
        for item in items:
            count = len(item.request.prompts)
            results.append((images[start:start + count], len(items)))
            start += count
        return results

    batcher = runtime.batcher((operation, data.model), run, max_size=runtime.settings.diffusion_batch_size)
    images, batch_size = batcher(BatchItem(request, batch_key(request), check=ctx.check, on_progress=ctx.on_step))
    stored = [{"artifact": ctx.put_artifact(image.png, media_type="image/png",
                                            metadata={"parameters": image.parameters, "model": data.model}),
               "seed": image.seed} for image in images]
    return {"images": stored, "model": data.model, "batch_size": batch_size}


@step("diffusion.text2img", Text2ImgInput)
def text2img(ctx: StepContext, data: Text2ImgInput) -> dict:
    from models.diffusion.requests import TextToImageRequest

    return _draw(ctx, "diffusion", "text_to_image", data, TextToImageRequest(**data.request_fields()))


@step("edit.img2img", Img2ImgInput)
def img2img(ctx: StepContext, data: Img2ImgInput) -> dict:
    from models.diffusion.requests import Img2ImgRequest

    request = Img2ImgRequest(image=ctx.read_artifact(data.image), **data.request_fields())
    return _draw(ctx, "edit", "img2img", data, request)


@step("edit.instruct", InstructInput)
def instruct(ctx: StepContext, data: InstructInput) -> dict:
    from models.diffusion.requests import InstructEditRequest

    request = InstructEditRequest(image=ctx.read_artifact(data.image), **data.request_fields())
    return _draw(ctx, "edit", "instruct_edit", data, request)


@step("edit.inpaint", InpaintInput)
def inpaint(ctx: StepContext, data: InpaintInput) -> dict:
    from models.diffusion.requests import InpaintRequest

    request = InpaintRequest(image=ctx.read_artifact(data.image), mask=ctx.read_artifact(data.mask),
                             **data.request_fields())
    return _draw(ctx, "edit", "inpaint", data, request)
