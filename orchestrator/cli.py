"""The one mgmflow command line. Each capability adds its commands here.

Errors the user can fix print one line and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before torch loads anywhere: two OpenMP threads are intermittently 20x slower on small CPUs.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import click  # noqa: E402

from mgmflow.models.errors import MGMFlowError, ModelNotFoundError  # noqa: E402


class _Group(click.Group):
    """Turns our typed errors into one clear line and exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MGMFlowError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
def main() -> None:
    """mgmflow: reason with Mini-Gemini, generate and edit with diffusion, over durable workflows."""


@main.command()
@click.option("--host", default=None, help="Interface to bind. Default: 127.0.0.1 without API keys, else 0.0.0.0.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="API processes (distributed only: they share the broker, the store and the database).")
@click.option("--insecure-open-access", is_flag=True,
              help="Serve a non-loopback address without API keys: anyone who reaches it can use the server.")
def serve(host: str | None, port: int, log_level: str, workers: int, insecure_open_access: bool) -> None:
    """Serve the HTTP API and the playground. Without MGMFLOW_BROKER_URL: embedded (tiny models, in-process
    workers, SQLite), a working server with one command."""
    import logging
    import os
    import tempfile

    import uvicorn

    from mgmflow.orchestrator.api import create_app
    from mgmflow.orchestrator.api.logs import configure_logging
    from mgmflow.orchestrator.api.origin import LOOPBACK_HOSTS
    from mgmflow.orchestrator.api.server import check_reachable, default_host, uvicorn_options
    from mgmflow.orchestrator.api.settings import ApiSettings

    settings = ApiSettings()
    check_reachable(settings)
    host = host or default_host(settings)
    configure_logging(log_level)
    if settings.open_access and host not in LOOPBACK_HOSTS:
        if not insecure_open_access:
            raise click.UsageError(f"no API keys configured (MGMFLOW_API_KEYS): refusing to serve {host}, which "
                                   "is not loopback; set keys, or pass --insecure-open-access to serve it open")
        logging.getLogger("mgmflow.serve").warning(
            "no API keys configured (MGMFLOW_API_KEYS): anyone who reaches %s:%d can use this server", host, port)
    options = {"host": host, "port": port, "log_level": log_level, "log_config": None, "timeout_graceful_shutdown": 5,
               **uvicorn_options(settings)}
    if workers == 1:
        uvicorn.run(create_app(settings), **options)
        return
    if settings.embedded:
        raise click.UsageError("--workers above 1 needs MGMFLOW_BROKER_URL: embedded workers live in one process")
    # The processes add up their metrics through files (prometheus_client's multiprocess mode), fresh each start.
    settings.home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="metrics-", dir=settings.home))
    uvicorn.run("mgmflow.orchestrator.api:create_app", factory=True, workers=workers, **options)


@main.command()
def models() -> None:
    """List the model presets and where their weights are expected (nothing is downloaded)."""
    from mgmflow.models.diffusion.presets import list_presets as diffusion_presets
    from mgmflow.models.mgm.presets import list_presets as mgm_presets

    rows = [("mini-gemini", p.name, p.kind, p.available, p.location) for p in mgm_presets()]
    rows += [(f"diffusion ({p.task})", p.name, p.family, p.available, p.location) for p in diffusion_presets()]
    widths = [max(len(str(row[i])) for row in rows) for i in range(3)]
    for family, name, kind, available, location in rows:
        mark = "ready  " if available else "missing"
        click.echo(f"{family:<{widths[0]}}  {name:<{widths[1]}}  {kind:<{widths[2]}}  {mark}  {location}")


