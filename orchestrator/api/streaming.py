"""Following a run over HTTP: its public shape, its SSE event stream (resumable with ``Last-Event-ID``), and waiting
for its end without holding a thread. All polling is ``await``-ed sleeps; store reads go to the thread pool."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import ApiContext
from mgmflow.orchestrator.api.errors import ApiError
from mgmflow.orchestrator.api.schemas import RunPublic
from mgmflow.orchestrator.api.stream_modes import ModeStream, parse_modes
from mgmflow.orchestrator.outputs import has_files
from mgmflow.orchestrator.records import public_thread_id

logger = logging.getLogger(__name__)

TERMINAL = ("success", "error", "timeout", "cancelled")
POLL_S = 0.2
EVENT_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


def timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def run_public(run: Any, *, position: int | None = None, progress: dict | None = None) -> RunPublic:
    output = run.status == "success" and has_files(run.workflow)
    return RunPublic(
        run_id=run.run_id, thread_id=public_thread_id(run.scope, run.thread_id), assistant_id=run.workflow,
        status=run.status,
        created_at=timestamp(run.created_at), updated_at=timestamp(run.updated_at), metadata=run.metadata or {},
        position=position, progress=progress, error=run.error,
        output_url=f"{run_location(run)}/output" if output else None,
    )


def run_location(run: Any) -> str:
    return f"/threads/{public_thread_id(run.scope, run.thread_id)}/runs/{run.run_id}"


def check_event_id(last_event_id: str | None) -> str | None:
    """A ``Last-Event-ID`` we issued ("<ms>-<seq>"), or a 400."""
    if last_event_id in (None, "", "-1"):
        return None
    if not EVENT_ID.match(last_event_id):
        raise ApiError(400, f"invalid Last-Event-ID {last_event_id[:40]!r}: expected '<ms>-<seq>'", code="bad_event_id")
    return last_event_id


async def final_values(context: ApiContext, run: Any) -> dict[str, Any]:
    """The state values ``run`` ended with, as ``/runs/wait`` and ``/join`` return them (not the thread's latest:
    a later run or state update may follow it); errors as ``__error__`` (what ``langgraph-sdk`` raises on)."""
    values = await run_in_threadpool(context.runs.output_values, run)
    if run.status != "success":
        error = run.error or {}
        values["__error__"] = {"error": error.get("code", run.status), "message": error.get("message", run.status)}
    return values


async def wait_for_end(context: ApiContext, run_id: str, scope: str, timeout: float | None = None) -> Any:
    """Poll until the run ends (or ``timeout`` seconds pass); returns its last record."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        run = await run_in_threadpool(context.runs.get_run, run_id, scope=scope)
        if run.status in TERMINAL or (deadline is not None and loop.time() >= deadline):
            return run
        await asyncio.sleep(POLL_S)


async def _events(context: ApiContext, run: Any, scope: str, after: str | None, cancel_on_disconnect: bool,
                  modes: tuple[str, ...] | None, subgraphs: bool) -> AsyncIterator[ServerSentEvent]:
    """The run's events as stored (``modes`` None; ``checkpoint`` events are left out: ``values`` is their mode),
    or in the Agent Server's ``modes``."""
    if after is None:
        yield ServerSentEvent(event="metadata", data=json.dumps({"run_id": run.run_id,
                                                                  "thread_id": public_thread_id(run.scope, run.thread_id)}))
    translator = None if modes is None else ModeStream(run, modes, subgraphs)
    if translator is not None and after is not None:  # resumed: what the client has seen shapes what follows
        await run_in_threadpool(_replay, context, translator, run.run_id, after)
    finished, position = False, None
    try:
        while True:
            # Status first, then events: everything published before the run ended is in this read.
            current = await run_in_threadpool(context.runs.get_run, run.run_id, scope=scope)
            if current.status == "pending" and translator is None:  # `queued` (not stored: no id) on each move
                now = await run_in_threadpool(context.runs.position, current)
                if now != position:
                    position = now
                    yield ServerSentEvent(event="queued", data=json.dumps({"position": position}))
            events = await run_in_threadpool(context.runs.events, run.run_id, after)
            for event in events:
                after = event.id
                if translator is not None:
                    for name, data in translator.translate(event):
                        yield ServerSentEvent(id=event.id, event=name, data=json.dumps(data))
                elif event.type != "checkpoint":
                    yield ServerSentEvent(id=event.id, event=event.type, data=json.dumps(event.data))
            if current.status in TERMINAL and not events:
                break
            if not events:
                await asyncio.sleep(POLL_S)
        values = await final_values(context, current)
        error = values.pop("__error__", None)
        if translator is None or ("values" in translator.modes and not translator.sent_values):
            yield ServerSentEvent(event="values", data=json.dumps(values))  # (the steps' events have expired)
        if error is not None:
            yield ServerSentEvent(event="error", data=json.dumps(error))
        yield ServerSentEvent(event="end", data=json.dumps({"run_id": current.run_id, "status": current.status}))
        finished = True
    finally:
        if not finished and cancel_on_disconnect:
            logger.info("client left the stream of run %s: cancelling it", run.run_id)
            await run_in_threadpool(context.runs.cancel, run.run_id)


def _replay(context: ApiContext, translator: ModeStream, run_id: str, until: str) -> None:
    last = _order(until)
    for event in context.runs.all_events(run_id):
        if _order(event.id) > last:
            return
        translator.translate(event)


def _order(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-", 1)
    return int(ms), int(seq)


def stream_response(context: ApiContext, run: Any, scope: str, *, last_event_id: str | None = None,
                    cancel_on_disconnect: bool = False, stream_mode: str | list[str] | None = None,
                    subgraphs: bool = False) -> EventSourceResponse:
    """The run's events as SSE (in ``stream_mode``, see :mod:`mgmflow.orchestrator.api.stream_modes`); ``Location`` tells
    ``langgraph-sdk`` where to reconnect after a drop."""
    after = check_event_id(last_event_id)
    modes = parse_modes(stream_mode)
    headers = {"Location": f"{run_location(run)}/stream", "Content-Location": run_location(run)}
    return EventSourceResponse(_events(context, run, scope, after, cancel_on_disconnect, modes, subgraphs),
                               headers=headers, ping=15, sep="\n")
