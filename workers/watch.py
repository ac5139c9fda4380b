"""The step watcher: every unfinished step is looked at until it ends, and sent again when it cannot end alone.

A step cannot end alone when its message is gone: the process that recorded it died before publishing, or the
broker handed it to a worker that died (it then waits in the broker's unacked set for the visibility timeout,
an hour with real models). Or when its worker stopped (killed, or stalled past its lease). The watcher, a thread
in every worker process (embedded too), claims the steps that are due (one process looks at each) and sends a
copy of the message their record keeps when

- the step is queued, has waited ``LOST_AFTER_S`` and its queue is empty (nothing is in front of it: the message
  is lost), or has waited ``BACKLOG_AFTER_S`` whatever the queue holds (it may sit in a dead worker's unacked set);
- the step is running and its lease lapsed (a killed or stalled worker; the copy takes it over, see
  ``mgmflow.workers.records``: a stalled worker that wakes stops, or finishes first and the copy returns its outcome).

Copies are harmless (records make each step run once, and a copy of a finished step only repeats its notice), so
the watcher errs towards sending; each step that stays stuck waits twice as long before its next copy.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mgmflow.workers import records as rec

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 2.0
LOST_AFTER_S = 10.0  # queued this long with nothing in front of it: its message is lost
BACKLOG_AFTER_S = 60.0  # queued this long behind others: a copy anyway (it may be in a dead worker's hands)
MAX_BACKOFF_S = 600.0
BATCH = 200  # steps looked at per claim


class StepWatcher:
    def __init__(self, records: Any, settings: Any):
        self.records, self.settings = records, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="step-watcher", daemon=True)

    def start(self) -> StepWatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                self.watch()
            except Exception:  # a store or broker hiccup: the next pass tries again
                logger.warning("step watcher: pass failed", exc_info=True)

    def watch(self) -> list[str]:
        """One pass: look at every due step; returns the ids of those sent again."""
        resent = []
        while due := self.records.watch_due(limit=BATCH, recheck_s=LOST_AFTER_S):
            depths: dict[str, int] = {}
            resent += [task_id for task_id in due if self._look(task_id, depths)]
            if len(due) < BATCH:
                break
        return resent

    def _look(self, task_id: str, depths: dict[str, int]) -> bool:
        record, message = self.records.get(task_id), self.records.message(task_id)
        if record is None or record.final or message is None:  # (no message: recorded by an older release)
            self.records.unwatch(task_id)
            return False
        now = time.time()
        if record.status == rec.RUNNING:
            if self.records.lease_held(task_id):
                self.records.watch_later(task_id, now + self.settings.lease_s)
                return False
            why = f"its worker's lease lapsed ({record.owner})"
        else:
            waited = now - record.updated_at
            if waited < LOST_AFTER_S:
                self.records.watch_later(task_id, record.updated_at + LOST_AFTER_S)
                return False
            if waited < BACKLOG_AFTER_S and self._depth(message["queue"], depths):
                self.records.watch_later(task_id, min(now + LOST_AFTER_S, record.updated_at + BACKLOG_AFTER_S))
                return False
            why = f"queued {waited:.0f} s with no worker on it"
        logger.warning("step %s: %s; sending it again", task_id, why)
        self._send(record.kind, task_id, message)
        self.records.resent(task_id, next_check=now + min(LOST_AFTER_S * 2 ** (record.resends + 1), MAX_BACKOFF_S))
        return True

    def _send(self, kind: str, task_id: str, message: dict) -> None:
        from mgmflow.workers.app import get_app

        get_app(self.settings).send_task(kind, kwargs=message["body"], task_id=task_id, queue=message["queue"],
                                         priority=message["priority"])

    def _depth(self, queue: str, depths: dict[str, int]) -> int:
        """Messages waiting in ``queue``, read once per pass (0 when the broker cannot tell: a copy is harmless)."""
        if queue not in depths:
            from mgmflow.workers.app import queue_depth

            try:
                depths[queue] = queue_depth(self.settings, queue)
            except Exception:  # an unreachable broker: sending fails the same way, and is tried again later
                depths[queue] = 0
        return depths[queue]
