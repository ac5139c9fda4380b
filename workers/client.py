"""``TaskClient``: the one way to dispatch steps to workers and follow them, embedded or distributed.

    client = TaskClient(settings)
    client.submit("diffusion.text2img", {"prompts": ["a red fox"], "seeds": [7]},
                  task_id=f"{run_id}:draw:0", run_id=run_id, scope="user-1")
    record = client.wait(f"{run_id}:draw:0", timeout=60)   # TaskRecord(status="done", result={...})

``submit`` is idempotent per task id: a finished step is not sent again, a running one is left alone.
"""

from __future__ import annotations

import json
import threading
import time

from mgmflow.models.errors import InvalidInputError
from mgmflow.workers.affinity import Affinity
from mgmflow.workers.app import default_model, get_app, queue_for
from mgmflow.workers.artifacts import ArtifactStore, open_store
from mgmflow.workers.events import Event, open_events
from mgmflow.workers import faults
from mgmflow.workers.records import StepHeader, TaskRecord, open_records, redis_client
from mgmflow.workers.settings import Settings, get_settings
from mgmflow.workers.steps import STEPS
from mgmflow.workers.watch import LOST_AFTER_S

MAX_PAYLOAD_BYTES = 4096
_sent_here: set[str] = set()  # embedded: steps this process has sent
_sent_lock = threading.Lock()  # images and long texts travel as artifact ids, never through the broker

__all__ = ["Event", "TaskClient", "TaskRecord", "MAX_PAYLOAD_BYTES"]


class TaskClient:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or get_settings()
        self.app = get_app(self.settings)
        self.records = open_records(self.settings)
        self._events = open_events(self.settings)
        self.affinity = Affinity(None if self.settings.embedded else redis_client(self.settings.records_url))
        self._store: ArtifactStore | None = None
        self._embedded = None
        if self.settings.embedded:
            from mgmflow.workers.embedded import ensure_embedded

            self._embedded = ensure_embedded(self.settings)

    @property
    def store(self) -> ArtifactStore:
        if self._store is None:
            self._store = open_store(self.settings)
        return self._store

    def submit(self, kind: str, payload: dict, *, task_id: str, run_id: str, scope: str, priority: int = 5,
               notify: tuple[str, dict] | None = None, deadline: float | None = None) -> None:
        """Dispatch step ``kind`` once per ``task_id``. ``priority``: 0 is the most urgent, 9 the least.

        ``notify=(task name, kwargs)``: when the step ends (any outcome) the worker sends that Celery task with
        ``kwargs | {"task_id": task_id}``, at least once. ``deadline``: epoch seconds after which the step stops
        at its next check and ends ``timed_out``.
        """
        known = STEPS.keys() | {name for name in self.app.tasks if not name.startswith("celery.")}
        if kind not in known:
            raise InvalidInputError(f"unknown task kind {kind!r}; known: {', '.join(sorted(STEPS))}")
        if not isinstance(payload, dict):
            raise InvalidInputError(f"a payload is a JSON object, got {type(payload).__name__}")
        if not 0 <= priority <= 9:
            raise InvalidInputError(f"priority must be in [0, 9], got {priority}")
        model = payload.get("model") or default_model(self.settings, kind)
        if model is not None:
            payload = {**payload, "model": model}
        header = StepHeader(task_id, kind, run_id, scope, list(notify) if notify else None, deadline)
        body = {"header": header.to_dict(), "payload": payload}
        size = len(json.dumps(body))
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidInputError(f"the step message is {size} bytes; the limit is {MAX_PAYLOAD_BYTES}: "
                                    "put images and long texts in the artifact store and pass their ids")
        # The record keeps the message (to its model's public queue) for the watcher, which sends it again if it
        # is lost on the way or its worker is gone (workers.watch).
        message = {"body": body, "queue": self._public_queue(kind, model), "priority": priority}
        if not self.records.register(header, resend_after_s=self._resend_after(task_id), message=message,
                                     watch_after_s=LOST_AFTER_S):
            return
        if self._embedded is not None:
            self._embedded.refresh()
        faults.point("submit.registered", task_id=task_id)  # a process dying here leaves a record, no message
        self.app.send_task(kind, kwargs=body, task_id=task_id, queue=self._queue(kind, model, payload),
                           priority=priority)

    def _resend_after(self, task_id: str) -> float:
        """How long a queued step's message is trusted to be on its way before a re-submit sends a copy.

        Embedded, the in-memory queue dies with the process: a step queued by an earlier process (a Ctrl-C'd run)
        is sent again at once; one this process sent is trusted. Distributed, the broker keeps messages."""
        if not self.settings.embedded:
            return self.settings.visibility_timeout
        with _sent_lock:
            fresh = task_id not in _sent_here
            _sent_here.add(task_id)
        return 0.0 if fresh else float("inf")

    def _public_queue(self, kind: str, model: str | None) -> str:
        if self.settings.embedded:  # one worker serves the default queues and loads any model on demand
            return queue_for(kind, default_model(self.settings, kind))
        return queue_for(kind, model)

    def _queue(self, kind: str, model: str | None, payload: dict) -> str:
        queue = self._public_queue(kind, model)
        if kind == "vlm.chat" and not self.settings.embedded:
            return self.affinity.route(payload.get("thread_id"), queue)
        return queue

    def get(self, task_id: str) -> TaskRecord | None:
        return self.records.get(task_id)

    def wait(self, task_id: str, timeout: float) -> TaskRecord:
        """The step's final record. Raises ``TimeoutError`` if it is not final within ``timeout`` seconds,
        ``KeyError`` if no such step was ever submitted."""
        record = self.records.wait(task_id, timeout)
        if record is None:
            raise KeyError(f"no task {task_id!r}")
        if not record.final:
            raise TimeoutError(f"task {task_id!r} is still {record.status} after {timeout:g} s")
        return record

    def cancel(self, run_id: str) -> None:
        """Stop every step of the run: queued ones at once, running ones at their next step or token."""
        self.records.cancel_run(run_id)

    def cancel_task(self, task_id: str) -> None:
        self.records.cancel_task(task_id)

    def events(self, run_id: str, after: str | None = None, block_ms: int = 0) -> list[Event]:
        return self._events.read(run_id, after, block_ms)

    def publish(self, run_id: str, type: str, data: dict) -> str:
        return self._events.publish(run_id, type, data)

    def delete_run(self, run_id: str) -> None:
        """Forget a finished run's records and events (they otherwise expire with their TTLs)."""
        self.records.delete_run(run_id)
        self._events.delete(run_id)

    def wait_for_event(self, run_id: str, predicate, timeout: float, after: str | None = None) -> Event:
        """The first event of the run (after ``after``) that satisfies ``predicate``; ``TimeoutError`` otherwise."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            for event in self.events(run_id, after, block_ms=int(min(left, 1.0) * 1000) or 1):
                after = event.id
                if predicate(event):
                    return event
        raise TimeoutError(f"no matching event of run {run_id!r} within {timeout:g} s")
