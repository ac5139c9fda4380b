"""Threads: a conversation of runs of one workflow, with its state and history (Agent Server shapes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId, ThreadId
from mgmflow.orchestrator.api.errors import ApiError, not_found
from mgmflow.orchestrator.api.openapi import errors
from mgmflow.orchestrator.api.schemas import (
    Checkpoint, ThreadCreate, ThreadHistoryRequest, ThreadPublic, ThreadSearch, ThreadStatePublic, ThreadStateRequest,
)
from mgmflow.orchestrator.api.streaming import timestamp
from mgmflow.orchestrator.records import RunNotFound, public_thread_id, scoped_thread_id

router = APIRouter(prefix="/threads", tags=["threads"])

MAX_HISTORY = 1000  # checkpoints searched for one by id
_STATUS = {"pending": "busy", "running": "busy", "interrupted": "interrupted", "error": "error",
           "timeout": "error"}


def _thread_public(context, thread: dict[str, Any], *, with_values: bool = True) -> ThreadPublic:
    runs = context.runs.list_runs(scope=thread["scope"], thread_id=thread["thread_id"], limit=1)
    latest = runs[0] if runs else None
    interrupts = {latest.run_id: latest.interrupt} if latest is not None and latest.interrupt else {}
    return ThreadPublic(
        thread_id=public_thread_id(thread["scope"], thread["thread_id"]), created_at=timestamp(thread["created_at"]),
        updated_at=timestamp(latest.updated_at if latest else thread["created_at"]),
        metadata={**thread["metadata"], **({"graph_id": thread["workflow"]} if thread["workflow"] else {})},
        status=_STATUS.get(latest.status, "idle") if latest else "idle",
        values=context.runs.thread_state(thread["thread_id"]) if with_values else None,
        interrupts=interrupts,
    )


@router.post("", response_model=ThreadPublic, responses=errors(409))
def create_thread(body: ThreadCreate, context: Context, scope: CurrentScope) -> ThreadPublic:
    """Create a thread (``if_exists="do_nothing"`` returns the existing one instead of a 409). Thread ids are per
    key: another key's thread of the same id is another thread."""
    thread_id = scoped_thread_id(scope, body.thread_id) if body.thread_id is not None else None
    if thread_id is not None:
        try:
            existing = context.runs.get_thread(thread_id, scope=scope)
        except RunNotFound:
            existing = None
        if existing is not None:
            if body.if_exists == "raise":
                raise ApiError(409, f"thread {body.thread_id!r} already exists", code="thread_exists")
            return _thread_public(context, existing)
    return _thread_public(context, context.runs.create_thread(scope=scope, thread_id=thread_id,
                                                              metadata=body.metadata))


@router.get("/{thread_id}", response_model=ThreadPublic)
def read_thread(thread_id: ThreadId, context: Context, scope: CurrentScope) -> ThreadPublic:
    """A thread, its status (from its latest run) and its current values."""
    return _thread_public(context, context.runs.get_thread(thread_id, scope=scope))


@router.delete("/{thread_id}", status_code=204, responses=errors(404, 409))
def delete_thread(thread_id: ThreadId, context: Context, scope: CurrentScope) -> Response:
    """Delete a thread whose runs have ended (409 otherwise): its runs, checkpoints and the artifacts they made."""
    context.runs.delete_thread(thread_id, scope=scope)
    return Response(status_code=204)


@router.post("/search", response_model=list[ThreadPublic])
def search_threads(body: ThreadSearch, context: Context, scope: CurrentScope) -> list[ThreadPublic]:
    """This key's threads that have runs, newest first (filtered by metadata and status)."""
    found: list[ThreadPublic] = []
    seen: set[str] = set()
    offset = 0
    while len(found) < body.offset + body.limit:
        runs = context.runs.list_runs(scope=scope, limit=500, offset=offset)
        if not runs:
            break
        offset += len(runs)
        for run in runs:
            if run.thread_id in seen:
                continue
            seen.add(run.thread_id)
            thread = _thread_public(context, context.runs.get_thread(run.thread_id, scope=scope), with_values=False)
            if body.status not in (None, thread.status):
                continue
            if body.metadata and any(thread.metadata.get(k) != v for k, v in body.metadata.items()):
                continue
            found.append(thread)
    return found[body.offset: body.offset + body.limit]


@router.get("/{thread_id}/state", response_model=ThreadStatePublic)
def read_thread_state(thread_id: ThreadId, context: Context, scope: CurrentScope) -> ThreadStatePublic:
    """The thread's latest state (what its last run left)."""
    history = context.runs.thread_history(thread_id, scope=scope, limit=1)
    public = public_thread_id(scope, thread_id)
    return _state_public(public, history[0]) if history else ThreadStatePublic(
        values={}, next=[], checkpoint=Checkpoint(thread_id=public))


@router.post("/{thread_id}/state/checkpoint", response_model=ThreadStatePublic)
def read_thread_state_at(thread_id: ThreadId, body: ThreadStateRequest, context: Context,
                         scope: CurrentScope) -> ThreadStatePublic:
    """The thread's state at ``checkpoint.checkpoint_id`` (what ``RemoteGraph.get_state`` asks), or its latest."""
    if body.checkpoint.checkpoint_id is None:
        return read_thread_state(thread_id, context, scope)
    history = context.runs.thread_history(thread_id, scope=scope, limit=MAX_HISTORY)
    public = public_thread_id(scope, thread_id)
    for entry in history:
        if entry["checkpoint_id"] == body.checkpoint.checkpoint_id:
            return _state_public(public, entry)
    raise not_found(f"checkpoint {body.checkpoint.checkpoint_id!r} of thread {public!r}")


@router.post("/{thread_id}/history", response_model=list[ThreadStatePublic])
def read_thread_history(thread_id: ThreadId, body: ThreadHistoryRequest, context: Context,
                        scope: CurrentScope) -> list[ThreadStatePublic]:
    """The thread's checkpoints, newest first."""
    history = context.runs.thread_history(thread_id, scope=scope, limit=body.limit)
    return [_state_public(public_thread_id(scope, thread_id), entry) for entry in history]


def _state_public(thread_id: str, entry: dict[str, Any]) -> ThreadStatePublic:
    return ThreadStatePublic(
        values=entry["values"], next=entry["next"],
        checkpoint=Checkpoint(thread_id=thread_id, checkpoint_id=entry["checkpoint_id"]),
        metadata={"run_id": entry.get("run_id"), "step": entry.get("step")},
    )
