"""Batches: many inputs of one workflow, submitted at once (a JSON list, or an uploaded JSON / JSONL file), run by
the ``batch`` workflow with a concurrency limit. Status per item; results downloadable as JSON or JSONL."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Header, UploadFile
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId
from mgmflow.orchestrator.api.errors import ApiError, not_found
from mgmflow.orchestrator.api.openapi import errors
from mgmflow.orchestrator.api.schemas import BatchCreate, BatchItemPublic, BatchPublic, RunCreate
from mgmflow.orchestrator.api.streaming import TERMINAL, run_public
from mgmflow.orchestrator.api.submission import admit, check_artifacts

router = APIRouter(prefix="/batches", tags=["batches"])

BATCH_WORKFLOW = "batch"
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]


def parse_items(data: bytes, filename: str) -> list[dict[str, Any]]:
    """A JSON list of objects, or JSON Lines (one object per line); errors name the line."""
    text = data.decode("utf-8", errors="strict") if data else ""
    if not text.strip():
        raise ApiError(400, f"{filename} is empty", code="empty_batch")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            raise ApiError(400, f"{filename}: invalid JSON at line {error.lineno}: {error.msg}",
                           code="malformed_json") from None
        lines = list(enumerate(items, 1))
    else:
        lines = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    lines.append((number, json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ApiError(400, f"{filename}: line {number} is not JSON: {error.msg}",
                                   code="malformed_json") from None
    for number, item in lines:
        if not isinstance(item, dict):
            raise ApiError(400, f"{filename}: item {number} is not a JSON object", code="invalid_item")
    return [item for _, item in lines]


async def _submit(context, body: BatchCreate, scope: str, idempotency_key: str | None) -> BatchPublic:
    if body.assistant_id == BATCH_WORKFLOW or body.assistant_id not in context.workflows:
        raise ApiError(404, f"unknown workflow {body.assistant_id!r} for a batch", code="unknown_workflow")
    if len(body.items) > context.settings.max_batch_items:
        raise ApiError(413, f"{len(body.items):,} items; the limit is {context.settings.max_batch_items:,}",
                       code="too_many_items")
    workflow = context.workflows[body.assistant_id]
    for index, item in enumerate(body.items):  # ids of this key only, before anything is created
        await run_in_threadpool(check_artifacts, context, workflow, item, scope, f"items[{index}]")
    run_body = RunCreate(assistant_id=BATCH_WORKFLOW, priority=body.priority, metadata=body.metadata,
                         input={"workflow": body.assistant_id, "items": body.items, "concurrency": body.concurrency})
    run = await admit(context, run_body, scope=scope, thread_id=None, idempotency_key=idempotency_key)
    return await run_in_threadpool(_public, context, run, scope, False)


def _public(context, run: Any, scope: str, with_items: bool) -> BatchPublic:
    """The batch's run, its counts by status, and (``with_items``) every item's status."""
    values = context.runs.output_values(run) if run.status != "pending" else {}
    total = len(run.input["items"])
    results = values.get("results") or {}
    running = values.get("running") or {}
    items: list[BatchItemPublic] = []
    counts: dict[str, int] = {}
    for index in range(total):
        key = str(index)
        if key in results:
            result = results[key]
            item = BatchItemPublic(index=index, run_id=result.get("run_id"), status=result["status"],
                                   error=result.get("error"))
        elif key in running:
            child = context.runs.get_run(running[key], scope=scope) if with_items else None
            item = BatchItemPublic(index=index, run_id=running[key], status=child.status if child else "running")
        else:
            item = BatchItemPublic(index=index, status="cancelled" if run.status in TERMINAL else "waiting")
        counts[item.status] = counts.get(item.status, 0) + 1
        items.append(item)
    return BatchPublic(batch_id=run.run_id, workflow=run.input["workflow"], total=total,
                       done=len(results), counts=counts, run=run_public(run), items=items if with_items else None)


async def _batch_run(context, batch_id: str, scope: str) -> Any:
    run = await run_in_threadpool(context.runs.get_run, batch_id, scope=scope)
    if run.workflow != BATCH_WORKFLOW:
        raise not_found(f"batch {batch_id!r}")
    return run


@router.post("", response_model=BatchPublic, responses=errors(404))
async def create_batch(body: BatchCreate, context: Context, scope: CurrentScope,
                       idempotency_key: IdempotencyKey = None) -> BatchPublic:
    """Submit a batch: ``items`` are inputs of ``assistant_id``, at most ``concurrency`` run at once."""
    return await _submit(context, body, scope, idempotency_key)


@router.post("/upload", response_model=BatchPublic, responses=errors(404))
async def upload_batch(file: UploadFile, context: Context, scope: CurrentScope,
                       assistant_id: Annotated[str, Form(min_length=1, max_length=128)],
                       concurrency: Annotated[int, Form(ge=1, le=256)] = 4,
                       priority: Annotated[int, Form(ge=0, le=9)] = 7,
                       idempotency_key: IdempotencyKey = None) -> BatchPublic:
    """Submit a batch from a file: a JSON list of inputs, or JSON Lines (one input per line)."""
    try:
        items = parse_items(await file.read(), file.filename or "the file")
    except UnicodeDecodeError:
        raise ApiError(400, "the file is not UTF-8 text", code="invalid_encoding") from None
    body = BatchCreate(assistant_id=assistant_id, items=items, concurrency=concurrency, priority=priority)
    return await _submit(context, body, scope, idempotency_key)


@router.get("/{batch_id}", response_model=BatchPublic)
async def read_batch(batch_id: PathId, context: Context, scope: CurrentScope) -> BatchPublic:
    """The batch's status, counts, and each item's status and run id."""
    run = await _batch_run(context, batch_id, scope)
    return await run_in_threadpool(_public, context, run, scope, True)


@router.get("/{batch_id}/results", response_class=JSONResponse,
            responses={200: {"content": {"application/json": {}, "application/x-ndjson": {}}}})
async def read_batch_results(batch_id: PathId, context: Context, scope: CurrentScope,
                             format: Literal["json", "jsonl"] = "json") -> Response:
    """Every item's status, error and final output (its run's state), as a JSON list or JSON Lines download."""
    run = await _batch_run(context, batch_id, scope)

    def collect() -> list[dict[str, Any]]:
        batch = _public(context, run, scope, True)
        rows = []
        for item in batch.items or []:
            row = item.model_dump(mode="json")
            if item.status == "success" and item.run_id:
                child = context.runs.get_run(item.run_id, scope=scope)
                row["output"] = context.runs.output_values(child)
                row["output_url"] = run_public(child).output_url  # its files as a zip (a story's storyboard)
            rows.append(row)
        return rows

    rows = await run_in_threadpool(collect)
    disposition = {"Content-Disposition": f'attachment; filename="batch-{batch_id}.{format}"'}
    if format == "jsonl":
        body = "".join(json.dumps(row) + "\n" for row in rows)
        return Response(body, media_type="application/x-ndjson", headers=disposition)
    return JSONResponse(rows, headers=disposition)


@router.post("/{batch_id}/cancel", response_model=BatchPublic)
async def cancel_batch(batch_id: PathId, context: Context, scope: CurrentScope) -> BatchPublic:
    """Cancel the batch and its running items; finished items keep their results."""
    run = await _batch_run(context, batch_id, scope)

    def cancel() -> BatchPublic:
        running = (context.runs.thread_state(run.thread_id, scope=scope).get("running") or {}).values()
        cancelled = context.runs.cancel(run.run_id, scope=scope)
        for child in running:
            context.runs.cancel(child, scope=scope)
        return _public(context, cancelled, scope, True)

    return await run_in_threadpool(cancel)
