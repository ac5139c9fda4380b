"""Per-run event streams: progress (diffusion steps, generated tokens), task outcomes, and whatever the
orchestrator publishes. A client resumes from the last event id it saw.

Distributed: one capped Redis stream per run with a TTL. Embedded: the same interface in memory.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Event:
    id: str  # "<milliseconds>-<sequence>", ordered; pass it back as ``after`` to resume
    type: str
    data: dict[str, Any]


def _id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


class RedisEvents:
    def __init__(self, redis_client, *, maxlen: int, ttl_s: int):
        self.redis = redis_client
        self.maxlen = maxlen
        self.ttl_s = ttl_s

    @staticmethod
    def _key(run_id: str) -> str:
        return f"mgmflow:events:{run_id}"

    def publish(self, run_id: str, type: str, data: dict) -> str:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(self._key(run_id), {"type": type, "data": json.dumps(data)}, maxlen=self.maxlen, approximate=True)
        pipe.expire(self._key(run_id), self.ttl_s)
        return pipe.execute()[0]

    def read(self, run_id: str, after: str | None = None, block_ms: int = 0, count: int = 1000) -> list[Event]:
        start = after or "0-0"
        if block_ms > 0:
            reply = self.redis.xread({self._key(run_id): start}, count=count, block=block_ms)
            entries = reply[0][1] if reply else []
        else:
            entries = self.redis.xrange(self._key(run_id), min=f"({start}" if after else "-", count=count)
        return [Event(entry_id, fields["type"], json.loads(fields["data"])) for entry_id, fields in entries]

    def delete(self, run_id: str) -> None:
        self.redis.delete(self._key(run_id))


@dataclass
class MemoryEvents:
    """In-process streams with the same ids, cap and TTL semantics as the Redis ones."""

    maxlen: int = 10_000
    ttl_s: int = 24 * 3600
    _streams: dict[str, deque] = field(default_factory=lambda: defaultdict(deque))
    _touched: dict[str, float] = field(default_factory=dict)
    _last: tuple[int, int] = (0, 0)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def publish(self, run_id: str, type: str, data: dict) -> str:
        with self._cond:
            ms = int(time.time() * 1000)
            self._last = (ms, 0) if ms > self._last[0] else (self._last[0], self._last[1] + 1)
            event = Event(f"{self._last[0]}-{self._last[1]}", type, json.loads(json.dumps(data)))
            stream = self._streams[run_id]
            stream.append(event)
            while len(stream) > self.maxlen:
                stream.popleft()
            self._touched[run_id] = time.monotonic()
            self._expire()
            self._cond.notify_all()
            return event.id

    def read(self, run_id: str, after: str | None = None, block_ms: int = 0, count: int = 1000) -> list[Event]:
        after_key = _id_key(after) if after else (-1, -1)
        end = time.monotonic() + block_ms / 1000
        with self._cond:
            while True:
                events = [e for e in self._streams.get(run_id, ()) if _id_key(e.id) > after_key][:count]
                left = end - time.monotonic()
                if events or left <= 0:
                    return events
                self._cond.wait(left)

    def delete(self, run_id: str) -> None:
        with self._cond:
            self._streams.pop(run_id, None)
            self._touched.pop(run_id, None)

    def _expire(self) -> None:
        horizon = time.monotonic() - self.ttl_s
        for run_id in [r for r, at in self._touched.items() if at < horizon]:
            self._streams.pop(run_id, None)
            self._touched.pop(run_id, None)


_memory_events: MemoryEvents | None = None


def open_events(settings) -> RedisEvents | MemoryEvents:
    """A Redis stream per run when a broker is configured, else the process's in-memory streams."""
    global _memory_events
    if not settings.embedded:
        from mgmflow.workers.records import redis_client

        return RedisEvents(redis_client(settings.records_url), maxlen=settings.events_maxlen,
                           ttl_s=settings.events_ttl_s)
    if _memory_events is None:
        _memory_events = MemoryEvents(maxlen=settings.events_maxlen, ttl_s=settings.events_ttl_s)
    return _memory_events
