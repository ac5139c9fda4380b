"""LangChain tools over the worker tasks, for people who build their own agents.

    client = TaskClient(settings)
    tools = make_tools(client, scope="user-1")          # describe, ask, zoom, write_prompt, generate, ...
    agent = create_agent(model, tools)                    # any LangChain agent

Every tool validates its arguments first (a pydantic ``args_schema``, then checks against the store: the image
exists in the caller's scope, the mask matches it), naming the argument; only then does it submit one task through
``TaskClient.submit`` and wait for its record. Images go in and come out as artifact ids. No torch code here: the
models run in the workers.

Failures are reported the way LangChain tools report them: bad arguments and failed tasks become the tool's output
(a ``ToolMessage`` with ``status="error"`` in an agent), so the model reads what went wrong and can call again; a
made-up artifact id does not end the run. ``make_tools(..., handle_errors=False)`` raises them instead
(:class:`ToolInputError`, an ``InvalidInputError``; :class:`ToolTaskError`; pydantic's ``ValidationError``).
"""

from __future__ import annotations

import io
import uuid
from typing import Annotated, Any, ClassVar

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mgmflow.models.errors import InvalidInputError, MGMFlowError
from mgmflow.models.images import load_image

MAX_TEXT = 2000  # characters of a prompt, question or instruction (task messages are capped at 4 KB)
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT)]


class ToolTaskError(MGMFlowError, ToolException):
    """The task a tool dispatched did not succeed; ``code`` is the worker's error code."""

    def __init__(self, kind: str, status: str, error: dict[str, Any] | None) -> None:
        error = error or {}
        self.code = error.get("code", status)
        super().__init__(f"{kind} {status}: {error.get('message') or self.code}")


class ToolInputError(InvalidInputError, ToolException):
    """Arguments the schema allows that the store refuses: no such image in this scope, a mask of another size."""


def validation_message(error: ValidationError) -> str:
    """A schema violation as the model should read it: each bad field, and what it must be."""
    problems = "; ".join(f"{'.'.join(map(str, problem['loc'])) or 'arguments'}: {problem['msg']}"
                         for problem in error.errors())
    return f"Invalid arguments, nothing was run: {problems}"


class TaskTool(BaseTool):
    """Base of the task tools: validate, submit one task, wait for its record, shape the result."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Any = Field(exclude=True)  # workers.client.TaskClient
    scope: str = "default"
    run_id: str = "tools"  # the run whose event stream shows the tasks' progress
    timeout: float = 600.0
    handle_tool_error: Any = True  # ToolException's message becomes the tool's output
    handle_validation_error: Any = validation_message
    kind: ClassVar[str]

    def _run(self, **arguments: Any) -> dict[str, Any]:
        args = self.args_schema.model_validate(arguments)
        try:
            for name in self.image_arguments(args):
                check_image(self.client.store, self.scope, getattr(args, name), argument=name)
            self.check(args)
            payload = self.payload(args)
        except InvalidInputError as error:
            raise error if isinstance(error, ToolException) else ToolInputError(str(error)) from error
        return self.result(args, self.dispatch(self.kind, payload), payload)

    # What each tool defines.
    def image_arguments(self, args: BaseModel) -> tuple[str, ...]:
        return tuple(name for name in ("image", "mask") if getattr(args, name, None) is not None)

    def check(self, args: BaseModel) -> None:
        """Checks beyond the schema (sizes against the stored image…)."""

    def payload(self, args: BaseModel) -> dict[str, Any]:
        raise NotImplementedError

    def result(self, args: BaseModel, result: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
        return result

    def dispatch(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Submit one task and wait for it; a failed task raises :class:`ToolTaskError`."""
        task_id = f"{self.run_id}:{self.name}:{uuid.uuid4().hex}"
        try:
            self.client.submit(kind, payload, task_id=task_id, run_id=self.run_id, scope=self.scope)
        except InvalidInputError as error:  # the one refusal left: texts too long together for a task message
            raise ToolInputError(f"the arguments are too long together ({error}); shorten the texts") from error
        try:
            record = self.client.wait(task_id, self.timeout)
        except TimeoutError:
            raise ToolTaskError(kind, "timed out", {"message": f"no result within {self.timeout:g} s"}) from None
        if record.status != "done":
            raise ToolTaskError(kind, record.status, record.error)
        return record.result


def check_image(store: Any, scope: str, artifact_id: str, *, argument: str = "image") -> Any:
    """The stored image ``artifact_id`` in ``scope`` (its ``Artifact``); a clear error if it is not one."""
    from mgmflow.workers.artifacts import ArtifactNotFound

    try:
        artifact = store.info(artifact_id, scope=scope)
    except ArtifactNotFound:
        raise InvalidInputError(f"{argument}: no artifact {artifact_id!r} in this scope") from None
    if not artifact.media_type.startswith("image/"):
        raise InvalidInputError(f"{argument}: artifact {artifact_id!r} is {artifact.media_type}, not an image")
    return artifact


