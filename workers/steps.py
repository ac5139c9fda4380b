"""The life of one step inside a worker, shared by every task kind.

A task module declares ``@step("diffusion.text2img", Text2ImgInput)`` over a plain handler
``handler(ctx, data) -> dict``; this module turns it into a Celery task that:

1. takes the step's record under a lease (or waits for the live copy, or returns the stored outcome, or
   quarantines a step that keeps killing its workers);
2. validates the payload, then runs the handler with a ``StepContext`` (artifacts, progress, cooperative
   ``check()`` for cancel and deadline);
3. records the outcome — done, failed (typed error), cancelled, timed out — or retries an out-of-memory
   error later; then sends the caller's completion task (``notify``).
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import shared_task
from pydantic import BaseModel, ValidationError

from mgmflow.models.errors import Cancelled, DeadlineExceeded, MGMFlowError, ResourceExhaustedError
from mgmflow.workers import faults
from mgmflow.workers import records as rec
from mgmflow.workers.affinity import Affinity
from mgmflow.workers.artifacts import ArtifactStore, open_store
from mgmflow.workers.batching import Batcher
from mgmflow.workers.events import open_events
from mgmflow.workers.model_cache import ModelCache
from mgmflow.workers.settings import Settings
from mgmflow.workers.watch import StepWatcher

logger = logging.getLogger(__name__)

# kind → payload model, for every step task this process knows.
STEPS: dict[str, type[BaseModel]] = {}
CANCEL_POLL_S = 0.2  # how often check() asks the store for a cancel flag; deadlines are checked every call


class LeaseLost(Exception):
    """Another worker took this step over (our lease lapsed): stop without recording anything."""


class LeaseKeeper:
    """One thread per worker renews the leases of every step it runs, every third of the lease."""

    def __init__(self, records, lease_s: float):
        self.records, self.lease_s = records, lease_s
        self._held: dict[str, str] = {}  # task id → owner
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, name="lease-keeper", daemon=True).start()

    def hold(self, task_id: str, owner: str) -> None:
        with self._lock:
            self._held[task_id] = owner
            self._lost.discard(owner)

    def drop(self, task_id: str) -> None:
        with self._lock:
            self._held.pop(task_id, None)

    def _holds(self, task_id: str, owner: str) -> bool:
        """Still running here (not finished and dropped since the renewal began)."""
        with self._lock:
            return self._held.get(task_id) == owner

    def lost(self, owner: str) -> bool:
        return owner in self._lost

    def _loop(self) -> None:
        while True:
            time.sleep(self.lease_s / 3)
            with self._lock:
                held = list(self._held.items())
            for task_id, owner in held:
                try:
                    if not self.records.renew(task_id, owner, self.lease_s) and self._holds(task_id, owner):
                        logger.warning("lost the lease of step %s; another worker has taken it over", task_id)
                        self._lost.add(owner)
                except Exception:  # noqa: BLE001 — a store hiccup; the next round retries before the lease lapses
                    logger.warning("could not renew the lease of step %s", task_id, exc_info=True)


@dataclass
class Runtime:
    """What step handlers use in this process: records, events, artifacts, models and their batchers."""

    settings: Settings
    records: Any
    events: Any
    store: ArtifactStore
    models: ModelCache
    leases: LeaseKeeper
    affinity: Affinity
    watcher: StepWatcher
    batchers: dict[tuple, Batcher] = field(default_factory=dict)
    # Set when this process exits mid-step (Ctrl-C of an embedded run): steps stop at their next check without
    # recording anything, so that the next run takes them over instead of finding them cancelled.
    abandoning: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, settings: Settings) -> Runtime:
        records = rec.open_records(settings)
        affinity = Affinity(None if settings.embedded else rec.redis_client(settings.records_url),
                            ttl_s=settings.affinity_ttl_s, alive_s=settings.lease_s)
        return cls(settings=settings, records=records, events=open_events(settings), store=open_store(settings),
                   models=ModelCache.from_settings(settings), leases=LeaseKeeper(records, settings.lease_s),
                   affinity=affinity, watcher=StepWatcher(records, settings).start())

    def batcher(self, key: tuple, run: Callable, *, max_size: int, mix_keys: bool = False,
                wait_share: float = 0.0) -> Batcher:
        """The batcher for ``key`` (e.g. ("vlm.chat", model)), created on first use."""
        with self._lock:
            if key not in self.batchers:
                self.batchers[key] = Batcher(run, max_size=max_size, window_s=self.settings.batch_window_ms / 1000,
                                             mix_keys=mix_keys, wait_share=wait_share, name=f"batcher-{'-'.join(map(str, key))}")
            return self.batchers[key]


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("no worker runtime in this process: start one with workers.steps.start_runtime()")
    return _runtime


def start_runtime(settings: Settings) -> Runtime:
    """Create this process's worker runtime (once; later calls return the same one)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime.create(settings)
        return _runtime


