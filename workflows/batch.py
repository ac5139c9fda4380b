"""``batch``: one workflow mapped over many inputs, at most ``concurrency`` at once, failures reported per item.

    launch ─┬─ children still running → wait (park until the first ends) → launch
            └─ every item ended → summarize → END

Each item becomes a child run of ``workflow`` on its own thread, created with the idempotency key
``"<batch run>:<index>"`` (so a re-executed ``launch`` never starts an item twice) and ``parent_run_id`` metadata
(so its end wakes the batch). An item whose input is invalid, or whose run fails, is reported as failed with its
error; the others go on. This is the one batch mechanism: the HTTP API's batches run through it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field, field_validator
from typing_extensions import TypedDict  # pydantic (the API's state schemas) needs it on Python < 3.12

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.records import TERMINAL
from mgmflow.orchestrator.runtime import await_runs, emit, get_run_context
from mgmflow.orchestrator.workflow import Workflow, get_workflow

MAX_ITEMS = 10_000


class BatchInput(BaseModel):
    """The flags of ``mgmflow run batch`` and the input of an HTTP batch."""

    workflow: str = Field(min_length=1, max_length=128, description="the workflow every item runs")
    items: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_ITEMS,
                                        description="one input of that workflow per item")
    concurrency: int = Field(4, ge=1, le=256, description="items running at once")

    @field_validator("workflow")
    @classmethod
    def _known_and_not_batch(cls, name: str) -> str:
        if name == "batch":
            raise ValueError("a batch cannot run batches")
        get_workflow(name)  # an unknown name raises InvalidInputError listing the known ones
        return name


class ItemResult(TypedDict, total=False):
    index: int
    run_id: str | None
    status: str  # a run status (success, error, timeout, cancelled), or "invalid" for an input the workflow refused
    error: dict[str, Any] | None


class BatchState(TypedDict, total=False):
    workflow: str
    items: list[dict[str, Any]]
    concurrency: int
    running: dict[str, str]  # item index (as text: JSON keys) -> child run id
    results: dict[str, ItemResult]  # item index -> its outcome, once it ended
    summary: dict[str, int]


def launch(state: BatchState) -> dict[str, Any]:
    """Record the children that ended, then start items until ``concurrency`` run at once."""
    from mgmflow.orchestrator.runs import RunService

    context = get_run_context()
    service = RunService(context.settings)
    running = dict(state.get("running") or {})
    results = dict(state.get("results") or {})

    # 1. Children that ended since the last look.
    for index, run_id in list(running.items()):
        child = service.get_run(run_id)
        if child.status in TERMINAL:
            results[index] = {"index": int(index), "run_id": run_id, "status": child.status, "error": child.error}
            del running[index]

    # 2. New children, in item order, up to the concurrency limit.
    waiting = (i for i in range(len(state["items"])) if str(i) not in running and str(i) not in results)
    for index in waiting:
        if len(running) >= state["concurrency"]:
            break
        try:
            child = service.create_run(
                state["workflow"], state["items"][index], scope=context.scope, priority=context.priority,
                idempotency_key=f"{context.run_id}:{index}",
                metadata={"parent_run_id": context.run_id, "batch_index": index})
        except InvalidInputError as error:
            results[str(index)] = {"index": index, "run_id": None, "status": "invalid",
                                   "error": {"code": error.code, "message": str(error)}}
            continue
        running[str(index)] = child.run_id
    emit("progress", {"stage": "batch", "done": len(results), "total": len(state["items"])})
    return {"running": running, "results": results}


def wait(state: BatchState) -> dict[str, Any]:
    """Park until the first running child ends (no process blocks meanwhile)."""
    await_runs(sorted(state["running"].values()))
    return {}


def summarize(state: BatchState) -> dict[str, Any]:
    """Count the outcomes by status."""
    summary: dict[str, int] = {}
    for result in state["results"].values():
        summary[result["status"]] = summary.get(result["status"], 0) + 1
    return {"summary": summary}


def after_launch(state: BatchState) -> Literal["wait", "summarize"]:
    return "wait" if state.get("running") else "summarize"


def build_graph() -> StateGraph:
    graph = StateGraph(BatchState)
    graph.add_node("launch", launch)
    graph.add_node("wait", wait)
    graph.add_node("summarize", summarize)
    graph.add_edge(START, "launch")
    graph.add_conditional_edges("launch", after_launch)
    graph.add_edge("wait", "launch")
    graph.add_edge("summarize", END)
    return graph


def item_results(values: dict[str, Any]) -> list[ItemResult]:
    """Every item's outcome, in item order."""
    return [values["results"][key] for key in sorted(values.get("results") or {}, key=int)]


def write_output(values: dict[str, Any], out_dir: Path, context: Any) -> dict[str, Any]:
    """``results.json``: the summary and every item's run id, status and error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"workflow": values["workflow"], "summary": values.get("summary", {}), "items": item_results(values)}
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    return report


workflow = Workflow(
    name="batch",
    input_model=BatchInput,
    build_graph=build_graph,
    write_output=write_output,
    description="one workflow over many inputs, with a concurrency limit and per-item results",
)