def crop_region(store: Any, scope: str, artifact_id: str, box: tuple[float, float, float, float]) -> Any:
    """Crop ``box`` (x0, y0, x1, y1 in 0-1) out of the *original* image and store it as a new artifact whose
    metadata names its parent and box (lineage). Returns the crop's ``Artifact``."""
    image = load_image(store.get(artifact_id, scope=scope))
    x0, y0, x1, y1 = box
    width, height = image.size
    pixels = (int(x0 * width), int(y0 * height), max(int(x0 * width) + 1, round(x1 * width)),
              max(int(y0 * height) + 1, round(y1 * height)))
    buffer = io.BytesIO()
    image.crop(pixels).save(buffer, format="PNG")
    return store.put(buffer.getvalue(), scope=scope, media_type="image/png",
                     metadata={"parent": artifact_id, "box": list(box), "pixels": list(pixels), "tool": "zoom"})


# Arguments.
class ImageArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(min_length=1, max_length=64, description="artifact id of the image")


class DescribeArgs(ImageArgs):
    prompt: str = Field("Describe this image in detail.", min_length=1, max_length=MAX_TEXT)


class AskArgs(ImageArgs):
    question: Text


class Box(BaseModel):
    x0: float = Field(ge=0, le=1)
    y0: float = Field(ge=0, le=1)
    x1: float = Field(ge=0, le=1)
    y1: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _not_empty(self) -> Box:
        if self.x1 <= self.x0 or self.y1 <= self.y0:
            raise ValueError(f"the box is empty: x0 < x1 and y0 < y1 are needed, got {self.as_tuple()}")
        return self

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)


class ZoomArgs(AskArgs):
    box: Box = Field(description="the region in relative coordinates (0-1): x0, y0 top-left, x1, y1 bottom-right")


class WritePromptArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request: Text
    images: list[str] = Field(default_factory=list, max_length=4, description="artifact ids the prompt is about")


class DrawArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: Text
    seed: int | None = Field(None, ge=0, lt=2**32)
    steps: int | None = Field(None, ge=1, le=150)
    guidance_scale: float | None = Field(None, ge=0, le=30)


class GenerateArgs(DrawArgs):
    negative_prompt: str | None = Field(None, max_length=MAX_TEXT)
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    count: int = Field(1, ge=1, le=4, description="images to draw (seeds seed, seed+1, ...)")


class Img2ImgArgs(DrawArgs, ImageArgs):
    strength: float = Field(0.6, gt=0, le=1, description="how far from the input image to go")


class InstructArgs(ImageArgs):
    instruction: Text
    seed: int | None = Field(None, ge=0, lt=2**32)
    steps: int | None = Field(None, ge=1, le=150)


class InpaintArgs(Img2ImgArgs):
    mask: str = Field(min_length=1, max_length=64, description="artifact id of the mask (white = repaint)")
    strength: float = Field(1.0, gt=0, le=1)


class CritiqueArgs(ImageArgs):
    intent: str = Field(min_length=1, max_length=MAX_TEXT, description="what the image was meant to show")


# Tools.
def _images(result: dict[str, Any]) -> dict[str, Any]:
    return {"images": [image["artifact"] for image in result["images"]],
            "seeds": [image["seed"] for image in result["images"]], "model": result.get("model")}


def _draw_fields(args: DrawArgs) -> dict[str, Any]:
    fields = {"prompts": [args.prompt], "steps": args.steps, "guidance_scale": args.guidance_scale,
              "seeds": None if args.seed is None else [args.seed]}
    return {key: value for key, value in fields.items() if value is not None}


class DescribeImageTool(TaskTool):
    name: str = "describe_image"
    description: str = "Describe an image (by artifact id) in words."
    args_schema: type[BaseModel] = DescribeArgs
    kind: ClassVar[str] = "vlm.describe"

    def payload(self, args: DescribeArgs) -> dict[str, Any]:
        return {"image": args.image, "prompt": args.prompt}

    def result(self, args, result, payload):
        return {"text": result["text"]}


class AskImageTool(TaskTool):
    name: str = "ask_image"
    description: str = "Answer a question about an image (by artifact id)."
    args_schema: type[BaseModel] = AskArgs
    kind: ClassVar[str] = "vlm.chat"

    def payload(self, args: AskArgs) -> dict[str, Any]:
        return {"messages": [{"role": "user", "text": args.question, "images": [args.image]}]}

    def result(self, args, result, payload):
        return {"text": result["text"]}


class ZoomTool(AskImageTool):
    name: str = "zoom_image"
    description: str = ("Look closely at a region of the full-resolution image and answer a question about it; "
                        "the crop is kept as a new artifact.")
    args_schema: type[BaseModel] = ZoomArgs

    def payload(self, args: ZoomArgs) -> dict[str, Any]:
        crop = crop_region(self.client.store, self.scope, args.image, args.box.as_tuple())
        return {"messages": [{"role": "user", "text": args.question, "images": [crop.id]}]}

    def result(self, args, result, payload):
        crop = payload["messages"][0]["images"][0]
        return {"text": result["text"], "box": args.box.model_dump(), "crop": crop, "parent": args.image}


