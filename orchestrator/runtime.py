"""What a graph node may do: dispatch model tasks and park, ask a human, emit events, ask the VLM for JSON.

Nodes never block on a GPU task. :func:`await_tasks` submits a stage's tasks under deterministic ids and, unless
they are all finished already, parks the run with a LangGraph ``interrupt``; the driver resumes it when the
workers report completion. A node re-runs from its start on resume, so everything before the park is idempotent:
the same specs give the same task ids, and submitting a known id is a no-op. Items that need not wait for each
other go on without a join through :func:`advance_items`, each at its own pace.

Pitfall (LangGraph): interrupts inside ``Send`` branches resume wrongly; call :func:`await_tasks` once per stage
at one join point, with every item's tasks in one list.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from langgraph.runtime import get_runtime
from langgraph.types import interrupt
from pydantic import ValidationError

from mgmflow.models.errors import Cancelled, DeadlineExceeded, MGMFlowError
from mgmflow.orchestrator.schemas import VLMSchema

if TYPE_CHECKING:
    from mgmflow.workers.artifacts import ArtifactStore
    from mgmflow.workers.client import TaskClient
    from mgmflow.workers.settings import Settings

logger = logging.getLogger(__name__)

ORCHESTRATOR_RESUME = "orchestrator.resume"  # the Celery task a finished task notifies
FINISHED = frozenset({"done", "failed", "cancelled", "timed_out", "quarantined"})
DRAWING_KINDS = ("diffusion.", "edit.")  # task kinds whose payload takes ``preview_every``

SchemaT = TypeVar("SchemaT", bound=VLMSchema)
ItemT = TypeVar("ItemT")


@dataclass(frozen=True)
class RunContext:
    """Per-run, read-only handles a node needs; passed as LangGraph context, never stored in state."""

    run_id: str
    thread_id: str
    scope: str
    settings: Settings
    client: TaskClient
    store: ArtifactStore
    approve: bool = False
    priority: int = 5
    workflow: str = ""
    previews: int = 0  # diffusion steps of the run store a preview every N denoising steps (0: none)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """One model task of a stage; ``step`` is unique within the run and names the task id ``run_id:step``."""

    step: str
    kind: str
    payload: dict[str, Any]


class TaskFailedError(MGMFlowError):
    """A model task of the run failed for good (the workers already retried what was retryable)."""

    code = "task_failed"

    def __init__(self, task_id: str, error: dict[str, Any] | None, status: str) -> None:
        error = error or {}
        self.task_id = task_id
        self.status = status
        self.error_code = error.get("code", status)
        super().__init__(f"task {task_id} {status}: {error.get('message') or self.error_code}")


class InvalidModelOutputError(MGMFlowError):
    """The VLM's structured answer did not validate against its schema."""

    code = "invalid_model_output"


def get_run_context() -> RunContext:
    """The :class:`RunContext` of the run executing the current node."""
    context = get_runtime().context
    if not isinstance(context, RunContext):
        raise RuntimeError("no RunContext: run the graph through orchestrator.runs / orchestrator.driver")
    return context


def task_id_for(run_id: str, step: str) -> str:
    return f"{run_id}:{step}"


def await_tasks(specs: list[TaskSpec]) -> list[Any]:
    """Submit ``specs`` (idempotently) and return their results in spec order once all are done.

    While any is unfinished the run parks (``interrupt({"kind": "await", ...})``); the resume value is never
    trusted: after every resume the task records are read again, and the run parks again if need be.
    """
    if not specs:
        return []
    client, task_ids = get_run_context().client, submit_tasks(specs)
    while True:
        records = [client.get(task_id) for task_id in task_ids]
        pending = [task_id for task_id, record in zip(task_ids, records) if record is None or record.status not in FINISHED]
        if not pending:
            return [_result(record) for record in records]
        interrupt({"kind": "await", "task_ids": pending})