def _vlm_placement_options(command):
    """``--device-map``, ``--load-4bit``, ``--load-8bit``: how a Mini-Gemini LLM is placed (official CLI flags)."""
    options = [
        click.option("--device-map", default=None, metavar="STRATEGY|JSON", callback=_parse_device_map,
                     help="Spread Mini-Gemini's LLM over the visible GPUs: auto, balanced, balanced_low_0, "
                          'sequential, or a JSON object {"LLM module": CUDA index | "cpu" | "disk"}.'),
        click.option("--load-4bit", is_flag=True, help="Quantize Mini-Gemini's LLM to 4 bits (bitsandbytes, CUDA)."),
        click.option("--load-8bit", is_flag=True, help="Quantize Mini-Gemini's LLM to 8 bits (bitsandbytes, CUDA)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _parse_device_map(ctx: click.Context, param: click.Parameter, value: str | None):
    """A JSON object (``{"model.layers.0": 0, …}``) or a strategy name, checked by the settings' own types."""
    import json

    from pydantic import ValidationError

    from mgmflow.workers.settings import Settings

    if value is None:
        return None
    device_map = value
    if value.lstrip().startswith(("{", "[")):
        try:
            device_map = json.loads(value)
        except json.JSONDecodeError as error:
            raise click.BadParameter(f"not a JSON object: {error}") from None
    try:
        return Settings(vlm_device_map=device_map).vlm_device_map
    except ValidationError:
        raise click.BadParameter(
            f"{value!r} is not one of auto, balanced, balanced_low_0, sequential, nor a JSON object from the LLM's "
            'modules to devices (a CUDA index, "cpu" or "disk")'
        ) from None


def _quantization(load_4bit: bool, load_8bit: bool) -> str | None:
    if load_4bit and load_8bit:
        raise click.UsageError("--load-4bit and --load-8bit exclude each other")
    return "4bit" if load_4bit else "8bit" if load_8bit else None


@main.command()
@click.argument("question")
@click.option("--image", "images", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Image to ask about (repeatable).")
@click.option("--model", default="tiny", show_default=True, help="Mini-Gemini preset or checkpoint folder.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 is greedy.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (with --temperature > 0).")
@click.option("--json-schema", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Answer with JSON valid for the JSON schema in this file.")
@click.option("--gen", is_flag=True, help="Let the model draw (Mini-Gemini's <GEN> protocol): the image prompt it "
              "writes, if it writes one, is drawn into --out.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("generate.png"),
              show_default=True, help="PNG of the drawing, with --gen.")
@click.option("--draw-model", default="tiny", show_default=True,
              help="Diffusion preset or folder that draws, with --gen (the official CLI uses sdxl-base).")
@click.option("--conv-mode", default=None, help="Conversation template, e.g. llama_3 (default: from the checkpoint).")
@_vlm_placement_options
def chat(question: str, images: tuple[Path, ...], model: str, max_new_tokens: int, temperature: float,
         seed: int | None, json_schema: Path | None, gen: bool, out: Path, draw_model: str,
         conv_mode: str | None, device_map, load_4bit: bool, load_8bit: bool) -> None:
    """Ask Mini-Gemini a QUESTION about images; the answer streams as it is written."""
    import json

    from mgmflow.models.errors import IncompleteOutputError, InvalidInputError

    for image in images:
        _check_image("--image", image)
    if gen:
        _check_draw_arguments(out, ())
    schema = None
    if json_schema is not None:
        try:
            schema = json.loads(json_schema.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InvalidInputError(f"--json-schema: cannot read {json_schema} as JSON: {error}") from None
    placement = {"device_map": device_map, "quantization": _quantization(load_4bit, load_8bit), "template": conv_mode}
    result = _stream_chat(model, question, list(images), placement, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed, json_schema=schema,
                          generate_image="allow" if gen else None)
    if result.finish_reason == "length":
        if schema is not None:
            raise IncompleteOutputError(f"the JSON was cut at --max-new-tokens {max_new_tokens}; raise it")
        click.echo(f"(stopped at --max-new-tokens {max_new_tokens})", err=True)
    if gen and result.image_prompt is None:
        click.echo("no image: the model wrote no <h>…</h> prompt")
    elif gen:  # as the official CLI: draw what the model asked for, with MGM's negative prompt
        from mgmflow.models.diffusion import TextToImageRequest
        from mgmflow.models.mgm import NEGATIVE_PROMPT

        click.echo(f"image prompt: {result.image_prompt}")
        request = TextToImageRequest(prompts=[result.image_prompt], seeds=None if seed is None else [seed],
                                     negative_prompt=NEGATIVE_PROMPT)
        _draw_to_file(request, draw_model, [], out)


@main.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("storyboard"),
              show_default=True, help="Folder to write the storyboard into.")
@click.option("--pages", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--broker", default=None, help="Broker URL (default: MGMFLOW_BROKER_URL; unset: embedded).")
def demo(out: Path, pages: int, broker: str | None) -> None:
    """The main job: a fixed premise becomes a storyboard (embedded by default: tiny models, no Redis, SQLite)."""
    from mgmflow.orchestrator.workflow import get_workflow

    _run_workflow(get_workflow("story"), {"premise": DEMO_PREMISE, "pages": pages, "seed": 7}, out=out,
                  broker=broker)


def _stream_chat(model: str, question: str, images: list, placement: dict, **options):
    """One chat turn printed as it streams; returns its ``ChatResult``."""
    from transformers.utils import logging as transformers_logging

    from mgmflow.models.images import load_image
    from mgmflow.models.mgm import ChatRequest, MGMEngine, Message

    transformers_logging.set_verbosity_error()
    # Bad images and options fail before the model loads.
    request = ChatRequest([Message("user", question, [load_image(i) for i in images])], **options)
    engine = MGMEngine.from_pretrained(model, **placement)
    [result] = engine.chat([request], on_token=lambda _, piece: click.echo(piece, nl=False))
    click.echo()
    return result


def _draw_options(command):
    """Options shared by ``generate`` and ``edit``."""
    options = [
        click.option("--negative", default=None, help='Negative prompt (default: the model\'s; "" for none).'),
        click.option("--seed", type=int, default=None, help="Seed (default: random; recorded in the PNG)."),
        click.option("--steps", type=int, default=None, help="Denoising steps (default: the model's)."),
        click.option("--guidance", type=float, default=None, help="Guidance scale (default: the model's)."),
        click.option("--width", type=int, default=None, help="Width, a multiple of 8 (with --height)."),
        click.option("--height", type=int, default=None, help="Height, a multiple of 8 (with --width)."),
        click.option("--model", default=None, help="Preset, diffusers folder, .safetensors file or cached hub id."),
        click.option("--lora", "loras", multiple=True, metavar="PATH[:WEIGHT]", help="LoRA adapter (repeatable)."),
        click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output PNG."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.option("--prompt", required=True, help="What to draw.")
@_draw_options
def generate(prompt: str, negative, seed, steps, guidance, width, height, model, loras, out) -> None:
    """Draw an image from a text prompt into a PNG that records its parameters."""
    loras = _check_draw_arguments(out, loras)
    from mgmflow.models.diffusion import TextToImageRequest

    request = TextToImageRequest(prompts=[prompt], seeds=None if seed is None else [seed], negative_prompt=negative,
                                 steps=steps, guidance_scale=guidance, width=width, height=height)
    _draw_to_file(request, model or "tiny", loras, out)


@main.command()
@click.option("--image", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Image to edit.")
@click.option("--instruction", default=None, help='Edit by instruction, e.g. "make it snowy" (InstructPix2Pix).')
@click.option("--prompt", default=None, help="Redraw towards this prompt (with --strength or --mask).")
@click.option("--strength", type=float, default=None, help="img2img: how much to redraw, in (0, 1].")
@click.option("--mask", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Inpainting: white marks the area to repaint; same size as the image.")
@_draw_options
def edit(image: Path, instruction, prompt, strength, mask, negative, seed, steps, guidance, width, height, model,
         loras, out) -> None:
    """Edit an image: by --instruction, by --prompt with --strength (img2img), or by --prompt in a --mask."""
    loras = _check_draw_arguments(out, loras)
    for flag, path in (("--image", image), ("--mask", mask)):
        if path is not None:
            _check_image(flag, path)
    from mgmflow.models.diffusion import Img2ImgRequest, InpaintRequest, InstructEditRequest

    if (instruction is None) == (prompt is None):
        raise click.UsageError("give either --instruction, or --prompt with --strength or --mask")
    if instruction is not None and (strength is not None or mask is not None):
        raise click.UsageError("--instruction takes neither --strength nor --mask")
    if prompt is not None and strength is None and mask is None:
        raise click.UsageError("--prompt needs --strength (img2img) or --mask (inpainting)")
    shared = dict(image=image, seeds=None if seed is None else [seed], negative_prompt=negative, steps=steps,
                  guidance_scale=guidance, width=width, height=height)
    if instruction is not None:
        request, default_model = InstructEditRequest(prompts=[instruction], **shared), "tiny-ip2p"
    elif mask is not None:
        request, default_model = InpaintRequest(prompts=[prompt], mask=mask, strength=strength, **shared), "tiny"
    else:
        request, default_model = Img2ImgRequest(prompts=[prompt], strength=strength, **shared), "tiny"
    _draw_to_file(request, model or default_model, loras, out)


def _check_draw_arguments(out: Path, loras: tuple[str, ...]) -> list[tuple[str, float]]:
    """What ``generate`` / ``edit`` can check before any model loads: the output file and the LoRA files.
    Returns the LoRAs as (path, weight)."""
    if out.suffix.lower() != ".png":
        raise click.UsageError(f"--out must name a .png file, got {out}")
    if not out.parent.is_dir():
        raise click.UsageError(f"the folder of --out does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise click.UsageError(f"cannot write into the folder of --out: {out.parent}")
    specs = []
    for text in loras:
        path, _, weight = text.rpartition(":") if ":" in text else (text, "", "1")
        try:
            specs.append((path, float(weight)))
        except ValueError:
            raise click.UsageError(f"--lora takes PATH[:WEIGHT], got {text!r}") from None
        if not Path(path).expanduser().is_file():
            raise ModelNotFoundError(f"LoRA file not found: {path}")
    return specs


def _check_image(flag: str, path: Path) -> None:
    """Decode an image argument now, so a bad file is named before any model loads."""
    from mgmflow.models.errors import InvalidImageError
    from mgmflow.models.images import load_image

    try:
        load_image(path)
    except InvalidImageError as error:
        raise InvalidImageError(f"{flag} {path}: {error}") from None


def _draw_to_file(request, model: str, loras: list[tuple[str, float]], out: Path) -> None:
    """Run one diffusion request and write its PNG atomically: on any error no output file is left."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):  # one line of output, not loading bars
        library.disable_progress_bar()
        library.set_verbosity_error()
    # Through the workers: in-process without a broker, on the deployment's workers with MGMFLOW_BROKER_URL.
    import uuid

    from mgmflow.workers.client import TaskClient
    from mgmflow.workers.tasks.diffusion import task_for

    client, run_id = TaskClient(_settings(None)), f"cli-{uuid.uuid4().hex}"
    kind, payload = task_for(request, client.store, scope="cli", model=model, loras=loras)
    client.submit(kind, payload, task_id=f"{run_id}:draw", run_id=run_id, scope="cli", priority=0)
    try:
        record = client.wait(f"{run_id}:draw", timeout=7 * 24 * 3600)
    except KeyboardInterrupt:
        client.cancel(run_id)
        raise
    if record.status != "done":
        raise MGMFlowError(record.error["message"])
    [image] = record.result["images"]
    _write_atomically(out, client.store.get(image["artifact"], scope="cli"))
    client.delete_run(run_id)
    click.echo(f"{out} (seed {image['seed']})")


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and a rename, so no reader sees a partial file."""
    import tempfile

    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


@main.command()
@click.option("--queues", "-Q", default="", help="Comma-separated: vlm, diffusion, edit, orchestrator, or full "
              "queue names (vlm.mgm-7b). Default: every queue, on the default presets.")
@click.option("--model", "-m", "models", multiple=True, metavar="[FAMILY=]NAME",
              help="Model of a family, e.g. vlm=mgm-7b (repeatable); a bare NAME when one family is served.")
@click.option("--broker", default=None, help="Broker URL (default: MGMFLOW_BROKER_URL).")
@click.option("--concurrency", "-c", type=click.IntRange(1, 256), default=None,
              help="Threads. Default: the batch size on batching queues, else 1.")
@click.option("--gpus", default=None, help="Comma-separated GPU indices: one worker process per GPU; with "
              "--device-map, one process over all of them.")
@click.option("--name", "-n", default=None, help="Worker name (default: worker-<pid>).")
@click.option("--include", "-I", multiple=True, help="Extra task module to import (repeatable).")
@click.option("--loglevel", "-l", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
@click.option("--conv-mode", default=None, help="Mini-Gemini's conversation template, e.g. llama_3 "
              "(default: MGMFLOW_VLM_CONV_MODE, else from the checkpoint).")
@_vlm_placement_options
def worker(queues: str, models: tuple[str, ...], broker: str | None, concurrency: int | None, gpus: str | None,
           name: str | None, include: tuple[str, ...], loglevel: str, conv_mode: str | None, device_map,
           load_4bit: bool, load_8bit: bool) -> None:
    """Run a worker: loads its models first (exits non-zero if one fails), then serves its queues.

    Placement and template flags override MGMFLOW_VLM_DEVICE_MAP / MGMFLOW_VLM_QUANTIZATION / MGMFLOW_VLM_CONV_MODE.
    """
    import logging

    from mgmflow.workers.settings import Settings, get_settings
    from mgmflow.workers.worker import parse_models, run_per_gpu, run_worker, use_gpu

    quantization = _quantization(load_4bit, load_8bit)
    gpu_list = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else []
    if len(gpu_list) > 1 and device_map is None:
        argv = [sys.executable, "-c", "from orchestrator.cli import main; main()", "worker", f"--queues={queues}",
                *(f"--model={m}" for m in models), *(f"--include={i}" for i in include), f"--loglevel={loglevel}",
                *([f"--broker={broker}"] if broker else []), *([f"--concurrency={concurrency}"] if concurrency else []),
                *([f"--load-{quantization}"] if quantization else []), *([f"--conv-mode={conv_mode}"] if conv_mode else [])]
        sys.exit(run_per_gpu(argv, gpu_list, name or "gpu"))
    if gpu_list:
        use_gpu(",".join(gpu_list))  # one GPU, or all of them for a model spread by its device map
        name = name or f"gpu{'-'.join(gpu_list)}"
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    queue_list = [q.strip() for q in queues.split(",") if q.strip()]
    placement = {"vlm_device_map": device_map, "vlm_quantization": quantization, "vlm_conv_mode": conv_mode}
    settings = Settings(**({"broker_url": broker} if broker else {}),
                        **{key: value for key, value in placement.items() if value is not None})
    if not settings.embedded and (not queue_list or "orchestrator" in queue_list):
        from mgmflow.orchestrator.driver import serve as serve_orchestration

        serve_orchestration(settings)  # registers the orchestration tasks and starts the sweeper
    run_worker(settings, queues=queue_list, models=parse_models(list(models), queue_list),
               concurrency=concurrency, name=name, include=list(include), loglevel=loglevel.upper())


# Workflow runs: `run <workflow>` (flags from the workflow's input model), `resume`, `cancel`, `demo`.

DEMO_PREMISE = ("A small red fox who is afraid of the dark sets out across a winter forest to bring a lantern "
                "back to her family's den, and makes friends with an owl on the way.")


class _WorkflowGroup(click.Group):
    """``mgmflow run <workflow>``: one subcommand per workflow of the ``mgmflow.workflows`` entry points."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from mgmflow.orchestrator.workflow import load_workflows

        return sorted(load_workflows())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from mgmflow.orchestrator.workflow import get_workflow

        try:
            return _workflow_command(get_workflow(name))
        except MGMFlowError as error:
            raise click.UsageError(str(error)) from None


def _workflow_command(workflow) -> click.Command:
    """A click command whose options are the fields of ``workflow.input_model``, plus the run options."""
    params = [_field_option(name, field) for name, field in workflow.input_model.model_fields.items()]
    params += [
        click.Option(["--out"], type=click.Path(file_okay=False, path_type=Path),
                     required=workflow.write_output is not None, help="Folder to write the result into."),
        click.Option(["--broker"], default=None, help="Broker URL: run on the workers that serve it "
                     "(default: MGMFLOW_BROKER_URL; unset: embedded, in-process)."),
        click.Option(["--approve"], is_flag=True, help="Stop for approval before generating."),
        click.Option(["--thread"], default=None, help="Continue this thread (a multi-turn conversation)."),
        click.Option(["--previews"], type=click.IntRange(0, 1000), default=0, metavar="N",
                     help="Preview drawings every N denoising steps: the latest is OUT/preview.png while the run "
                          "draws (removed at its end), and on the run's event stream."),
        click.Option(["--quiet", "-q"], is_flag=True, help="No progress bar."),
    ]

    def callback(out, broker, approve, thread, previews, quiet, **fields) -> None:
        given = {name: value for name, value in fields.items() if value is not None and value != ()}
        for name, value in given.items():
            if isinstance(value, tuple) and value and isinstance(value[0], list):  # JSON options: chunks of items
                given[name] = [item for chunk in value for item in chunk]
        _run_workflow(workflow, given, out=out, broker=broker, approve=approve, thread=thread, quiet=quiet,
                      previews=previews)

    return click.Command(workflow.name, params=params, callback=callback, help=workflow.description)


def _field_option(name: str, field) -> click.Option:
    import typing

    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    flag = f"--{name.replace('_', '-')}"
    required = field.is_required()
    if annotation is bool:
        return click.Option([f"{flag}/--no-{name.replace('_', '-')}"], default=None, help=field.description)
    multiple = typing.get_origin(annotation) is list
    if multiple:
        annotation = typing.get_args(annotation)[0]
    objects = typing.get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, dict))
    kind = annotation if annotation in (int, float, str) else _JsonItems() if multiple and objects else str
    shown = None if required or field.default is None or field.default_factory else str(field.default)
    return click.Option([flag, name], type=kind, multiple=multiple, required=required, default=None,
                        show_default=shown or False, help=field.description)


class _JsonItems(click.ParamType):
    """A list of JSON objects: inline (an object, a list of them, or JSON Lines) or a JSON / JSON Lines file.
    The option may repeat; its values are joined in order."""

    name = "JSON|FILE"

    def convert(self, value, param, ctx) -> list:
        import json

        if isinstance(value, list):
            return value
        text, source = value, "the value"
        if not value.lstrip().startswith(("{", "[")):
            path = Path(value).expanduser()
            try:
                text, source = path.read_text(), str(path)
            except OSError as error:
                self.fail(f"{value!r} is neither JSON nor a readable JSON / JSON Lines file ({error.strerror})")
            except UnicodeDecodeError:
                self.fail(f"{value!r} is not a text file")
        try:
            parsed = json.loads(text)
            items = parsed if isinstance(parsed, list) else [parsed]
        except json.JSONDecodeError:
            try:  # JSON Lines: one object per non-blank line
                items = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as error:
                self.fail(f"{source}: not JSON or JSON Lines (line {error.lineno}: {error.msg})")
        if not all(isinstance(item, dict) for item in items):
            self.fail(f"{source}: every item must be a JSON object")
        return items


def _settings(broker: str | None):
    """The settings a command runs with; a broker or database that does not answer fails now, in one line."""
    from mgmflow.orchestrator.api.server import check_reachable
    from mgmflow.workers.settings import Settings, get_settings

    settings = Settings(broker_url=broker) if broker else get_settings()
    check_reachable(settings)
    return settings


def _known_run(settings, run_id: str):
    """The record of ``run_id``, read before anything starts (an unknown id fails at once)."""
    from mgmflow.orchestrator.checkpoint import open_database
    from mgmflow.orchestrator.records import RunStore

    return RunStore(open_database(settings)).get(run_id)


def _run_workflow(workflow, given: dict, *, out: Path | None, broker: str | None, approve: bool = False,
                  thread: str | None = None, quiet: bool = False, previews: int = 0) -> None:
    """Start (or continue: the same command continues its run from its checkpoint), follow, write the output."""
    import hashlib
    import json

    from mgmflow.orchestrator.budget import budget_for
    from mgmflow.orchestrator.runs import RunService

    settings = _settings(broker)
    requested, given = given, _upload_local_files(workflow, given, settings)
    workflow.validate_input(given, budget_for(settings.vlm_model))  # bad flags fail before any worker starts
    if settings.embedded:
        _quiet_libraries()  # the in-process workers share this terminal with the progress bar
    service = RunService(settings)
    # The same command (workflow, flags, folder) names the same run: Ctrl-C and again continues it. (Previews
    # only show the drawing: they are not part of what names the run.)
    identity = json.dumps([workflow.name, requested, str(out.resolve()) if out else None, thread], sort_keys=True)
    key = "cli:" + hashlib.sha256(identity.encode()).hexdigest()[:32]
    run = service.runs.by_idempotency_key("default", key)
    if run is not None and run.status in ("error", "cancelled", "timeout"):
        service.runs.release_idempotency_key(run.run_id)  # a failed run is started afresh
        run = None
    if run is None:
        run = service.create_run(workflow.name, given, thread_id=thread, approve=approve, idempotency_key=key,
                                 metadata={"out": str(out.resolve()) if out else None}, previews=previews)
        click.echo(f"run {run.run_id} (thread {run.thread_id})", err=True)
    else:
        click.echo(f"continuing run {run.run_id} from its checkpoint", err=True)
        service.restart(run.run_id)
    _follow(service, run.run_id, out, quiet=quiet)


def _upload_local_files(workflow, given: dict, settings) -> dict:
    """Image paths given as flags become artifacts of the store the run will read (the workers never read a path)."""
    from mgmflow.orchestrator.references import store_file, upload_local_files
    from mgmflow.workers.artifacts import open_store

    store = open_store(settings)
    return upload_local_files(given, workflow.input_model.model_json_schema(),
                              lambda path: store_file(store, path, scope="default"))


def _quiet_libraries() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_progress_bar()
        library.set_verbosity_error()


def _follow(service, run_id: str, out: Path | None, *, quiet: bool = False) -> None:
    """Show progress from the run's events until it ends or waits for approval; then write or report."""
    import time

    from tqdm import tqdm

    from mgmflow.orchestrator.records import TERMINAL

    bar = tqdm(total=0, unit="item", file=sys.stderr, disable=quiet, dynamic_ncols=True, leave=True)
    after, checked = None, 0.0
    preview = out / PREVIEW_FILE if out is not None else None
    try:
        while True:
            for event in service.events(run_id, after, block_ms=500):
                after = event.id
                if event.type == "task.step" and event.data.get("preview") and preview is not None:
                    _write_preview(service, run_id, event.data["preview"], preview)
                elif event.type == "progress":
                    bar.set_description(event.data.get("stage", ""), refresh=False)
                    bar.total, bar.n = event.data.get("total") or bar.total, event.data.get("done", bar.n)
                    bar.refresh()
                elif event.type == "item" and not quiet:  # a page (an item of the refine loop) is finished
                    bar.write(_item_line(event.data), file=sys.stderr)
                elif event.type == "node" and event.data.get("phase") == "start":
                    bar.set_postfix_str(event.data["name"], refresh=True)
            if time.monotonic() - checked > 1.0:  # events may be dropped or come from elsewhere: trust the record
                checked = time.monotonic()
                run = service.get_run(run_id)
                if run.status in TERMINAL or run.status == "interrupted":
                    break
    except KeyboardInterrupt:
        bar.close()
        click.echo(f"\ninterrupted: run the same command again to continue run {run_id} from its checkpoint",
                   err=True)
        sys.stderr.flush()
        os._exit(130)  # leave at once: in-process workers must not hold the exit up
    bar.close()
    if preview is not None:
        preview.unlink(missing_ok=True)
    _finish(service, run, out)


def _item_line(data: dict) -> str:
    """``page-03 accepted: score 8 (round scores 3, 8), image <artifact id>``."""
    scores = ", ".join(f"{score:g}" for score in data.get("scores") or [])
    return (f"{data.get('key')} {data.get('status')}: score {data.get('score', 0):g} (round scores {scores}), "
            f"image {data.get('artifact')}")


PREVIEW_FILE = "preview.png"


def _write_preview(service, run_id: str, artifact_id: str, path: Path) -> None:
    """Replace ``path`` with the preview ``artifact_id`` (short-lived: one that expired already is skipped)."""
    from mgmflow.workers.artifacts import ArtifactNotFound

    try:
        data = service.orchestrator.store.get(artifact_id, scope=service.get_run(run_id).scope)
    except ArtifactNotFound:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(path, data)


def _finish(service, run, out: Path | None) -> None:
    import json

    from mgmflow.orchestrator.runtime import TaskFailedError
    from mgmflow.orchestrator.workflow import get_workflow

    if run.status == "interrupted":
        for pending in run.interrupt or []:
            for item in pending.get("items", []):
                click.echo(f"[{item.get('key')}] {item.get('prompt')}")
        click.echo(f"run {run.run_id} waits for approval: mgmflow resume {run.run_id} --approve "
                   "(or --prompt KEY=TEXT to change one item's prompt, --prompt-all TEXT for every item, --reject to "
                   "skip)", err=True)
        return
    if run.status != "success":
        detail = (run.error or {}).get("message", run.status)
        raise TaskFailedError(run.run_id, {"message": detail, "code": run.status}, run.status)
    workflow = get_workflow(run.workflow)
    if workflow.write_output is None or out is None:
        click.echo(json.dumps(_summary(service.output_values(run)), indent=2, default=str))
        return
    result = workflow.write_output(service.output_values(run), out, service.context(run))
    if workflow.describe_output is not None:
        click.echo(workflow.describe_output(result, out))
        return
    count = len(result.get("pages", [])) if isinstance(result, dict) else 0
    click.echo(f"{out}" + (f" ({count} pages)" if count else ""))


def _summary(values: dict) -> dict:
    """The user-facing part of a final state: the last messages and the chosen artifacts."""
    return {"messages": (values.get("messages") or [])[-2:], "chosen": values.get("chosen")}


main.add_command(_WorkflowGroup("run", help="Run a workflow: mgmflow run <workflow> --help lists its flags."))


@main.command()
@click.argument("run_id")
@click.option("--approve", is_flag=True, help="Approve what the run waits for.")
@click.option("--prompt", "prompts", multiple=True, metavar="KEY=TEXT",
              help="Approve with this prompt for the waiting item KEY (repeatable; keys as the run listed them). "
                   "A bare TEXT is allowed when one item waits.")
@click.option("--prompt-all", default=None, metavar="TEXT", help="Approve with this one prompt for every waiting item.")
@click.option("--reject", is_flag=True, help="Reject: generate nothing for the waiting items.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for the result (default: the --out the run was started with).")
@click.option("--broker", default=None, help="Broker URL (default: MGMFLOW_BROKER_URL).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def resume(run_id: str, approve: bool, prompts: tuple[str, ...], prompt_all: str | None, reject: bool,
           out: Path | None, broker: str | None, quiet: bool) -> None:
    """Resume RUN_ID: answer its approval point, or continue it from its checkpoint."""
    from mgmflow.orchestrator.runs import RunService

    if reject and (approve or prompts or prompt_all):
        raise click.UsageError("--reject takes neither --approve nor a prompt")
    settings = _settings(broker)
    run = _known_run(settings, run_id)
    if run.status == "interrupted":
        answer = _approval(run, approve, prompts, prompt_all, reject)  # checked before anything starts
    elif prompts or prompt_all or reject:
        raise click.UsageError(f"run {run_id} waits for no approval (it is {run.status})")
    if settings.embedded:
        _quiet_libraries()
    service = RunService(settings)
    if run.status == "interrupted":
        service.resume(run_id, answer)
    else:
        service.restart(run_id)
    _follow(service, run_id, out or (Path(run.metadata["out"]) if run.metadata.get("out") else None), quiet=quiet)


def _approval(run, approve: bool, prompts: tuple[str, ...], prompt_all: str | None, reject: bool) -> dict:
    """The resume value of an approval point: approved or not, and new prompts by item key."""
    if not (approve or prompts or prompt_all or reject):
        raise click.UsageError("the run waits for approval: give --approve, --prompt KEY=TEXT, --prompt-all TEXT "
                               "or --reject")
    if prompts and prompt_all is not None:
        raise click.UsageError("give either --prompt KEY=TEXT (per item) or --prompt-all TEXT, not both")
    waiting = [item.get("key") for pending in run.interrupt or [] for item in pending.get("items", [])]
    if prompt_all is not None:
        return {"approved": True, "prompts": dict.fromkeys(waiting, prompt_all)}
    chosen = {}
    for text in prompts:
        key, separator, value = text.partition("=")
        if not separator or key not in waiting:
            if len(prompts) == 1 and len(waiting) == 1:  # one item waits: a bare prompt is for it
                key, value = waiting[0], text
            else:
                raise click.UsageError(f"--prompt takes KEY=TEXT with KEY one of: {', '.join(map(str, waiting))} "
                                       "(or --prompt-all TEXT for every item)")
        chosen[key] = value
    return {"approved": not reject, **({"prompts": chosen} if chosen else {})}


@main.command()
@click.argument("run_id")
@click.option("--broker", default=None, help="Broker URL (default: MGMFLOW_BROKER_URL).")
def cancel(run_id: str, broker: str | None) -> None:
    """Cancel RUN_ID and its model tasks."""
    from mgmflow.orchestrator.runs import RunService

    settings = _settings(broker)
    _known_run(settings, run_id)
    run = RunService(settings).cancel(run_id)
    click.echo(f"run {run_id}: {run.status}")


@main.command()
@click.option("--grace-s", type=click.FloatRange(0), default=None,
              help="Keep unreferenced blobs younger than this (default: MGMFLOW_GC_GRACE_S, 1 hour).")
def gc(grace_s: float | None) -> None:
    """Delete threads past MGMFLOW_RUN_RETENTION_S, expired artifacts and the stored bytes no artifact references
    any more (the stores of the settings: SQLite or PostgreSQL, folder or S3). Every API process also does it every
    MGMFLOW_GC_INTERVAL_S."""
    from mgmflow.orchestrator.api.retention import sweep
    from mgmflow.orchestrator.api.settings import ApiSettings
    from mgmflow.workers.artifacts import open_store

    settings = ApiSettings()
    runs = None
    if settings.run_retention_s is not None:  # the run service only when runs are to be deleted
        from mgmflow.orchestrator.runs import RunService

        runs = RunService(settings)
    threads, expired, blobs = sweep(runs, open_store(settings), run_retention_s=settings.run_retention_s,
                                    grace_s=settings.gc_grace_s if grace_s is None else grace_s)
    click.echo(f"removed {threads} threads, {expired} expired artifacts and {blobs} unreferenced blobs")


@main.command()
@click.argument("batch_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--workflow", "-w", required=True, help="The workflow every line runs (e.g. story).")
@click.option("--server", envvar="MGMFLOW_SERVER", default="http://127.0.0.1:8000", show_default=True,
              help="The mgmflow server (env MGMFLOW_SERVER).")
@click.option("--api-key", envvar="MGMFLOW_API_KEY", default=None, help="Bearer key (env MGMFLOW_API_KEY).")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(1, 256))
@click.option("--priority", default=7, show_default=True, type=click.IntRange(0, 9), help="0 is the most urgent.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Where results go (default: ./batch-<id>).")
@click.option("--idempotency-key", default=None, help="Resubmitting with the same key follows the same batch.")
def submit(batch_file: Path, workflow: str, server: str, api_key: str | None, concurrency: int, priority: int,
           out_dir: Path | None, idempotency_key: str | None) -> None:
    """Send a batch (a JSON list or JSON Lines of inputs) to a server, show its progress, download the results."""
    from tqdm import tqdm

    from mgmflow.orchestrator.api.client import ApiClient, check_batch_file, check_out_dir, server_id

    check_batch_file(batch_file)
    if out_dir is not None:
        check_out_dir(out_dir)  # before the batch is sent: a folder that would be refused at the end
    client = ApiClient(server, api_key)
    batch = client.upload_batch(batch_file, workflow, concurrency, priority, idempotency_key)
    server_id(batch["batch_id"], "batch id")
    with tqdm(total=batch["total"], unit="item", desc=f"batch {batch['batch_id'][:8]}") as bar:
        def show(status: dict) -> None:
            bar.update(status["done"] - bar.n)
            bar.set_postfix({k: v for k, v in sorted(status["counts"].items())}, refresh=True)

        final = client.follow(batch["batch_id"], show)
    out_dir = out_dir or Path(f"batch-{batch['batch_id']}")  # a plain id: checked above
    written = client.download(batch["batch_id"], out_dir)
    click.echo(f"batch {final['run']['status']}: {final['counts']}; {written['items']} results and "
               f"{written['files']} files in {out_dir}")
