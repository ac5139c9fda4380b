"""Sending ``orchestrator.advance`` messages: many per broker round trip, off the caller's path.

A run's record is committed before its run is dispatched, so the message is only a wake-up call and its sender
need not wait for it. One thread per process publishes whatever queued up during its previous round trip as one
batch (kombu's producer batch: a Redis pipeline), so that under load a message costs a fraction of a round trip
and of kombu's per-publish set-up (it builds a Redis client per publish, ~0.3 ms of CPU). A message lost with its
process (killed between the commit and the publish) is sent again by the orchestrator's sweeper.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from typing import Any

logger = logging.getLogger(__name__)

MAX_BATCH = 500


class Dispatcher:
    """Publishes ``task_name`` messages to ``queue_name`` from a background thread, in batches."""

    def __init__(self, app: Any, task_name: str, queue_name: str) -> None:
        self.app, self.task_name, self.queue_name = app, task_name, queue_name
        self._start()
        os.register_at_fork(after_in_child=self._start)  # a forked child has no copy of the thread
        atexit.register(self.flush)  # a short-lived process (the CLI) sends what it queued before it exits

    def _start(self) -> None:
        self._pending: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._unsent = 0
        threading.Thread(target=self._publish_forever, name="mgmflow-dispatch", daemon=True).start()

    def send(self, kwargs: dict[str, Any]) -> None:
        """Queue one message; it is published within a round trip."""
        with self._idle:
            self._unsent += 1
        self._pending.put(kwargs)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued message is published (or given up on); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._unsent == 0, timeout)

    def _publish_forever(self) -> None:
        while True:
            batch = [self._pending.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            try:
                self._publish(batch)
            except Exception:  # the broker is unreachable: the sweeper sends these again once it is back
                logger.exception("could not publish %d %s message(s)", len(batch), self.task_name)
            with self._idle:
                self._unsent -= len(batch)
                self._idle.notify_all()

    def _publish(self, batch: list[dict[str, Any]]) -> None:
        with self.app.producer_or_acquire() as producer, producer.batch(max_size=MAX_BATCH):
            for kwargs in batch:
                # argsrepr/kwargsrepr: Celery's saferepr of the arguments costs ~0.15 ms a message; monitors see
                # the run id in the kwargs anyway.
                self.app.send_task(self.task_name, kwargs=kwargs, queue=self.queue_name, producer=producer,
                                   argsrepr="", kwargsrepr=repr(kwargs))