def poll_tasks(specs: list[TaskSpec]) -> list[Any | None]:
    """Submit ``specs`` (idempotently) and return each one's result, or None while it is unfinished; a task that
    failed raises as in :func:`await_tasks`. For nodes that move on with whatever finished (``orchestrator.loop``)."""
    context = get_run_context()
    records = [context.client.get(task_id_for(context.run_id, spec.step)) for spec in specs]
    done = [record is not None and record.status in FINISHED for record in records]
    submit_tasks([spec for spec, finished in zip(specs, done) if not finished])  # the others need no message
    return [_result(record) if finished else None for record, finished in zip(records, done)]


def await_any(specs: list[TaskSpec]) -> None:
    """Park until any of the (submitted) ``specs`` has finished; the node then reads the records again. (Every park
    wakes at the first completion: :func:`await_tasks` parks again on the rest.)"""
    run_id = get_run_context().run_id
    interrupt({"kind": "await", "task_ids": [task_id_for(run_id, spec.step) for spec in specs]})


def advance_items(
    items: list[ItemT],
    tasks: Callable[[ItemT], list[TaskSpec]],
    complete: Callable[[ItemT, list[TaskSpec], list[Any]], tuple[ItemT, dict[str, list]]],
) -> tuple[list[ItemT], list[int], dict[str, list]]:
    """Move every item whose current step finished on to its next step, with no join across items.

    ``tasks(item)`` are the tasks of the item's current step (none: it waits for nothing here, being done or left to
    another node); ``complete(item, specs, results)`` is the item after that step and the lists it adds to the
    state. An item goes on through every step already finished, and its next step's tasks are submitted at once.
    Returns the items, the positions of those that moved and the lists added (merged by key) as soon as any moved,
    so that the node returns them and the move is checkpointed; while none can move, parks until any awaited task
    finishes; returns with none moved when none waits for a task. Everything here runs again after a park, so
    ``tasks`` and ``complete`` must be pure (but for the events they emit)."""
    while True:
        items, moved, added, waiting = list(items), [], {}, []
        for position, item in enumerate(items):
            steps = 0
            while specs := tasks(item):
                results = poll_tasks(specs)
                if any(result is None for result in results):
                    waiting += [spec for spec, result in zip(specs, results) if result is None]
                    break
                item, update = complete(item, specs, results)
                steps += 1
                for key, values in update.items():
                    added[key] = added.get(key, []) + values
            if steps:  # it moved, through one step or several: listed once
                items[position] = item
                moved.append(position)
        if moved or not waiting:
            return items, moved, added
        await_any(waiting)


def submit_tasks(specs: list[TaskSpec]) -> list[str]:
    """Submit ``specs`` under their deterministic ids (a known id is not sent again); returns the ids."""
    context = get_run_context()
    steps = [spec.step for spec in specs]
    if len(set(steps)) != len(steps):
        raise ValueError(f"duplicate steps in one stage: {steps}")
    task_ids = [task_id_for(context.run_id, step) for step in steps]
    for spec, task_id in zip(specs, task_ids):
        context.client.submit(
            spec.kind,
            _with_previews(spec, context.previews),
            task_id=task_id,
            run_id=context.run_id,
            scope=context.scope,
            priority=context.priority,
            notify=(ORCHESTRATOR_RESUME, {"run_id": context.run_id}),
        )
    return task_ids


def _with_previews(spec: TaskSpec, every: int) -> dict[str, Any]:
    """The payload of ``spec``, asking for a preview every ``every`` steps when it draws (``diffusion.*`` and the
    ``edit.*`` kinds, which share its payload) and the workflow did not choose itself. The run's option is fixed
    at its creation, so a re-submitted step has the same payload."""
    if every and spec.kind.startswith(DRAWING_KINDS) and "preview_every" not in spec.payload:
        return {**spec.payload, "preview_every": every}
    return spec.payload


RUN_REF = "run:"  # awaited ids of child runs (``await_runs``), beside task ids


