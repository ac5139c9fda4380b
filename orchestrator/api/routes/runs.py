"""Runs, in the shape of the LangGraph Agent Server: on a thread (``/threads/{id}/runs``) or stateless (``/runs``,
each on a new thread). Create, ``/wait``, ``/stream`` (SSE, in the Agent Server's stream modes), ``/batch``,
cancel, join, join-stream, list, read; a run is also reachable by its id alone (``/runs/{run_id}/...``)."""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, Query
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId, ThreadId
from mgmflow.orchestrator.api.errors import ApiError, not_found
from mgmflow.orchestrator.api.logs import current_run
from mgmflow.orchestrator.api.openapi import errors
from mgmflow.orchestrator.api.schemas import MAX_OFFSET, RunCreate, RunPublic, RunsCancel, RunStatus, StreamMode
from mgmflow.orchestrator.api.streaming import (
    TERMINAL, check_event_id, final_values, run_location, run_public, stream_response, wait_for_end,
)
from mgmflow.orchestrator.api.submission import admit, check_limits
from mgmflow.orchestrator.records import scoped_thread_id

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/runs", tags=["runs"])
thread_router = APIRouter(prefix="/threads/{thread_id}/runs", tags=["thread-runs"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)]
# The pattern is documented only: check_event_id answers a bad one with its own 400.
LastEventId = Annotated[str, Header(alias="Last-Event-ID", max_length=64,
                                    json_schema_extra={"pattern": r"^(-1|\d{1,20}-\d{1,20})?$"})]
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]


def _named_modes(modes: list[str] | None) -> list[str] | None:
    """``langgraph-sdk``'s ``join_stream`` sends ``stream_mode=`` (empty) when it names no mode: that is none."""
    return [mode for mode in modes or () if mode] or None


# join-stream: none named, the modes the run was created with
StreamModes = Annotated[list[StreamMode | Literal[""]] | None, AfterValidator(_named_modes), Query()]


# Shared steps ---------------------------------------------------------------------------------------------------


async def _start(context, body: RunCreate, scope: str, thread_id: str | None, idempotency_key: str | None):
    """Create the run, or resume the thread's interrupted run when the body carries ``command.resume``.

    A ``webhook`` is recorded with the run; ``mgmflow.orchestrator.api.webhooks`` delivers it once the run has ended."""
    if body.command is not None and body.command.resume is not None:
        if thread_id is None:  # a new thread has no run waiting for approval
            raise ApiError(409, "command.resume needs the interrupted run's thread: POST /threads/{thread_id}/runs",
                           code="not_interrupted")
        check_limits(body.command.resume, context.settings, "command.resume")
        waiting = await run_in_threadpool(context.runs.list_runs, scope=scope, thread_id=thread_id,
                                          status="interrupted", limit=1)
        if not waiting:
            raise ApiError(409, f"thread {thread_id!r} has no run waiting for approval", code="not_interrupted")
        return await run_in_threadpool(context.runs.resume, waiting[0].run_id, body.command.resume, scope=scope)
    run = await admit(context, body, scope=scope, thread_id=thread_id, idempotency_key=idempotency_key)
    current_run.set(run.run_id)
    logger.debug("run %s of %s admitted (priority %d)", run.run_id, run.workflow, run.priority)
    return run


async def _progress(context, run: Any) -> dict | None:
    """The run's latest ``progress`` event (None before the first)."""
    def latest() -> dict | None:
        found = None
        for event in context.runs.all_events(run.run_id):
            if event.type == "progress":
                found = event.data
        return found

    return await run_in_threadpool(latest)


async def _get(context, run_id: str, scope: str, thread_id: str | None = None) -> Any:
    """The caller's run (on ``thread_id`` when given), or a 404."""
    run = await run_in_threadpool(context.runs.get_run, run_id, scope=scope)
    if thread_id is not None and run.thread_id != thread_id:
        raise not_found(f"run {run_id!r}")
    current_run.set(run.run_id)
    return run


async def _read(context, run_id: str, scope: str, thread_id: str | None = None) -> RunPublic:
    run = await _get(context, run_id, scope, thread_id)
    position = await run_in_threadpool(context.runs.position, run) if run.status == "pending" else None
    progress = None if run.status in TERMINAL else await _progress(context, run)
    return run_public(run, position=position, progress=progress)


def _created(run: Any) -> JSONResponse:
    return JSONResponse(run_public(run).model_dump(mode="json"), headers={"Content-Location": run_location(run)})


async def _waited(context, run: Any, scope: str) -> JSONResponse:
    finished = await wait_for_end(context, run.run_id, scope)
    return JSONResponse(await final_values(context, finished),
                        headers={"Content-Location": run_location(run), "Location": f"{run_location(run)}/join"})


