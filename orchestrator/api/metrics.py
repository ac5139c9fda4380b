"""Prometheus metrics of one app, in its own registry (several apps may live in one test process).

With several API processes (``mgmflow serve --workers N``) prometheus_client's multiprocess mode is on
(``PROMETHEUS_MULTIPROC_DIR``): each process writes its samples to files there and a scrape, whichever process
answers it, adds them up. Run latencies are observed at scrape time from the records of the runs that ended since the
previous scrape (a watermark); the window of run ends a scrape counts is then claimed in Redis, so that each run is
counted by one process only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.core import GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ApiMetrics:
    """HTTP traffic, run and task latencies, errors; queue depths are read from the broker at scrape time."""

    WATERMARK_KEY = "mgmflow:metrics:runs-counted-until"

    def __init__(self, queue_depths: Callable[[], dict[str, int]] | None = None, broker_url: str | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("mgmflow_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.request_seconds = Histogram("mgmflow_http_request_seconds", "HTTP request latency", ["route"],
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
        self.run_seconds = Histogram("mgmflow_run_seconds", "Run latency from submission to its end",
                                     ["workflow", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.task_seconds = Histogram("mgmflow_task_seconds", "Model task latency (start to end) per queue",
                                      ["queue", "kind", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.errors = Counter("mgmflow_errors", "Errors by kind", ["kind"], registry=self.registry)
        self._queue_depths = None if queue_depths is None else _QueueDepthCollector(queue_depths)
        if self._queue_depths is not None:
            self.registry.register(self._queue_depths)
        self._watermark = time.time()  # runs that ended before this process started are not ours to count
        self._shared = None  # the Redis holding the shared watermark, in multiprocess mode
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and broker_url:
            import redis

            self._shared = redis.Redis.from_url(broker_url, socket_timeout=2, socket_connect_timeout=2)

    def scrape(self, runs) -> bytes:
        """The exposition text: every process's samples in multiprocess mode, this app's otherwise."""
        self.observe_finished_runs(runs)
        if self._shared is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        if self._queue_depths is not None:
            registry.register(self._queue_depths)
        return generate_latest(registry)

    def observe_task(self, kind: str, status: str, seconds: float) -> None:
        self.task_seconds.labels(kind.partition(".")[0], kind, status).observe(max(seconds, 0.0))

    def observe_finished_runs(self, runs, limit: int = 1000) -> None:
        """Count runs that ended since the last scrape (from their records, wherever they ran) and their model
        tasks (from the task.started / task.finished events; an event id starts with its time in ms). The cost
        follows the runs that ended meanwhile, not the runs stored: one index range read past a watermark."""
        since, until = self._claim_window()
        newest = since
        for run_id, workflow, status, created_at, updated_at in runs.runs.ended_between(since, until, limit=limit):
            newest = max(newest, updated_at)
            self.run_seconds.labels(workflow, status).observe(max(updated_at - created_at, 0.0))
            if status == "error":
                self.errors.labels("run_error").inc()
            self._observe_tasks(runs, run_id)
        if self._shared is None:
            self._watermark = newest

    def _claim_window(self) -> tuple[float, float]:
        """(after, up to) the run end times this scrape counts: since this process's last count, or in
        multiprocess mode since any process's (claimed atomically, so that no two processes count a run)."""
        if self._shared is None:
            return self._watermark, float("inf")
        now = time.time()
        previous = self._shared.getset(self.WATERMARK_KEY, repr(now))
        return (float(previous) if previous else self._watermark), now

    def _observe_tasks(self, runs, run_id: str) -> None:
        started: dict[str, int] = {}
        for event in runs.all_events(run_id):
            at_ms = int(event.id.partition("-")[0])
            if event.type == "task.started":
                started[event.data["task_id"]] = at_ms
            elif event.type == "task.finished" and event.data.get("task_id") in started:
                seconds = (at_ms - started.pop(event.data["task_id"])) / 1000
                self.observe_task(event.data.get("kind", "unknown"), event.data.get("status", "unknown"), seconds)


class _QueueDepthCollector:
    def __init__(self, queue_depths: Callable[[], dict[str, int]]):
        self.queue_depths = queue_depths

    def collect(self):
        family = GaugeMetricFamily("mgmflow_queue_depth", "Tasks waiting in each queue", labels=["queue"])
        try:
            depths = self.queue_depths()
        except Exception:  # a scrape must not fail because the broker is away; /readyz reports that
            logger.warning("cannot read queue depths", exc_info=True)
            depths = {}
        for queue, depth in sorted(depths.items()):
            family.add_metric([queue], depth)
        yield family


class MetricsMiddleware:
    """Counts every request by route template (not raw path, so ids do not explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
            if status >= 500:
                self.metrics.errors.labels("http_5xx").inc()


class BrokerQueueDepths:
    """Tasks waiting per Celery queue, read from the Redis broker: the queues are found from kombu's binding
    sets, each queue being one list per priority step (``name``, ``name\\x06\\x163``, ...)."""

    SEPARATOR = "\x06\x16"

    def __init__(self, broker_url: str | None):
        self.broker_url = broker_url
        self._redis = None

    def __call__(self) -> dict[str, int]:
        if not self.broker_url or not self.broker_url.startswith(("redis://", "rediss://")):
            return {}
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.broker_url, socket_timeout=2, socket_connect_timeout=2)
        queues: set[str] = set()
        for key in self._redis.scan_iter(match="_kombu.binding.*", count=100):
            for member in self._redis.smembers(key):
                queue = member.decode().split(self.SEPARATOR)[-1]
                if queue and not queue.endswith(".pidbox") and "celeryev" not in queue:
                    queues.add(queue)
        pipe = self._redis.pipeline(transaction=False)
        keys = [(queue, key) for queue in sorted(queues)
                for key in [queue, *(f"{queue}{self.SEPARATOR}{step}" for step in range(1, 10))]]
        for _, key in keys:
            pipe.llen(key)
        depths: dict[str, int] = dict.fromkeys(queues, 0)
        for (queue, _), length in zip(keys, pipe.execute()):
            depths[queue] += length
        return depths