def await_runs(run_ids: list[str]) -> None:
    """Park until the first of the child runs ``run_ids`` has ended (the ``batch`` workflow's window).

    The children carry ``metadata={"parent_run_id": ...}`` so that their end wakes this run at once; the sweeper
    backs that up. Returns at once when ``run_ids`` is empty. Read the children's records after it returns.
    """
    if run_ids:
        interrupt({"kind": "await", "task_ids": [f"{RUN_REF}{run_id}" for run_id in run_ids]})


def _result(record: Any) -> Any:
    if record.status == "done":
        return record.result
    if record.status == "cancelled":
        raise Cancelled(f"task {record.task_id} was cancelled")
    if record.status == "timed_out":
        raise DeadlineExceeded(f"task {record.task_id} ran past its deadline")
    raise TaskFailedError(record.task_id, record.error, record.status)


def request_approval(payload: dict[str, Any]) -> Any:
    """Ask a human to approve (or edit) what is about to be generated; returns the resume value.

    Only runs started with ``approve=True`` stop here; the others get ``None`` at once.
    """
    if not get_run_context().approve:
        return None
    return interrupt({"kind": "approval", **payload})


def emit(event_type: str, data: dict[str, Any]) -> None:
    """Append an event (progress, artifact, ...) to the run's event stream."""
    context = get_run_context()
    context.client.publish(context.run_id, event_type, data)


@dataclass(frozen=True)
class VLMRequest:
    """One structured question to the VLM: ``prompt`` is a user text (with ``images``, artifact ids) or a full
    message list (``[{"role", "text", "images"}]``); ``list_sizes`` pins list lengths (e.g. ``{"scenes": 4}``)."""

    step: str
    prompt: str | list[dict[str, Any]]
    schema_model: type[VLMSchema]
    images: tuple[str, ...] = ()
    list_sizes: dict[str, int] | None = None
    seed: int | None = None
    max_new_tokens: int = 512
    # The message list stored as a JSON artifact, for texts too long for a 4 KB task message (``prompt`` unused).
    messages_artifact: str | None = None

    def task(self) -> TaskSpec:
        messages = (
            self.prompt
            if isinstance(self.prompt, list)
            else [{"role": "user", "text": self.prompt, "images": list(self.images)}]
        )
        history = {"messages_artifact": self.messages_artifact} if self.messages_artifact else {"messages": messages}
        payload = {
            **history,
            "json_schema": self.schema_model.json_schema(**(self.list_sizes or {})),
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }
        return TaskSpec(step=self.step, kind="vlm.chat", payload=payload)


def vlm_json_many(requests: list[VLMRequest]) -> list[VLMSchema]:
    """Ask several structured questions as one stage (one join); validated answers in request order."""
    results = await_tasks([request.task() for request in requests])
    return [parse_json(request.schema_model, answer_text(result, step=request.step), step=request.step)
            for request, result in zip(requests, results)]


def vlm_json(
    step: str,
    prompt: str | list[dict[str, Any]],
    schema_model: type[SchemaT],
    *,
    images: list[str] | tuple[str, ...] = (),
    list_sizes: dict[str, int] | None = None,
    seed: int | None = None,
) -> SchemaT:
    """Ask the VLM for JSON constrained by ``schema_model``'s schema; return the validated model instance."""
    request = VLMRequest(step, prompt, schema_model, tuple(images), list_sizes, seed)
    return vlm_json_many([request])[0]  # type: ignore[return-value]


def answer_text(result: dict[str, Any], *, step: str = "") -> str:
    """The text of a ``vlm.chat`` structured answer; typed error when it was cut at ``max_new_tokens``."""
    if result.get("finish_reason") == "length":
        raise InvalidModelOutputError(f"{step or 'vlm'}: the answer reached max_new_tokens before it was complete")
    return result["text"]


def parse_json(schema_model: type[SchemaT], text: str, *, step: str = "") -> SchemaT:
    """Validate the VLM's JSON text against ``schema_model``; typed error when it does not fit."""
    try:
        return schema_model.model_validate(json.loads(text))
    except (json.JSONDecodeError, ValidationError) as error:
        raise InvalidModelOutputError(
            f"{step or 'vlm'}: answer does not fit {schema_model.__name__}: {str(error)[:300]}"
        ) from None

