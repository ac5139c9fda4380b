"""Runs and threads as a service: the one API the CLI and the HTTP API use to start, follow, resume and cancel.

A run executes one workflow on a thread; runs on a thread are serial and see the thread's earlier state
(messages, artifacts). Submitting only writes a record and dispatches ``orchestrator.advance``: an orchestration
worker (in-process when embedded) drives the graph; everything else reads records, checkpoints and events.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

from mgmflow.models.errors import InvalidInputError, MGMFlowError
from mgmflow.orchestrator.driver import get_orchestrator
from mgmflow.orchestrator.records import ACTIVE, DEFAULT_SCOPE, TERMINAL, RunInfo, RunNotFound
from mgmflow.orchestrator.workflow import get_workflow

MAX_PREVIEWS = 1000  # the most denoising steps between two previews


class RunStillActive(MGMFlowError):
    """A run (or a thread's run) that has not ended cannot be deleted: cancel it first."""

    code = "run_active"


class RunService:
    """Start, read, follow, resume and cancel runs; read threads' state and history."""

    def __init__(self, settings: Any = None) -> None:
        self.orchestrator = get_orchestrator(settings)
        self.settings = self.orchestrator.settings
        self.runs = self.orchestrator.runs
        if self.settings.embedded:
            # No orchestration worker exists elsewhere: this process drives runs and sweeps for lost ones, starting
            # with those an earlier process of this home left unfinished (a restarted server picks them up).
            self.orchestrator.start_sweeper()
            self.orchestrator.recover()

    # Threads.
    def create_thread(self, *, scope: str = DEFAULT_SCOPE, thread_id: str | None = None,
                      metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.runs.create_thread(scope=scope, thread_id=thread_id, metadata=metadata)

    def get_thread(self, thread_id: str, *, scope: str | None = None) -> dict[str, Any]:
        return self.runs.get_thread(thread_id, scope=scope)

    def thread_state(self, thread_id: str, *, scope: str | None = None) -> dict[str, Any]:
        """The thread's latest state values (empty before its first run)."""
        snapshot = self._snapshot(thread_id, scope)
        return dict(snapshot.values) if snapshot is not None else {}

    def thread_history(self, thread_id: str, *, scope: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
        """The thread's checkpoints, newest first: ``{checkpoint_id, run_id, step, next, values}``."""
        thread = self.runs.get_thread(thread_id, scope=scope)
        if not thread["workflow"]:
            return []
        graph = self.orchestrator.graph(thread["workflow"])
        history = graph.get_state_history({"configurable": {"thread_id": thread_id}}, limit=limit)
        return [
            {"checkpoint_id": snapshot.config["configurable"]["checkpoint_id"],
             "run_id": (snapshot.metadata or {}).get("run_id"), "step": (snapshot.metadata or {}).get("step"),
             "next": list(snapshot.next), "values": dict(snapshot.values)}
            for snapshot in history
        ]

    def _snapshot(self, thread_id: str, scope: str | None) -> Any:
        thread = self.runs.get_thread(thread_id, scope=scope)
        if not thread["workflow"]:
            return None
        return self.orchestrator.graph(thread["workflow"]).get_state({"configurable": {"thread_id": thread_id}})

    # Runs.
    def create_run(self, workflow: str, input: dict[str, Any], *, thread_id: str | None = None,
                   scope: str = DEFAULT_SCOPE, approve: bool = False, idempotency_key: str | None = None,
                   priority: int = 5, metadata: dict[str, Any] | None = None, previews: int = 0,
                   webhook: str | None = None, stream_mode: list[str] | None = None,
                   stream_subgraphs: bool = False) -> RunInfo:
        """Validate ``input`` against the workflow, record the run and dispatch it.

        The same ``idempotency_key`` in the same scope returns the existing run instead of a new one.
        ``previews``: its diffusion steps store a preview every N denoising steps (``task.step`` events carry
        their artifact ids). ``webhook``: a URL recorded as pending with the run, for the HTTP API to deliver
        once it has ended (the caller checks that the URL is allowed). ``stream_mode``, ``stream_subgraphs``: the
        HTTP API's stream modes the run was created with, kept for a join that names none.
        """
        definition = get_workflow(workflow)
        validated = definition.validate_input(input).model_dump(mode="json")
        if not 0 <= priority <= 9:
            raise InvalidInputError(f"priority must be within 0..9, got {priority}")
        if not 0 <= previews <= MAX_PREVIEWS:
            raise InvalidInputError(f"previews must be within 0..{MAX_PREVIEWS} steps, got {previews}")
        if idempotency_key:
            existing = self.runs.by_idempotency_key(scope, idempotency_key)
            if existing is not None:
                return existing
        with self.orchestrator.database.transaction():  # thread and run: one commit, none on an error
            if thread_id is None:
                thread = self.runs.create_thread(scope=scope, workflow=workflow)
            else:
                try:
                    thread = self.runs.get_thread(thread_id, scope=scope)
                except RunNotFound:
                    thread = self.runs.create_thread(scope=scope, thread_id=thread_id, workflow=workflow)
                    if thread["scope"] != scope:
                        raise
            if thread["workflow"] not in (None, workflow):
                raise InvalidInputError(
                    f"thread {thread['thread_id']} belongs to workflow {thread['workflow']!r}, not {workflow!r}"
                )
            if thread["workflow"] is None:
                self.runs.bind_thread(thread["thread_id"], workflow)
            run = self.runs.insert(RunInfo(
                run_id=str(uuid.uuid4()), thread_id=thread["thread_id"], workflow=workflow, status="pending",
                scope=scope, input=validated, approve=approve, priority=priority, idempotency_key=idempotency_key,
                metadata=metadata or {}, previews=previews, webhook=webhook,
                webhook_status="pending" if webhook else None, stream_mode=stream_mode,
                stream_subgraphs=stream_subgraphs,
            ))
        self.orchestrator.dispatch(run.run_id)  # after the commit: the driver must find the record
        return run

    def get_run(self, run_id: str, *, scope: str | None = None) -> RunInfo:
        return self.runs.get(run_id, scope=scope)

    def list_runs(self, *, scope: str | None = None, thread_id: str | None = None, status: str | None = None,
                  workflow: str | None = None, limit: int = 100, offset: int = 0) -> list[RunInfo]:
        return self.runs.list(scope=scope, thread_id=thread_id, status=status, workflow=workflow, limit=limit,
                              offset=offset)

    def active_at_least(self, scope: str, count: int) -> bool:
        """Whether ``scope`` has ``count`` or more unfinished runs (a quota check on every submission)."""
        return self.runs.active_at_least(scope, count)

    def position(self, run: RunInfo) -> int:
        """Runs admitted before ``run`` that have not started yet."""
        return self.runs.position(run)

    def resume(self, run_id: str, resume_value: Any, *, scope: str | None = None) -> RunInfo:
        """Answer a run waiting for approval, e.g. ``{"approved": True}`` or ``{"prompt": "an edited prompt"}``."""
        run = self.runs.get(run_id, scope=scope)
        if run.status != "interrupted":
            raise InvalidInputError(f"run {run_id} is {run.status}, not waiting for approval")
        value = resume_value if resume_value is not None else {"approved": True}
        if not self.runs.update(run_id, unless_status=("pending", "running", *TERMINAL), status="running",
                                resume_value=value):
            raise InvalidInputError(f"run {run_id} is no longer waiting for approval")
        self.orchestrator.dispatch(run_id)
        return self.runs.get(run_id)

    def restart(self, run_id: str, *, scope: str | None = None) -> RunInfo:
        """Dispatch an active run again (after its driver died), re-submitting steps whose messages were lost;
        a no-op for a run that is being driven."""
        run = self.runs.get(run_id, scope=scope)
        if run.status in ACTIVE:
            self.orchestrator.dispatch(run_id, force=True)
        return run

    def cancel(self, run_id: str, *, scope: str | None = None) -> RunInfo:
        """Mark the run cancelled and cancel its tasks; a finished run stays as it was."""
        run = self.runs.get(run_id, scope=scope)
        if self.runs.update(run_id, status="cancelled", awaited=[], interrupt=None, resume_value=None):
            self.orchestrator.client.cancel(run_id)
            self.orchestrator.client.publish(run_id, "run", {"status": "cancelled"})
            self.orchestrator.start_next(run.thread_id)
        return self.runs.get(run_id)

    def delete_run(self, run_id: str, *, scope: str) -> None:
        """Forget a finished run: its record, its tasks' records and events, the artifacts it made. A run alone on
        its thread (a stateless run) takes the thread and its checkpoints with it."""
        run = self.runs.get(run_id, scope=scope)
        if not run.done:
            raise RunStillActive(f"run {run_id} is {run.status}: cancel it first")
        if all(other.run_id == run_id for other in self.runs.list(thread_id=run.thread_id, limit=2)):
            return self.delete_thread(run.thread_id, scope=scope)
        self._forget([run])
        self.runs.delete([run_id])

    def delete_thread(self, thread_id: str, *, scope: str) -> None:
        """Forget a thread whose runs have all ended: its record, its runs (as :meth:`delete_run`), its
        checkpoints."""
        self.runs.get_thread(thread_id, scope=scope)
        runs = self.runs.list(thread_id=thread_id, limit=1_000_000)
        active = [run.run_id for run in runs if not run.done]
        if active:
            raise RunStillActive(f"thread {thread_id} has runs that have not ended ({', '.join(active[:3])}): "
                                 "cancel them first")
        self._forget(runs)
        self.orchestrator.database.saver.delete_thread(thread_id)
        self.runs.delete_thread(thread_id)

    def delete_ended_before(self, cutoff: float, *, limit: int = 100) -> int:
        """Retention: delete (as :meth:`delete_thread`) up to ``limit`` threads whose runs all ended before
        ``cutoff``; returns how many."""
        deleted = 0
        for thread_id, scope in self.runs.threads_ended_before(cutoff, limit=limit):
            try:
                self.delete_thread(thread_id, scope=scope)
                deleted += 1
            except (RunStillActive, RunNotFound):  # a run started on it meanwhile, or another sweeper was first
                continue
        return deleted

    def _forget(self, runs: list[RunInfo]) -> None:
        for run in runs:
            self.orchestrator.client.delete_run(run.run_id)
        if runs:
            self.orchestrator.store.delete_made_by(runs[0].scope, {run.run_id for run in runs})

    def events(self, run_id: str, after: str | None = None, *, block_ms: int = 0, scope: str | None = None) -> list:
        """The run's events after event id ``after`` (``Event(id, type, data)``)."""
        self.runs.get(run_id, scope=scope)
        return self.orchestrator.client.events(run_id, after=after, block_ms=block_ms)

    def all_events(self, run_id: str) -> Iterator:
        """Every event the run has, oldest first, read page by page (token events are many)."""
        after = None
        while page := self.events(run_id, after):
            yield from page
            after = page[-1].id

    def wait(self, run_id: str, *, timeout: float | None = None, until: tuple[str, ...] = (*TERMINAL, "interrupted"),
             poll_s: float = 0.1) -> RunInfo:
        """Block until the run's status is in ``until`` (terminal or interrupted); ``TimeoutError`` otherwise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            run = self.runs.get(run_id)
            if run.status in until:
                return run
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} still {run.status} after {timeout} s")
            time.sleep(poll_s)

    def context(self, run: RunInfo) -> Any:
        """A RunContext for code outside the graph (a workflow's ``write_output``)."""
        return self.orchestrator.context_for(run)

    def output_values(self, run: RunInfo) -> dict[str, Any]:
        """The state values a finished run ended with: read at the checkpoint its driver recorded with its end,
        never whatever is latest on its thread (a later run, or a stale driver's write, may follow it)."""
        if run.ended_checkpoint is None:  # ended before its driver recorded where (older records, cancels)
            return self.thread_state(run.thread_id)
        config = {"configurable": {"thread_id": run.thread_id, "checkpoint_id": run.ended_checkpoint}}
        return dict(self.orchestrator.graph(run.workflow).get_state(config).values)
