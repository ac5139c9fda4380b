"""Thread affinity: a conversation's next VLM turn prefers the worker that holds its KV prefix.

Each VLM worker also consumes a private queue (``vlm.<model>@<worker>``) and keeps a liveness key for it.
After a turn, Redis maps the thread to that queue (with a TTL); the client routes the next turn there while
the worker is alive, and to the shared queue otherwise. Embedded mode has one worker: nothing to route.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)


class Affinity:
    def __init__(self, redis=None, *, ttl_s: int = 600, alive_s: float = 10.0):
        self.redis, self.ttl_s, self.alive_s = redis, ttl_s, alive_s
        self.private_queues: dict[str, str] = {}  # shared queue → this worker's private queue

    def serve(self, shared_queue: str, worker_name: str) -> str:
        """Make this worker the home of threads it serves on ``shared_queue``; returns the private queue."""
        private = f"{shared_queue}@{worker_name}"
        self.private_queues[shared_queue] = private
        if self.redis is not None and len(self.private_queues) == 1:
            threading.Thread(target=self._beat, name="affinity-alive", daemon=True).start()
        return private

    def remember(self, thread_id: str, shared_queue: str) -> None:
        private = self.private_queues.get(shared_queue)
        if self.redis is not None and private is not None:
            self.redis.set(f"mgmflow:affinity:{thread_id}", private, ex=self.ttl_s)

    def route(self, thread_id: str | None, shared_queue: str) -> str:
        if self.redis is None or not thread_id:
            return shared_queue
        private = self.redis.get(f"mgmflow:affinity:{thread_id}")
        if private and private.startswith(f"{shared_queue}@") and self.redis.exists(f"mgmflow:alive:{private}"):
            return private
        return shared_queue

    def _beat(self) -> None:
        while True:
            try:
                for private in list(self.private_queues.values()):
                    self.redis.set(f"mgmflow:alive:{private}", "1", px=int(self.alive_s * 1000))
            except Exception:  # noqa: BLE001 — Redis restarting: the thread falls back to the shared queue
                logger.warning("could not refresh the affinity liveness key", exc_info=True)
            time.sleep(self.alive_s / 3)
