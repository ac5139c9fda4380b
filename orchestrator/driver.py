"""Driving runs: advance a run's graph until it parks, on every completion of a task it awaits.

    create_run ─► orchestrator.advance ─► graph runs until await_tasks parks (interrupt) ─► record: awaited ids
    worker finishes a task ─► orchestrator.resume(run_id) ─► any awaited one finished? ─► Command(resume=…) ─► …

No process waits for a GPU: an orchestration task takes the run's lease, runs the graph to its next park and
returns. Any orchestration worker may pick up any run (state is in the checkpoints, durability="sync"); a dead
holder's lease expires. A sweeper thread re-dispatches runs that are ready but idle: a lost completion message,
a killed orchestration worker, a queued run whose thread became free.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any, Iterator

from langgraph.types import Command

from mgmflow.models.errors import Cancelled, DeadlineExceeded, MGMFlowError
from mgmflow.orchestrator.checkpoint import LEASE_KEY, RunLeaseLost, open_database
from mgmflow.orchestrator.dispatch import Dispatcher
from mgmflow.orchestrator.records import TERMINAL, RunInfo, RunStore
from mgmflow.orchestrator.runtime import RUN_REF, FINISHED, RunContext
from mgmflow.orchestrator.workflow import get_workflow
from mgmflow.workers import faults
from mgmflow.workers.records import owner_gone

logger = logging.getLogger(__name__)

ADVANCE = "orchestrator.advance"
RESUME = "orchestrator.resume"
QUEUE = "orchestrator"
SWEEP_INTERVAL_S = 2.0
SWEEP_GRACE_S = 2.0  # a run idle for less than this may still have its message in flight
SWEEP_BACKOFF_MAX_S = 60.0  # the longest wait between two re-dispatches of a run that stays idle


class Orchestrator:
    """The per-process driver: run records, checkpoints, the task client, compiled graphs, the sweeper."""

    def __init__(self, settings: Any) -> None:
        from mgmflow.workers.app import get_app
        from mgmflow.workers.artifacts import open_store
        from mgmflow.workers.client import TaskClient

        self.settings = settings
        # Before the client: in embedded mode it starts the in-process worker, which only knows the tasks
        # registered when it starts.
        register(get_app(settings), settings)
        self.dispatcher = Dispatcher(get_app(settings), ADVANCE, QUEUE)
        self.database = open_database(settings)
        self.runs = RunStore(self.database)
        self.client = TaskClient(settings)
        self.store = open_store(settings)
        # The driving process renews its lease every third of it; a dead one's runs are free after lease_s.
        self.lease_s = settings.lease_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._graphs: dict[int, Any] = {}
        self._sweeper: threading.Thread | None = None
        self._resent: dict[str, tuple[int, float]] = {}  # run id -> (times re-dispatched, not again before)
        self._sweeping = threading.Lock()
        self._recovered = False
        self._stop = threading.Event()

    # Dispatch.
    def dispatch(self, run_id: str, *, force: bool = False) -> None:
        """Ask an orchestration worker (in-process when embedded) to advance ``run_id`` (sent in the background)."""
        self.dispatcher.send({"run_id": run_id, "force": force})

    def advance(self, run_id: str, force: bool = False) -> None:
        """Drive ``run_id`` while it is ready; return when it parks, waits for a human, ends, or is held elsewhere.

        ``force`` drives a running run once even while its awaited steps are unfinished: the parked node runs again
        and re-submits them, and the task records decide whether a message was lost and must be sent again (a step
        queued by a Ctrl-C'd embedded process). Submission is idempotent, so this is always safe.
        """
        # One owner per thread: two advance tasks of one run in one worker process must not both hold its lease.
        owner = f"{self.owner}:{threading.get_ident()}"
        run = self.runs.get(run_id)
        while (force and run.status == "running") or self.ready(run):
            if not self._acquire(run_id, owner, wait=force):
                return  # another process drives it; it re-checks readiness after releasing
            force = False
            try:
                with self._heartbeat(run_id, owner) as lost:
                    self._step(self.runs.get(run_id), owner, lost)
            finally:
                self.runs.release(run_id, owner)
            run = self.runs.get(run_id)

    def _acquire(self, run_id: str, owner: str, *, wait: bool) -> bool:
        """Take the run's lease, or take it over from a holder that is gone (a process of this machine that died,
        e.g. a Ctrl-C'd embedded run, whose lease has not lapsed yet). ``wait``: while a live holder keeps it, try
        again until a lease length has passed (a forced drive must not be dropped because a driver was just
        finishing); then leave the run to that holder, which re-checks readiness when it lets go."""
        deadline = time.monotonic() + (self.lease_s + 1 if wait else 0)
        while True:
            if self.runs.acquire(run_id, owner, self.lease_s):
                return True
            holder = self.runs.lease_holder(run_id)
            if holder and owner_gone(holder):
                logger.warning("run %s: its driver %s is gone; taking its lease over", run_id, holder)
                if self.runs.acquire(run_id, owner, self.lease_s, replacing=holder):
                    return True
            if time.monotonic() >= deadline:
                if wait:
                    logger.warning("run %s: driven by %s; leaving it to that driver", run_id, holder)
                return False
            time.sleep(0.2)

    def ready(self, run: RunInfo) -> bool:
        """Whether ``run`` can make progress now."""
        if run.status == "pending":
            return self.runs.blocking_run(run) is None
        if run.status != "running":
            return False  # finished, or waiting for a human
        if run.resume_value is not None:
            return True
        return self._finished_at(run) is not None

    def _finished_at(self, run: RunInfo) -> float | None:
        """When the first of the run's awaited tasks (or child runs) finished; None while none has.

        A run wakes at the first completion it awaits, whatever it waits for: a node that needs all of them
        (``await_tasks``) reads the records again and parks on the rest, one that moves each item on as soon as
        its own step finished (the refine loop) takes what finished. A run that awaits nothing (its driver died in
        the middle of a step) and a task with no record (its submission was lost with a process that died before
        it) are ready at once: advancing goes on from the last checkpoint and submits what is missing."""
        if not run.awaited:
            return run.updated_at
        ended = []
        for ref in run.awaited:
            if ref.startswith(RUN_REF):
                child = self.runs.get(ref[len(RUN_REF):])
                ended += [child.updated_at] if child.status in TERMINAL else []
                continue
            record = self.client.get(ref)
            if record is None:
                return run.updated_at
            if record.status in FINISHED:
                ended.append(record.updated_at or run.updated_at)
        return min(ended) if ended else None

    # One drive of the graph, from the last checkpoint to the next park.
    def _step(self, run: RunInfo, owner: str, lost: threading.Event) -> None:
        workflow = get_workflow(run.workflow)
        graph = self._graph(workflow)
        config = {"configurable": {"thread_id": run.thread_id}, "metadata": {"run_id": run.run_id}}
        # Every checkpoint write of this drive is fenced on the lease: a stalled driver that wakes after another
        # took the run over cannot add a checkpoint (which would fork the thread's history).
        fenced = {**config, "configurable": {**config["configurable"], LEASE_KEY: (run.run_id, owner)}}
        snapshot = graph.get_state(config)
        if (snapshot.metadata or {}).get("run_id") != run.run_id:
            command: Any = workflow.validate_input(run.input).model_dump(mode="json")
            if self.runs.update(run.run_id, unless_status=("running", *TERMINAL), owner=owner, status="running"):
                self._publish(run, "run", {"status": "running"})
        elif snapshot.interrupts:
            resume = {}
            for pending in snapshot.interrupts:
                if _kind(pending) == "approval":
                    if run.resume_value is not None:
                        resume[pending.id] = run.resume_value
                else:
                    resume[pending.id] = {"task_ids": pending.value.get("task_ids", [])}
            if not resume:
                return self._park(run, graph.get_state(config), owner)
            command = Command(resume=resume)
        elif not _ended(snapshot):
            command = None  # a driver died mid-step: continue from the last checkpoint
        else:
            return self._finish(run, "success", owner, ended=snapshot)
        context = self._context(run)
        try:
            for namespace, mode, chunk in graph.stream(command, fenced, context=context, durability="sync",
                                                        stream_mode=["tasks", "checkpoints"], subgraphs=True):
                if lost.is_set():  # another driver took the run over: it continues from the checkpoints
                    logger.warning("run %s: lease lost to another driver; this one stops", run.run_id)
                    return
                if mode == "tasks":
                    self._node_event(run, namespace, chunk)
                else:
                    self._checkpoint_event(run, namespace, chunk)
        except RunLeaseLost:
            logger.warning("run %s: lease lost to another driver; its checkpoint write was refused", run.run_id)
            return
        except Cancelled as error:
            return self._finish(run, "cancelled", owner, error)
        except DeadlineExceeded as error:
            return self._finish(run, "timeout", owner, error)
        except MGMFlowError as error:
            return self._finish(run, "error", owner, error)
        except Exception as error:  # a bug in a workflow: the run fails with its message, the driver lives on
            logger.exception("run %s failed", run.run_id)
            return self._finish(run, "error", owner, error)
        self._park(run, graph.get_state(config), owner)

    def _park(self, run: RunInfo, snapshot: Any, owner: str) -> None:
        """Record where the graph stopped: awaiting tasks (running), a human (interrupted), or the end."""
        approvals = [pending.value for pending in snapshot.interrupts if _kind(pending) == "approval"]
        awaited = [task_id for pending in snapshot.interrupts if _kind(pending) == "await"
                   for task_id in pending.value.get("task_ids", [])]
        if approvals:
            if self.runs.update(run.run_id, owner=owner, status="interrupted", interrupt=approvals, awaited=awaited,
                                resume_value=None):
                self._publish(run, "run", {"status": "interrupted", "interrupt": approvals})
        elif awaited:
            if self.runs.update(run.run_id, owner=owner, status="running", interrupt=None, awaited=awaited,
                                resume_value=None):
                faults.point("driver.parked", run_id=run.run_id, awaited=awaited)
        elif not _ended(snapshot):
            self.runs.update(run.run_id, owner=owner, status="running", awaited=[], resume_value=None)
        else:
            self._finish(run, "success", owner, ended=snapshot)

    def _finish(self, run: RunInfo, status: str, owner: str, error: BaseException | None = None, *,
                ended: Any = None) -> None:
        """Record the end (unless another driver holds the run now: it decides) and start what waited for it.
        ``ended``: the snapshot the run ended with (its outputs are read there)."""
        detail = None
        if error is not None:
            detail = {"code": getattr(error, "code", "internal"), "message": str(error) or type(error).__name__}
        checkpoint = ended.config["configurable"].get("checkpoint_id") if ended is not None else None
        if not self.runs.update(run.run_id, owner=owner, status=status, error=detail, awaited=[], interrupt=None,
                                resume_value=None, ended_checkpoint=checkpoint):
            return  # a stale driver: the one holding the run decides its end, and its steps are not ours to cancel
        self._publish(run, "run", {"status": status, **({"error": detail} if detail else {})})
        if status != "success":
            self.client.cancel(run.run_id)  # stop its other tasks
        self.start_next(run.thread_id)
        parent = (run.metadata or {}).get("parent_run_id")
        if parent:
            self.dispatch(parent)  # a parent awaiting its children (batch) checks them again; the sweeper backs this up

    def start_next(self, thread_id: str) -> None:
        """Runs on a thread are serial: start the next queued one."""
        following = self.runs.next_pending(thread_id)
        if following is not None:
            self.dispatch(following)

    def _node_event(self, run: RunInfo, namespace: tuple[str, ...], chunk: dict[str, Any]) -> None:
        """``node {name, phase, path, ns, task_id}``; an ended node adds its ``update`` (its writes), a failed one
        its ``error``: what the HTTP API's ``updates`` / ``debug`` / ``events`` stream modes are made of."""
        name = chunk.get("name", "")
        if name.startswith("__"):
            return
        if "input" in chunk:
            phase = "start"
        elif chunk.get("interrupts"):
            phase = "parked"
        else:
            phase = "error" if chunk.get("error") else "end"
        path = [part.split(":", 1)[0] for part in namespace]
        event = {"name": name, "phase": phase, "path": path, "ns": list(namespace), "task_id": chunk.get("id")}
        if phase == "end":
            event["update"] = _jsonable(chunk.get("result"))
        elif phase == "error":
            event["error"] = str(chunk["error"])
        self._publish(run, "node", event)

    def _checkpoint_event(self, run: RunInfo, namespace: tuple[str, ...], chunk: dict[str, Any]) -> None:
        """``checkpoint {ns, step, checkpoint_id, parent_checkpoint_id, values, next}`` after each step (the
        ``values`` / ``checkpoints`` stream modes); the empty one before the input is left out."""
        step = (chunk.get("metadata") or {}).get("step", -1)
        if step < 0:
            return
        parent = (chunk.get("parent_config") or {}).get("configurable", {})
        self._publish(run, "checkpoint", {
            "ns": list(namespace), "step": step, "checkpoint_id": chunk["config"]["configurable"]["checkpoint_id"],
            "parent_checkpoint_id": parent.get("checkpoint_id"), "values": _jsonable(chunk.get("values")),
            "next": list(chunk.get("next") or ())})

    def _publish(self, run: RunInfo, event_type: str, data: dict[str, Any]) -> None:
        self.client.publish(run.run_id, event_type, data)

    def _context(self, run: RunInfo) -> RunContext:
        return RunContext(run_id=run.run_id, thread_id=run.thread_id, scope=run.scope, settings=self.settings,
                          client=self.client, store=self.store, approve=run.approve, priority=run.priority,
                          workflow=run.workflow, previews=run.previews)

    def context_for(self, run: RunInfo) -> RunContext:
        """A :class:`RunContext` for code outside the graph (writing a workflow's output)."""
        return self._context(run)

    def graph(self, workflow_name: str) -> Any:
        return self._graph(get_workflow(workflow_name))

    def _graph(self, workflow: Any) -> Any:
        key = id(workflow)
        if key not in self._graphs:
            self._graphs[key] = workflow.build_graph().compile(checkpointer=self.database.saver)
        return self._graphs[key]

    @contextlib.contextmanager
    def _heartbeat(self, run_id: str, owner: str) -> Iterator[threading.Event]:
        """Renew the lease every third of it. The event yielded is set once a renewal fails: this driver was too slow
        (a stalled process), its lease expired and another driver took the run; this one must stop."""
        stop, lost = threading.Event(), threading.Event()

        def renew() -> None:
            held_until = time.monotonic() + self.lease_s
            while not stop.wait(self.lease_s / 3):
                try:
                    if not self.runs.renew(run_id, owner, self.lease_s):
                        lost.set()
                        return
                    held_until = time.monotonic() + self.lease_s
                except Exception:  # a database hiccup: retry until the lease would have lapsed, never die silently
                    logger.warning("run %s: cannot renew the lease", run_id, exc_info=True)
                    if time.monotonic() >= held_until:
                        lost.set()  # it may have been taken over by now: stop driving
                        return

        thread = threading.Thread(target=renew, name=f"lease-{run_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()

    def recover(self) -> list[str]:
        """Pick up every unfinished run nobody drives: its lease is free, lapsed or held by a process of this machine
        that is gone (an embedded server or CLI restarted on the same home). Each is driven once, forced, so that
        steps lost with the dead process are sent again at once. Once per process; returns their ids."""
        with self._sweeping:
            if self._recovered:
                return []
            self._recovered = True
        now = time.time()
        orphans = [run_id for run_id, holder, expires in self.runs.leases(("pending", "running"))
                   if holder is None or expires < now or owner_gone(holder)]
        for run_id in orphans:
            self.dispatch(run_id, force=True)
        if orphans:
            logger.info("picked up %d unfinished run(s): %s", len(orphans), ", ".join(orphans))
        return orphans

    # The sweeper.
    def sweep(self) -> list[str]:
        """Re-dispatch every idle run that could make progress; returns their ids.

        An idle run may only be waiting behind a backlog of messages, not lost. While the orchestration queue holds
        messages, a run is sent again only once it has been idle for SWEEP_BACKOFF_MAX_S (a backlog of N runs
        would otherwise cost N duplicate messages every sweep); then after SWEEP_GRACE_S. Each run that stays idle
        is sent again after twice as long as the time before (up to SWEEP_BACKOFF_MAX_S).
        """
        with self._sweeping:  # one sweep at a time: each run's backoff is read and set by one of them
            dispatched = self._sweep()
        if dispatched:
            logger.info("sweeper re-dispatched %d idle run(s): %s", len(dispatched), ", ".join(dispatched))
        return dispatched

    def _sweep(self) -> list[str]:
        dispatched, now, stale = [], time.time(), self.runs.stale(older_than=SWEEP_GRACE_S)
        self._resent = {run.run_id: self._resent[run.run_id] for run in stale if run.run_id in self._resent}
        grace = SWEEP_BACKOFF_MAX_S if stale and self._backlog() else SWEEP_GRACE_S
        for run in stale:
            times, not_before = self._resent.get(run.run_id, (0, 0.0))
            try:
                if now >= not_before and self.ready(run) and self._idle_since(run) < now - grace:
                    self.dispatch(run.run_id)
                    dispatched.append(run.run_id)
                    self._resent[run.run_id] = (times + 1, now + min(SWEEP_GRACE_S * 2 ** (times + 1),
                                                                      SWEEP_BACKOFF_MAX_S))
            except Exception:  # one broken run must not stop the sweep of the others
                logger.exception("sweeper: cannot re-dispatch run %s", run.run_id)
        return dispatched

    def _backlog(self) -> int:
        """Messages waiting in the orchestration queue (0 when the broker cannot tell)."""
        from mgmflow.workers.app import queue_depth

        try:
            return queue_depth(self.settings, QUEUE)
        except Exception:  # an unreachable broker: sweep as if idle (the re-dispatch fails the same way)
            logger.warning("sweeper: cannot read the %s queue's length", QUEUE, exc_info=True)
            return 0

    def _idle_since(self, run: RunInfo) -> float:
        """Since when ``run`` could have been advanced (its completion notice may still be in flight)."""
        if run.status == "running" and run.resume_value is None:
            return self._finished_at(run) or time.time()
        return run.updated_at

    def start_sweeper(self, interval: float = SWEEP_INTERVAL_S) -> None:
        """Sweep every ``interval`` seconds in a daemon thread (once per process)."""
        if self._sweeper is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception:
                    logger.exception("sweeper pass failed")

        self._sweeper = threading.Thread(target=loop, name="mgmflow-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()


def _ended(snapshot: Any) -> bool:
    """Whether the graph reached its end. Not merely an empty ``next``: a process that died after LangGraph saved a
    step's writes but before it saved the following checkpoint leaves a step whose tasks all finished (so none is
    ``next``) and whose successors never ran; streaming from there applies those writes and goes on."""
    return not snapshot.next and not snapshot.tasks


def _jsonable(value: Any) -> Any:
    """State as JSON (workflow state is JSON already; anything else, e.g. a ``Send``, as its text)."""
    return json.loads(json.dumps(value, default=str))


def _kind(pending: Any) -> str:
    value = pending.value if isinstance(pending.value, dict) else {}
    return value.get("kind", "approval")


_orchestrators: dict[str, Orchestrator] = {}
_orchestrators_lock = threading.Lock()


def get_orchestrator(settings: Any = None) -> Orchestrator:
    """The process's :class:`Orchestrator` for ``settings`` (default: from the environment)."""
    if settings is None:
        from mgmflow.workers.settings import get_settings

        settings = get_settings()
    key = settings.model_dump_json()
    with _orchestrators_lock:
        if key not in _orchestrators:
            _orchestrators[key] = Orchestrator(settings)
        return _orchestrators[key]


def register(app: Any, settings: Any) -> None:
    """Register the orchestration tasks on the workers' Celery app (idempotent; the first settings win)."""
    if ADVANCE in app.tasks:
        return

    @app.task(name=ADVANCE, ignore_result=True, acks_late=True)
    def advance(run_id: str, force: bool = False) -> None:
        _owner_of(run_id, settings).advance(run_id, force)

    @app.task(name=RESUME, ignore_result=True, acks_late=True)
    def resume(run_id: str, task_id: str | None = None) -> None:
        _owner_of(run_id, settings).advance(run_id)


def _owner_of(run_id: str, settings: Any) -> Orchestrator:
    """The orchestrator of this process whose database holds ``run_id`` (a process may serve several
    databases, e.g. SQLite and PostgreSQL; a worker process serves one)."""
    first = get_orchestrator(settings)
    with _orchestrators_lock:
        others = [orchestrator for orchestrator in _orchestrators.values() if orchestrator is not first]
    for orchestrator in (first, *others):
        try:
            orchestrator.runs.get(run_id)
            return orchestrator
        except Exception:  # not there, or a database this process no longer reaches: not the owner
            continue
    return first


def serve(settings: Any = None) -> Orchestrator:
    """In an orchestration worker process, before the worker starts: register the tasks, start the sweeper."""
    orchestrator = get_orchestrator(settings)
    orchestrator.start_sweeper()
    return orchestrator