def _streamed(context, run: Any, scope: str, body: RunCreate):
    return stream_response(context, run, scope, cancel_on_disconnect=body.on_disconnect == "cancel",
                           stream_mode=body.stream_mode, subgraphs=body.stream_subgraphs)


async def _joined(context, run_id: str, scope: str, thread_id: str | None = None) -> JSONResponse:
    await _get(context, run_id, scope, thread_id)
    run = await wait_for_end(context, run_id, scope)
    return JSONResponse(await final_values(context, run))


async def _join_stream(context, run_id: str, scope: str, thread_id: str | None, last_event_id: str | None,
                       cancel_on_disconnect: bool, stream_mode: list[str] | None, stream_subgraphs: bool):
    check_event_id(last_event_id)
    run = await _get(context, run_id, scope, thread_id)
    if stream_mode is None:  # as the Agent Server: the modes the run was created with (a reconnect names none)
        stream_mode, stream_subgraphs = run.stream_mode, stream_subgraphs or run.stream_subgraphs
    return stream_response(context, run, scope, last_event_id=last_event_id,
                           cancel_on_disconnect=cancel_on_disconnect, stream_mode=stream_mode,
                           subgraphs=stream_subgraphs)


async def _cancel(context, run_id: str, scope: str, wait: bool) -> RunPublic:
    run = await run_in_threadpool(context.runs.cancel, run_id, scope=scope)
    if wait:
        run = await wait_for_end(context, run_id, scope)
    return run_public(run)


async def _list(context, scope: str, thread_id: str | None, status: str | None, limit: int, offset: int):
    runs = await run_in_threadpool(context.runs.list_runs, scope=scope, thread_id=thread_id, status=status,
                                   limit=limit, offset=offset)
    return [run_public(run) for run in runs]


# Stateless runs -------------------------------------------------------------------------------------------------


@router.post("", response_model=RunPublic, responses=errors(404, 409))
async def create_run(body: RunCreate, context: Context, scope: CurrentScope, idempotency_key: IdempotencyKey = None):
    """Start a background run on a new thread; poll it with ``GET /runs/{run_id}``."""
    return _created(await _start(context, body, scope, None, idempotency_key))


@router.post("/wait", responses=errors(404, 409))
async def wait_run(body: RunCreate, context: Context, scope: CurrentScope, idempotency_key: IdempotencyKey = None):
    """Start a run and answer with its final state."""
    return await _waited(context, await _start(context, body, scope, None, idempotency_key), scope)


@router.post("/stream", response_class=JSONResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **errors(404, 409)})
async def stream_run(body: RunCreate, context: Context, scope: CurrentScope, idempotency_key: IdempotencyKey = None):
    """Start a run and stream its events (SSE); ``on_disconnect="cancel"`` cancels it when the client leaves."""
    run = await _start(context, body, scope, None, idempotency_key)
    return _streamed(context, run, scope, body)


@router.post("/batch", response_model=list[RunPublic], responses=errors(404, 409))
async def create_run_batch(context: Context, scope: CurrentScope,
                           body: Annotated[list[RunCreate], Body(min_length=1, max_length=1000)]):
    """Start several background runs at once (each on its own thread)."""
    return [run_public(await _start(context, item, scope, None, None)) for item in body]


@router.post("/cancel", status_code=204, responses=errors(404))
async def cancel_runs(body: RunsCancel, context: Context, scope: CurrentScope,
                      action: Literal["interrupt", "rollback"] = "interrupt"):
    """Cancel runs by id, by thread, or every pending/running one of this key."""
    if body.run_ids:
        ids = body.run_ids
    else:
        if body.status is None and body.thread_id is None:
            raise ApiError(422, "give run_ids, thread_id or status", code="invalid_request")
        statuses = ("pending", "running", "interrupted") if body.status in (None, "all") else (body.status,)
        ids = []
        for status in statuses:
            thread_id = scoped_thread_id(scope, body.thread_id) if body.thread_id is not None else None
            runs = await run_in_threadpool(context.runs.list_runs, scope=scope, thread_id=thread_id,
                                           status=status, limit=100_000)
            ids += [run.run_id for run in runs]
    for run_id in ids:
        await run_in_threadpool(context.runs.cancel, run_id, scope=scope)
    return Response(status_code=204)


@router.get("", response_model=list[RunPublic])
async def list_runs(context: Context, scope: CurrentScope, limit: Limit = 10, offset: Offset = 0,
                    status: RunStatus | None = None):
    """This key's runs, newest first, a page at a time."""
    return await _list(context, scope, None, status, limit, offset)


@router.get("/{run_id}", response_model=RunPublic)
async def read_run(run_id: PathId, context: Context, scope: CurrentScope):
    """A run's status, queue position (runs admitted before it, not started yet) and latest progress."""
    return await _read(context, run_id, scope)