@dataclass
class StepContext:
    """Given to handlers: the step's identity, the store scoped to it, progress and the cooperative check."""

    header: rec.StepHeader
    owner: str
    runtime: Runtime
    _next_cancel_poll: float = 0.0

    @property
    def scope(self) -> str:
        return self.header.scope

    def check(self) -> None:
        """Raise to stop between steps/tokens: Cancelled, DeadlineExceeded, or LeaseLost."""
        if self.header.deadline is not None and time.time() > self.header.deadline:
            raise DeadlineExceeded("the step's deadline passed")
        if self.runtime.leases.lost(self.owner) or self.runtime.abandoning.is_set():
            raise LeaseLost()
        now = time.monotonic()
        if now >= self._next_cancel_poll:
            self._next_cancel_poll = now + CANCEL_POLL_S
            if self.runtime.records.is_cancelled(self.header.run_id, self.header.task_id):
                raise Cancelled("cancelled by request")

    def publish(self, type: str, data: dict) -> None:
        self.runtime.events.publish(self.header.run_id, type, {"task_id": self.header.task_id, **data})

    def on_step(self, step: int, total: int, preview=None) -> None:
        """Publish a step; a preview (PIL image) is stored, short-lived, and its artifact id published."""
        data = {"step": step, "total": total}
        if preview is not None:
            buffer = io.BytesIO()
            preview.save(buffer, "PNG")
            data["preview"] = self.runtime.store.put(
                buffer.getvalue(), scope=self.scope, media_type="image/png",
                retention_s=self.runtime.settings.events_ttl_s,
                metadata={"preview": True, "step": step, "task_id": self.header.task_id}).id
        self.publish("task.step", data)

    def on_token(self, text: str) -> None:
        self.publish("task.token", {"text": text})

    def read_artifact(self, artifact_id: str) -> bytes:
        return self.runtime.store.get(artifact_id, scope=self.scope)

    def put_artifact(self, data: bytes, *, media_type: str, metadata: dict) -> str:
        metadata = {**metadata, "run_id": self.header.run_id, "task_id": self.header.task_id}
        return self.runtime.store.put(data, scope=self.scope, media_type=media_type, metadata=metadata).id


def error_of(error: BaseException) -> dict:
    return {"code": getattr(error, "code", "error"), "message": str(error) or type(error).__name__,
            "retryable": bool(getattr(error, "retryable", False))}


def _outcome(error: BaseException) -> tuple[str, dict]:
    if isinstance(error, Cancelled):
        return rec.CANCELLED, error_of(error)
    if isinstance(error, DeadlineExceeded):
        return rec.TIMED_OUT, error_of(error)
    if isinstance(error, ValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'payload'}: {e['msg']}" for e in error.errors())
        return rec.FAILED, {"code": "invalid_input", "message": f"invalid payload: {problems}", "retryable": False}
    if isinstance(error, MGMFlowError):
        return rec.FAILED, error_of(error)
    logger.exception("step failed with an unexpected error")
    return rec.FAILED, {"code": "internal", "message": f"{type(error).__name__}: {error}", "retryable": False}


def _notify(task, header: rec.StepHeader) -> None:
    if header.notify:
        name, kwargs = header.notify
        # Our app, not ``task.app``: a shared task's bound ``self`` may belong to Celery's default app, whose
        # broker and routes are not ours (the notice would be lost).
        from mgmflow.workers.app import get_app

        get_app(get_runtime().settings).send_task(name, kwargs={**kwargs, "task_id": header.task_id})


def _acquire(runtime: Runtime, header: rec.StepHeader, owner: str) -> str:
    """Take the step, or wait while another worker holds a live lease on it."""
    settings = runtime.settings
    while True:
        outcome, deliveries = runtime.records.acquire(header, owner, lease_s=settings.lease_s,
                                                      max_deliveries=settings.max_deliveries)
        if outcome != rec.BUSY:
            if outcome == rec.QUARANTINED:
                logger.error("step %s quarantined after %d deliveries", header.task_id, deliveries - 1)
            return outcome
        runtime.records.wait(header.task_id, timeout=settings.lease_s)


def execute(task, handler: Callable, payload_model: type[BaseModel], header: rec.StepHeader, payload: dict) -> None:
    runtime = get_runtime()
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    outcome = _acquire(runtime, header, owner)
    if outcome != rec.ACQUIRED:  # already finished (or quarantined now): the caller may still await notice
        if outcome == rec.QUARANTINED:
            runtime.events.publish(header.run_id, "task.finished",
                                   {"task_id": header.task_id, "kind": header.kind, "status": rec.QUARANTINED})
        _notify(task, header)
        return
    runtime.leases.hold(header.task_id, owner)
    faults.point("step.acquired", task_id=header.task_id)
    ctx = StepContext(header, owner, runtime)
    result, error = None, None
    try:
        ctx.check()
        # A stall since acquiring may have cost the lease (the step is someone else's now): counted only if not.
        if not runtime.records.start(header.task_id, owner, runtime.settings.lease_s):
            raise LeaseLost()
        ctx.publish("task.started", {"kind": header.kind, "owner": owner})
        result = handler(ctx, payload_model.model_validate(payload))
        status = rec.DONE
    except LeaseLost:
        return
    except ResourceExhaustedError as oom:
        retries = task.request.retries
        if retries < runtime.settings.oom_retries:
            runtime.records.release(header.task_id, owner)
            raise task.retry(exc=oom, countdown=runtime.settings.oom_backoff_s * 2**retries,
                             max_retries=runtime.settings.oom_retries) from oom
        status, error = rec.FAILED, error_of(oom)
    except Exception as failure:  # noqa: BLE001 — every failure becomes the step's typed outcome
        status, error = _outcome(failure)
    finally:
        runtime.leases.drop(header.task_id)
    if runtime.records.finish(header.task_id, owner, status, result=result, error=error) != "ok":
        return  # another worker took the step over and records its outcome
    ctx.publish("task.finished", {"kind": header.kind, "status": status})
    faults.point("step.finished", task_id=header.task_id)
    _notify(task, header)


def step(kind: str, payload_model: type[BaseModel]) -> Callable:
    """Declare ``handler(ctx, data) -> dict`` as the step task ``kind``."""

    def register(handler: Callable) -> Callable:
        def run(self, header: dict, payload: dict) -> None:
            execute(self, handler, payload_model, rec.StepHeader(**header), payload)

        run.__name__ = run.__qualname__ = handler.__name__
        run.__module__ = handler.__module__
        shared_task(name=kind, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)(run)
        STEPS[kind] = payload_model
        return handler

    return register
