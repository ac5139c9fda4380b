"""Embedded mode: with no broker configured, the same tasks run on an in-process Celery worker.

The app's broker is Celery's in-memory transport; a ``WorkController`` with a thread pool consumes the same
queues a deployment's workers would, and runs the same step code (records in SQLite, events in memory), so
the main job needs no Redis and still exercises the whole dispatch, wait and resume path.
"""

from __future__ import annotations

import atexit
import logging
import socket
import threading

from celery.worker import WorkController

from mgmflow.workers.app import get_app
from mgmflow.workers.settings import MODEL_FAMILIES, ORCHESTRATOR_QUEUE, Settings
from mgmflow.workers.steps import STEPS, start_runtime

logger = logging.getLogger(__name__)


def embedded_queues(settings: Settings) -> list[str]:
    """The default model queues, the orchestrator's, and those of other step families imported so far."""
    models = {"vlm": [settings.vlm_model], "diffusion": [settings.diffusion_model],
              "edit": [settings.edit_model, settings.instruct_model]}
    others = sorted({kind.partition(".")[0] for kind in STEPS} - set(MODEL_FAMILIES))
    return [*dict.fromkeys(f"{family}.{m}" for family, names in models.items() for m in names), ORCHESTRATOR_QUEUE,
            *others]


class _Controller(WorkController):
    def __init__(self, *args, **kwargs):
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer):
        super().on_consumer_ready(consumer)
        self.ready.set()


class EmbeddedWorker:
    """One in-process worker thread pool serving every queue of ``settings``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = get_app(settings)
        # Celery's pool threads look tasks up on the process's default app: make it ours, or a default app
        # created by anything else in the process (e.g. evaluating a shared_task proxy) would receive them.
        self.app.set_default()
        self.runtime = start_runtime(settings)
        self.queues = embedded_queues(settings)
        self.controller = _Controller(
            app=self.app, hostname=f"embedded@{socket.gethostname()}", pool="threads",
            concurrency=settings.embedded_concurrency, queues=self.queues, loglevel="WARNING",
            without_heartbeat=True, without_mingle=True, without_gossip=True)
        self._thread = threading.Thread(target=self.controller.start, name="mgmflow-embedded-worker", daemon=True)
        self._thread.start()
        if not self.controller.ready.wait(30):
            raise RuntimeError("the embedded worker did not start within 30 s")
        logger.info("embedded worker serving %s", ", ".join(self.queues))

    def refresh(self) -> None:
        """Let the running consumer accept tasks registered after it started (e.g. the orchestrator's)."""
        consumer = self.controller.consumer
        if consumer is not None and not set(self.app.tasks) <= set(consumer.strategies):
            consumer.update_strategies()

    def stop(self) -> None:
        """Stop at exit: running steps are abandoned at their next check (the next run takes them over)."""
        self.runtime.abandoning.set()
        self.controller.stop(in_sighandler=False)
        self._thread.join(10)


_embedded: EmbeddedWorker | None = None
_lock = threading.Lock()


def ensure_embedded(settings: Settings) -> EmbeddedWorker:
    """Start this process's embedded worker once; later calls (any settings) share it."""
    global _embedded
    with _lock:
        if _embedded is None:
            _embedded = EmbeddedWorker(settings)
            # The pool's threads are joined at interpreter exit before ``atexit`` runs, so a Ctrl-C would wait
            # for the running steps to end; this hook (the one concurrent.futures itself uses) runs first.
            getattr(threading, "_register_atexit", atexit.register)(_embedded.stop)
        return _embedded