@router.post("/{run_id}/cancel", response_model=RunPublic, responses=errors(404))
async def cancel_run(run_id: PathId, context: Context, scope: CurrentScope, wait: bool = False,
                     action: Literal["interrupt", "rollback"] = "interrupt"):
    """Cancel a run by its id (idempotent); ``wait=1`` answers once it has stopped."""
    await _get(context, run_id, scope)
    return await _cancel(context, run_id, scope, wait)


@router.get("/{run_id}/join", responses=errors(404))
async def join_run(run_id: PathId, context: Context, scope: CurrentScope):
    """Wait for the run to end; answer with the state it ended with."""
    return await _joined(context, run_id, scope)


@router.get("/{run_id}/stream", response_class=JSONResponse,
            responses={200: {"content": {"text/event-stream": {}}}, **errors(400, 404)})
async def join_run_stream(run_id: PathId, context: Context, scope: CurrentScope, last_event_id: LastEventId = None,
                          cancel_on_disconnect: bool = False, stream_mode: StreamModes = None,
                          stream_subgraphs: bool = False):
    """Stream a run's events (SSE) from the start, or after ``Last-Event-ID`` to resume."""
    return await _join_stream(context, run_id, scope, None, last_event_id, cancel_on_disconnect, stream_mode,
                              stream_subgraphs)


# Runs on a thread -----------------------------------------------------------------------------------------------


@thread_router.post("", response_model=RunPublic, responses=errors(409))
async def create_thread_run(thread_id: ThreadId, body: RunCreate, context: Context, scope: CurrentScope,
                            idempotency_key: IdempotencyKey = None):
    """Start a background run on the thread (after its earlier runs: runs on a thread are serial)."""
    return _created(await _start(context, body, scope, thread_id, idempotency_key))


@thread_router.post("/wait", responses=errors(409))
async def wait_thread_run(thread_id: ThreadId, body: RunCreate, context: Context, scope: CurrentScope,
                          idempotency_key: IdempotencyKey = None):
    """Start a run on the thread and answer with the state it ended with."""
    return await _waited(context, await _start(context, body, scope, thread_id, idempotency_key), scope)


@thread_router.post("/stream", response_class=JSONResponse,
                    responses={200: {"content": {"text/event-stream": {}}}, **errors(409)})
async def stream_thread_run(thread_id: ThreadId, body: RunCreate, context: Context, scope: CurrentScope,
                            idempotency_key: IdempotencyKey = None):
    """Start a run on the thread and stream its events (SSE)."""
    run = await _start(context, body, scope, thread_id, idempotency_key)
    return _streamed(context, run, scope, body)


@thread_router.get("", response_model=list[RunPublic])
async def list_thread_runs(thread_id: ThreadId, context: Context, scope: CurrentScope, limit: Limit = 10,
                           offset: Offset = 0, status: RunStatus | None = None):
    """The thread's runs, newest first."""
    await run_in_threadpool(context.runs.get_thread, thread_id, scope=scope)
    return await _list(context, scope, thread_id, status, limit, offset)


@thread_router.get("/{run_id}", response_model=RunPublic)
async def read_thread_run(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope):
    """A run's status, queue position and latest progress."""
    return await _read(context, run_id, scope, thread_id)


@thread_router.delete("/{run_id}", status_code=204, responses=errors(404, 409))
async def delete_thread_run(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope) -> Response:
    """Delete a run that has ended (409 otherwise): its record, events and the artifacts it made."""
    await _get(context, run_id, scope, thread_id)
    await run_in_threadpool(context.runs.delete_run, run_id, scope=scope)
    return Response(status_code=204)


@thread_router.post("/{run_id}/cancel", response_model=RunPublic)
async def cancel_thread_run(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope,
                            wait: bool = False, action: Literal["interrupt", "rollback"] = "interrupt"):
    """Cancel a run (idempotent: a finished run stays as it was); ``wait=1`` answers once it has stopped."""
    await _get(context, run_id, scope, thread_id)
    return await _cancel(context, run_id, scope, wait)


@thread_router.get("/{run_id}/join")
async def join_thread_run(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope):
    """Wait for the run to end; answer with the state it ended with."""
    return await _joined(context, run_id, scope, thread_id)


@thread_router.get("/{run_id}/stream", response_class=JSONResponse,
                   responses={200: {"content": {"text/event-stream": {}}}, **errors(400)})
async def join_thread_run_stream(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope,
                                 last_event_id: LastEventId = None, cancel_on_disconnect: bool = False,
                                 stream_mode: StreamModes = None, stream_subgraphs: bool = False):
    """Stream a run's events (SSE) from the start, or after ``Last-Event-ID`` to resume."""
    return await _join_stream(context, run_id, scope, thread_id, last_event_id, cancel_on_disconnect, stream_mode,
                              stream_subgraphs)