class WritePromptTool(TaskTool):
    name: str = "write_image_prompt"
    description: str = "Write a text-to-image prompt for a request (Mini-Gemini's <GEN> path)."
    args_schema: type[BaseModel] = WritePromptArgs
    kind: ClassVar[str] = "vlm.write_prompt"

    def image_arguments(self, args):
        return ()

    def check(self, args: WritePromptArgs) -> None:
        for index, image in enumerate(args.images):
            check_image(self.client.store, self.scope, image, argument=f"images[{index}]")

    def payload(self, args: WritePromptArgs) -> dict[str, Any]:
        return {"request": args.request, "images": args.images}

    def result(self, args, result, payload):
        prompt = (result.get("image_prompt") or "").strip()
        return {"prompt": prompt or args.request, "text": result["text"]}


class GenerateImageTool(TaskTool):
    name: str = "generate_image"
    description: str = "Draw images from a text prompt; returns their artifact ids and seeds."
    args_schema: type[BaseModel] = GenerateArgs
    kind: ClassVar[str] = "diffusion.text2img"

    def payload(self, args: GenerateArgs) -> dict[str, Any]:
        seeds = None if args.seed is None else [args.seed + offset for offset in range(args.count)]
        fields = {"prompts": [args.prompt] * args.count, "seeds": seeds, "negative_prompt": args.negative_prompt,
                  "width": args.width, "height": args.height, "steps": args.steps,
                  "guidance_scale": args.guidance_scale}
        return {key: value for key, value in fields.items() if value is not None}

    def result(self, args, result, payload):
        return _images(result)


class Img2ImgTool(TaskTool):
    name: str = "img2img"
    description: str = "Redraw an image (by artifact id) towards a prompt."
    args_schema: type[BaseModel] = Img2ImgArgs
    kind: ClassVar[str] = "edit.img2img"

    def payload(self, args: Img2ImgArgs) -> dict[str, Any]:
        return {"image": args.image, "strength": args.strength, **_draw_fields(args)}

    def result(self, args, result, payload):
        return {**_images(result), "parent": args.image}


class InstructEditTool(TaskTool):
    name: str = "edit_image"
    description: str = "Edit an image (by artifact id) by an instruction, e.g. 'make the dog red'."
    args_schema: type[BaseModel] = InstructArgs
    kind: ClassVar[str] = "edit.instruct"

    def payload(self, args: InstructArgs) -> dict[str, Any]:
        fields = {"image": args.image, "prompts": [args.instruction], "steps": args.steps,
                  "seeds": None if args.seed is None else [args.seed]}
        return {key: value for key, value in fields.items() if value is not None}

    def result(self, args, result, payload):
        return {**_images(result), "parent": args.image}


class InpaintTool(Img2ImgTool):
    name: str = "inpaint"
    description: str = "Repaint the masked part (white) of an image (by artifact id) from a prompt."
    args_schema: type[BaseModel] = InpaintArgs
    kind: ClassVar[str] = "edit.inpaint"

    def check(self, args: InpaintArgs) -> None:
        store = self.client.store
        image = load_image(store.get(args.image, scope=self.scope))
        mask = load_image(store.get(args.mask, scope=self.scope))
        if mask.size != image.size:
            raise InvalidInputError(f"mask: its size {mask.size} differs from the image's {image.size}")

    def payload(self, args: InpaintArgs) -> dict[str, Any]:
        return {**super().payload(args), "mask": args.mask}


class CritiqueTool(TaskTool):
    name: str = "critique_image"
    description: str = ("Judge an image (by artifact id) against the intent behind it: a 0-10 score, a verdict "
                        "(accept, refine, edit) and feedback.")
    args_schema: type[BaseModel] = CritiqueArgs
    kind: ClassVar[str] = "vlm.critique"

    def payload(self, args: CritiqueArgs) -> dict[str, Any]:
        return {"image": args.image, "intent": args.intent}

    def result(self, args, result, payload):
        return {name: result[name] for name in ("score", "verdict", "feedback")}


TOOLS: tuple[type[TaskTool], ...] = (DescribeImageTool, AskImageTool, ZoomTool, WritePromptTool, GenerateImageTool,
                                     Img2ImgTool, InstructEditTool, InpaintTool, CritiqueTool)


def make_tools(client: Any, *, scope: str = "default", run_id: str = "tools", timeout: float = 600.0,
               handle_errors: bool = True) -> list[TaskTool]:
    """Every task tool, bound to ``client`` (a ``TaskClient``) and the caller's ``scope``. ``handle_errors``:
    failures are the tool's output (what agents need) rather than raised."""
    handling = {} if handle_errors else {"handle_tool_error": False, "handle_validation_error": False}
    return [tool(client=client, scope=scope, run_id=run_id, timeout=timeout, **handling) for tool in TOOLS]
