"""Task records: the durable truth about each step, kept apart from Celery's short-lived results.

A record is keyed by the caller's deterministic task id for (run, step) and lives as long as the run:

    queued → running (under a lease its worker renews) → done(result) | failed(error) | cancelled | timed_out
                                                       ↘ quarantined (started max_deliveries times, never finished)

The lease makes redelivery safe: a second copy of a step whose lease is live waits for it; a copy of a finished
step returns the stored result; a lapsed lease (its worker died) is taken over atomically, or taken back by its own
worker when it wakes from a stall before anyone else took it. ``deliveries`` counts acquisitions (the Redis
transport keeps no delivery count; they quarantine a step that keeps killing its workers), ``executions`` counts
starts of the step's work, incremented where they happen (what "ran once" is asserted on).

Every unfinished step is watched (``watch_due``): a record keeps the message that sends it (``message``, its
public queue and priority), so a step whose message was lost (queued, never delivered) or whose worker is gone
(running under a lapsed lease) is sent again by ``mgmflow.workers.watch`` without waiting for the broker's visibility
timeout.

Two implementations with one interface: Redis (Lua scripts make each transition atomic) for deployments, SQLite
under ``MGMFLOW_HOME`` (``BEGIN IMMEDIATE`` transactions) for the embedded mode, so a rerun of an interrupted main
job finds the steps it already finished.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mgmflow.workers import faults
from mgmflow.workers.sqlite_locks import BUSY_TIMEOUT_MS, begin_immediate

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
CANCELLED, TIMED_OUT, QUARANTINED = "cancelled", "timed_out", "quarantined"
FINAL = frozenset({DONE, FAILED, CANCELLED, TIMED_OUT, QUARANTINED})

# acquire() outcomes
ACQUIRED, BUSY, FINISHED = "acquired", "busy", "final"
WATCH_KEY = "mgmflow:watch"  # Redis: sorted set of unfinished task ids, scored by when to look at them next


@dataclass(frozen=True)
class StepHeader:
    """What a step message carries besides its payload; enough to recreate a record that expired."""

    task_id: str
    kind: str
    run_id: str
    scope: str
    notify: list | None = None  # [task name, kwargs]
    deadline: float | None = None  # epoch seconds

    def to_dict(self) -> dict[str, Any]:
        return {"task_id": self.task_id, "kind": self.kind, "run_id": self.run_id, "scope": self.scope,
                "notify": self.notify, "deadline": self.deadline}


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    status: str
    result: dict | None = None
    error: dict | None = None  # {"code", "message", "retryable"}
    kind: str = ""
    run_id: str = ""
    scope: str = ""
    notify: list | None = None
    owner: str | None = None
    deliveries: int = 0
    executions: int = 0
    resends: int = 0  # copies of its message the watcher sent again
    created_at: float = 0.0
    updated_at: float = 0.0

    @property
    def final(self) -> bool:
        return self.status in FINAL


def quarantine_error(started: int | str) -> dict:
    return {"code": "quarantined", "retryable": False,
            "message": f"the step was started {started} times and its worker never finished it "
                       "(crash, kill or out of memory); quarantined so that it cannot take down more workers"}


def _loads(value: str | None):
    return None if value in (None, "") else json.loads(value)


# ---------------------------------------------------------------------------------------------- Redis

_LUA_PRELUDE = """
local FINAL = {done=true, failed=true, cancelled=true, timed_out=true, quarantined=true}
"""

# KEYS: task, lease, run set, watch. ARGV: task_id, kind, run_id, scope, notify, now, ttl, resend_after, message,
# watch_at
_REGISTER = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  if FINAL[status] then return 0 end
  if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
  if status == 'queued' then
    -- queued recently: its message is on the way; long queued: it may have been lost, a copy is harmless
    local created = tonumber(redis.call('HGET', KEYS[1], 'updated_at'))
    if tonumber(ARGV[6]) - created < tonumber(ARGV[8]) then return 0 end
  end
  if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'message', ARGV[9]) end
  return 1
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'kind', ARGV[2], 'run_id', ARGV[3], 'scope', ARGV[4],
  'notify', ARGV[5], 'created_at', ARGV[6], 'updated_at', ARGV[6], 'deliveries', 0, 'executions', 0,
  'message', ARGV[9])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[7])
redis.call('ZADD', KEYS[4], ARGV[10], ARGV[1])
return 1
"""

# KEYS: task, lease, run set, watch. ARGV: task_id, kind, run_id, scope, notify, now, ttl, owner, lease_ms,
# max_deliveries, quarantine error (JSON, for when deliveries exceed the maximum; %d = deliveries)
_ACQUIRE = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  redis.call('HSET', KEYS[1], 'status', 'queued', 'kind', ARGV[2], 'run_id', ARGV[3], 'scope', ARGV[4],
    'notify', ARGV[5], 'created_at', ARGV[6], 'deliveries', 0, 'executions', 0)
  redis.call('SADD', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[7])
elseif FINAL[status] then
  return {'final', 0}
end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[8] then return {'busy', 0} end
local deliveries = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
redis.call('EXPIRE', KEYS[1], ARGV[7])
if deliveries > tonumber(ARGV[10]) then
  redis.call('HSET', KEYS[1], 'status', 'quarantined', 'error', string.format(ARGV[11], deliveries - 1),
    'updated_at', ARGV[6])
  redis.call('ZREM', KEYS[4], ARGV[1])
  redis.call('PUBLISH', 'mgmflow:done:' .. ARGV[1], 'quarantined')
  return {'quarantined', deliveries}
end
redis.call('SET', KEYS[2], ARGV[8], 'PX', ARGV[9])
redis.call('HSET', KEYS[1], 'status', 'running', 'owner', ARGV[8], 'updated_at', ARGV[6])
redis.call('ZADD', KEYS[4], tonumber(ARGV[6]) + tonumber(ARGV[9]) / 1000, ARGV[1])
return {'acquired', deliveries}
"""

# KEYS: task, lease, watch. ARGV: task_id, owner, status, result, error, now, ttl
_FINISH = _LUA_PRELUDE + """
local status = redis.call('HGET', KEYS[1], 'status')
if status and FINAL[status] then return 'final' end
local holder = redis.call('GET', KEYS[2])
-- a record that expired (or was evicted) under its running step still gets the outcome: never dropped
if status and holder ~= ARGV[2] and (holder or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]) then
  return 'lost'
end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'result', ARGV[4], 'error', ARGV[5], 'updated_at', ARGV[6])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[7])
redis.call('PUBLISH', 'mgmflow:done:' .. ARGV[1], ARGV[3])
return 'ok'
"""

# KEYS: lease, task. ARGV: owner, lease_ms. A worker waking from a stall past its lease takes the step back if
# nobody took it over meanwhile (its record still names it, unfinished): the step is never left orphaned.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder and redis.call('HGET', KEYS[2], 'status') == 'running'
    and redis.call('HGET', KEYS[2], 'owner') == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RENEW = "local function hold()" + _HOLD + "end\nreturn hold()"
# The same, and count one start of the step's work when the lease is ours: the count is exact across processes.
_START = "local function hold()" + _HOLD + "end\nif hold() == 0 then return 0 end\n" \
    "return redis.call('HINCRBY', KEYS[2], 'executions', 1)"

# KEYS: watch. ARGV: now, limit, recheck_s — claim the watched steps that are due (others skip them until then)
_CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, task_id in ipairs(due) do redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), task_id) end
return due
"""

# KEYS: task, watch. ARGV: task_id, now, next check — a copy of the step's message was sent again
_RESENT = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'updated_at', ARGV[2]) end
redis.call('HINCRBY', KEYS[1], 'resends', 1)
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: task, lease. ARGV: owner, now — give a step back to the queue (retry later), uncounted
_RELEASE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'queued', 'updated_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
return 1
"""

# KEYS: run set, run cancel flag. ARGV: now, ttl, error — flag the run; queued steps are cancelled at once
_CANCEL_RUN = """
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
for _, task_id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = 'mgmflow:task:' .. task_id
  if redis.call('HGET', key, 'status') == 'queued' then
    redis.call('HSET', key, 'status', 'cancelled', 'error', ARGV[3], 'updated_at', ARGV[1])
    redis.call('PUBLISH', 'mgmflow:done:' .. task_id, 'cancelled')
  end
end
return 1
"""

CANCELLED_ERROR = {"code": "cancelled", "message": "cancelled by request", "retryable": False}


_redis_clients: dict[str, Any] = {}
_sqlite_records: dict[Path, SqliteRecords] = {}
_open_lock = threading.Lock()


def redis_client(url: str):
    """One client (one connection pool) per URL and process."""
    from redis import Redis
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import ConnectionError, TimeoutError
    from redis.retry import Retry

    with _open_lock:
        if url not in _redis_clients:
            # Retries ride out a Redis restart (tens of seconds) instead of failing a step that is nearly done.
            _redis_clients[url] = Redis.from_url(
                url, decode_responses=True, retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), 30),
                retry_on_error=[ConnectionError, TimeoutError], health_check_interval=30)
        return _redis_clients[url]


def open_records(settings) -> Records:
    """Redis records when a broker is configured, else the SQLite file under ``MGMFLOW_HOME`` (one per process)."""
    if not settings.embedded:
        return RedisRecords(redis_client(settings.records_url), ttl_s=settings.record_ttl_s)
    path = Path(settings.home) / "tasks.sqlite"
    with _open_lock:
        if path not in _sqlite_records:
            _sqlite_records[path] = SqliteRecords(path, ttl_s=settings.record_ttl_s)
        return _sqlite_records[path]


class RedisRecords:
    def __init__(self, redis, *, ttl_s: int):
        self.redis = redis
        self.ttl_s = ttl_s
        self._register = self.redis.register_script(_REGISTER)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._finish = self.redis.register_script(_FINISH)
        self._renew = self.redis.register_script(_RENEW)
        self._start = self.redis.register_script(_START)
        self._release = self.redis.register_script(_RELEASE)
        self._cancel_run = self.redis.register_script(_CANCEL_RUN)
        self._claim_due = self.redis.register_script(_CLAIM_DUE)
        self._resent = self.redis.register_script(_RESENT)

    @staticmethod
    def _keys(task_id: str, run_id: str = "") -> list[str]:
        return [f"mgmflow:task:{task_id}", f"mgmflow:lease:{task_id}", f"mgmflow:run:{run_id}:tasks", WATCH_KEY]

    def _header_args(self, header: StepHeader) -> list:
        return [header.task_id, header.kind, header.run_id, header.scope, json.dumps(header.notify),
                time.time(), self.ttl_s]

    def register(self, header: StepHeader, *, resend_after_s: float, message: dict | None = None,
                 watch_after_s: float = 0.0) -> bool:
        """Create the record if new, keeping ``message`` (what sends it: ``{"body", "queue", "priority"}``) for
        the watcher, which first looks at it after ``watch_after_s``. True when the caller must send the message."""
        return bool(self._register(keys=self._keys(header.task_id, header.run_id),
                                   args=[*self._header_args(header), resend_after_s, _dumps(message),
                                         time.time() + watch_after_s]))

    def acquire(self, header: StepHeader, owner: str, *, lease_s: float, max_deliveries: int) -> tuple[str, int]:
        outcome, deliveries = self._acquire(
            keys=self._keys(header.task_id, header.run_id),
            args=[*self._header_args(header), owner, int(lease_s * 1000), max_deliveries,
                  json.dumps(quarantine_error("%d"))])
        return outcome, int(deliveries)

    def renew(self, task_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease (or take it back after a stall, if nobody took the step over)."""
        task, lease = self._keys(task_id)[:2]
        return bool(self._renew(keys=[lease, task], args=[owner, int(lease_s * 1000)]))

    def start(self, task_id: str, owner: str, lease_s: float) -> bool:
        """Renew ``owner``'s lease and count one start of the step's work, atomically; False (nothing counted)
        when the step is no longer ``owner``'s."""
        task, lease = self._keys(task_id)[:2]
        return bool(self._start(keys=[lease, task], args=[owner, int(lease_s * 1000)]))

    def finish(self, task_id: str, owner: str, status: str, *, result: dict | None = None,
               error: dict | None = None) -> str:
        """Record the outcome if ``owner`` still holds the step: 'ok', 'lost' (taken over) or 'final'."""
        task, lease, _, watch = self._keys(task_id)
        return self._finish(keys=[task, lease, watch],
                            args=[task_id, owner, status, _dumps(result), _dumps(error), time.time(), self.ttl_s])

    # The watcher's view: unfinished steps, each due for a look at a time; one process takes each look.
    def watch_due(self, *, limit: int, recheck_s: float) -> list[str]:
        """Claim up to ``limit`` watched steps that are due; each is due again after ``recheck_s`` unless rescheduled."""
        return self._claim_due(keys=[WATCH_KEY], args=[time.time(), limit, recheck_s])

    def watch_later(self, task_id: str, at: float) -> None:
        self.redis.zadd(WATCH_KEY, {task_id: at})

    def unwatch(self, task_id: str) -> None:
        self.redis.zrem(WATCH_KEY, task_id)

    def lease_held(self, task_id: str) -> bool:
        return bool(self.redis.exists(f"mgmflow:lease:{task_id}"))

    def message(self, task_id: str) -> dict | None:
        return _loads(self.redis.hget(f"mgmflow:task:{task_id}", "message"))

    def resent(self, task_id: str, *, next_check: float) -> None:
        """Note a copy of the step's message sent again (a queued step's wait restarts now)."""
        self._resent(keys=[f"mgmflow:task:{task_id}", WATCH_KEY], args=[task_id, time.time(), next_check])

    def release(self, task_id: str, owner: str) -> None:
        self._release(keys=self._keys(task_id)[:2], args=[owner, time.time()])

    def get(self, task_id: str) -> TaskRecord | None:
        fields = self.redis.hgetall(f"mgmflow:task:{task_id}")
        return _record(task_id, fields) if fields else None

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        """The record once final, or as it is when ``timeout`` passes."""
        end = time.monotonic() + timeout
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(f"mgmflow:done:{task_id}")
            while True:
                record = self.get(task_id)
                left = end - time.monotonic()
                if (record and record.final) or left <= 0:
                    return record
                # Re-read at least every second: a notification can be missed across a reconnection.
                pubsub.get_message(timeout=min(left, 1.0))
        finally:
            pubsub.close()

    def cancel_run(self, run_id: str) -> None:
        self._cancel_run(keys=[f"mgmflow:run:{run_id}:tasks", f"mgmflow:cancel:run:{run_id}"],
                         args=[time.time(), self.ttl_s, json.dumps(CANCELLED_ERROR)])

    def cancel_task(self, task_id: str) -> None:
        self.redis.set(f"mgmflow:cancel:task:{task_id}", "1", ex=self.ttl_s)

    def is_cancelled(self, run_id: str, task_id: str) -> bool:
        return self.redis.exists(f"mgmflow:cancel:run:{run_id}", f"mgmflow:cancel:task:{task_id}") > 0

    def delete_run(self, run_id: str) -> None:
        """Forget a run's records (the explicit cleanup; otherwise they expire after ``ttl_s``)."""
        run_key = f"mgmflow:run:{run_id}:tasks"
        task_ids = self.redis.smembers(run_key)
        keys = [key for task_id in task_ids for key in self._keys(task_id)[:2]]
        keys += [f"mgmflow:cancel:task:{task_id}" for task_id in task_ids]
        self.redis.delete(run_key, f"mgmflow:cancel:run:{run_id}", *keys)
        if task_ids:
            self.redis.zrem(WATCH_KEY, *task_ids)


def _dumps(value) -> str:
    return "" if value is None else json.dumps(value)


def _record(task_id: str, fields: dict) -> TaskRecord:
    return TaskRecord(
        task_id=task_id, status=fields.get("status", QUEUED), result=_loads(fields.get("result")),
        error=_loads(fields.get("error")), kind=fields.get("kind", ""), run_id=fields.get("run_id", ""),
        scope=fields.get("scope", ""), notify=_loads(fields.get("notify")), owner=fields.get("owner") or None,
        deliveries=int(fields.get("deliveries") or 0), executions=int(fields.get("executions") or 0),
        resends=int(fields.get("resends") or 0), created_at=float(fields.get("created_at") or 0), updated_at=float(fields.get("updated_at") or 0))


# ---------------------------------------------------------------------------------------------- SQLite

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
  task_id TEXT PRIMARY KEY, kind TEXT, run_id TEXT, scope TEXT, notify TEXT, status TEXT NOT NULL,
  result TEXT, error TEXT, owner TEXT, lease_until REAL, deliveries INTEGER DEFAULT 0,
  executions INTEGER DEFAULT 0, created_at REAL, updated_at REAL);
CREATE INDEX IF NOT EXISTS tasks_run ON tasks(run_id);
CREATE TABLE IF NOT EXISTS cancels (key TEXT PRIMARY KEY);
"""
# Columns added since the first release (existing files get them when opened): the watcher's.
_ADDED = {"message": "TEXT", "resends": "INTEGER DEFAULT 0", "watch_at": "REAL"}


@dataclass
class SqliteRecords:
    """The same transitions in one SQLite file; leases use this machine's clock (one machine only)."""

    path: Path
    ttl_s: int = 7 * 24 * 3600
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # held by every transaction
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def __post_init__(self):
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(tasks)")}
        for name in _ADDED.keys() - present:
            try:
                self._db.execute(f"ALTER TABLE tasks ADD COLUMN {name} {_ADDED[name]}")
            except sqlite3.OperationalError:  # another process added it just now
                pass
        self._db.execute("CREATE INDEX IF NOT EXISTS tasks_watch ON tasks(watch_at)")
        faults.hold_during_stops(self._lock)

    def _transaction(self, work):
        with self._lock:
            begin_immediate(self._db, self.path)
            try:
                outcome = work(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return outcome

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def _row(self, db, task_id):
        return db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()

    def _insert(self, db, header: StepHeader, now: float, message: dict | None = None,
                watch_at: float | None = None) -> None:
        db.execute("INSERT INTO tasks (task_id, kind, run_id, scope, notify, status, created_at, updated_at, "
                   "message, watch_at) VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?)",
                   (header.task_id, header.kind, header.run_id, header.scope, json.dumps(header.notify), now, now,
                    _dumps(message), watch_at))

    def register(self, header: StepHeader, *, resend_after_s: float, message: dict | None = None,
                 watch_after_s: float = 0.0) -> bool:
        def work(db):
            now = time.time()
            row = self._row(db, header.task_id)
            if row is None:
                self._insert(db, header, now, message, now + watch_after_s)
                return True
            if row["status"] in FINAL or _lease_live(row, now):
                return False
            send = row["status"] != QUEUED or now - row["updated_at"] >= resend_after_s
            if send and message is not None:
                db.execute("UPDATE tasks SET message = ? WHERE task_id = ?", (_dumps(message), header.task_id))
            return send

        return self._transaction(work)

    def acquire(self, header: StepHeader, owner: str, *, lease_s: float, max_deliveries: int) -> tuple[str, int]:
        def work(db):
            now = time.time()
            row = self._row(db, header.task_id)
            if row is None:
                self._insert(db, header, now)
                row = self._row(db, header.task_id)
            if row["status"] in FINAL:
                return FINISHED, 0
            if row["owner"] != owner and _lease_live(row, now):
                return BUSY, 0
            deliveries = row["deliveries"] + 1
            if deliveries > max_deliveries:
                db.execute("UPDATE tasks SET status = ?, error = ?, deliveries = ?, updated_at = ? WHERE task_id = ?",
                           (QUARANTINED, json.dumps(quarantine_error(deliveries - 1)), deliveries, now, header.task_id))
                return QUARANTINED, deliveries
            db.execute("UPDATE tasks SET status = 'running', owner = ?, lease_until = ?, deliveries = ?, "
                       "updated_at = ?, watch_at = ? WHERE task_id = ?",
                       (owner, now + lease_s, deliveries, now, now + lease_s, header.task_id))
            return ACQUIRED, deliveries

        outcome = self._transaction(work)
        if outcome[0] == QUARANTINED:
            self._notify()
        return outcome

    def renew(self, task_id: str, owner: str, lease_s: float) -> bool:
        """Extend ``owner``'s lease; one that lapsed is taken back while the record still names ``owner``."""
        def work(db):
            now = time.time()
            return db.execute("UPDATE tasks SET lease_until = ? WHERE task_id = ? AND owner = ? AND status = ?",
                              (now + lease_s, task_id, owner, RUNNING)).rowcount > 0

        return self._transaction(work)

    def start(self, task_id: str, owner: str, lease_s: float) -> bool:
        def work(db):
            return db.execute("UPDATE tasks SET lease_until = ?, executions = executions + 1 "
                              "WHERE task_id = ? AND owner = ? AND status = ?",
                              (time.time() + lease_s, task_id, owner, RUNNING)).rowcount > 0

        return self._transaction(work)

    def finish(self, task_id: str, owner: str, status: str, *, result: dict | None = None,
               error: dict | None = None) -> str:
        def work(db):
            row = self._row(db, task_id)
            if row is not None and row["status"] in FINAL:
                return FINISHED
            if row is not None and row["owner"] != owner:
                return "lost"
            if row is None:  # the record was removed under its running step: the outcome is still kept
                db.execute("INSERT INTO tasks (task_id, status, owner, created_at) VALUES (?, ?, ?, ?)",
                           (task_id, RUNNING, owner, time.time()))
            db.execute("UPDATE tasks SET status = ?, result = ?, error = ?, lease_until = NULL, updated_at = ?, "
                       "watch_at = NULL WHERE task_id = ?",
                       (status, _dumps(result), _dumps(error), time.time(), task_id))
            return "ok"

        outcome = self._transaction(work)
        self._notify()
        return outcome

    def release(self, task_id: str, owner: str) -> None:
        self._transaction(lambda db: db.execute(
            "UPDATE tasks SET status = 'queued', lease_until = NULL, deliveries = deliveries - 1, updated_at = ? "
            "WHERE task_id = ? AND owner = ?", (time.time(), task_id, owner)))

    def get(self, task_id: str) -> TaskRecord | None:
        with self._lock:
            row = self._row(self._db, task_id)
        return None if row is None else _record(task_id, {k: row[k] for k in row.keys() if row[k] is not None})

    def wait(self, task_id: str, timeout: float) -> TaskRecord | None:
        end = time.monotonic() + timeout
        while True:
            record = self.get(task_id)
            left = end - time.monotonic()
            if (record and record.final) or left <= 0:
                return record
            with self._changed:  # woken by this process's writers; another process's by the re-read
                self._changed.wait(min(left, 0.5))

    # The watcher's view (see RedisRecords).
    def watch_due(self, *, limit: int, recheck_s: float) -> list[str]:
        def work(db):
            now = time.time()
            due = [row[0] for row in db.execute(
                "SELECT task_id FROM tasks WHERE watch_at <= ? AND status IN ('queued', 'running') "
                "ORDER BY watch_at LIMIT ?", (now, limit))]
            db.executemany("UPDATE tasks SET watch_at = ? WHERE task_id = ?", [(now + recheck_s, t) for t in due])
            return due

        return self._transaction(work)

    def watch_later(self, task_id: str, at: float) -> None:
        self._transaction(lambda db: db.execute("UPDATE tasks SET watch_at = ? WHERE task_id = ?", (at, task_id)))

    def unwatch(self, task_id: str) -> None:
        self._transaction(lambda db: db.execute("UPDATE tasks SET watch_at = NULL WHERE task_id = ?", (task_id,)))

    def lease_held(self, task_id: str) -> bool:
        with self._lock:
            row = self._row(self._db, task_id)
        return row is not None and _lease_live(row, time.time())

    def message(self, task_id: str) -> dict | None:
        with self._lock:
            row = self._row(self._db, task_id)
        return None if row is None else _loads(row["message"])

    def resent(self, task_id: str, *, next_check: float) -> None:
        now = time.time()
        self._transaction(lambda db: db.execute(
            "UPDATE tasks SET resends = resends + 1, watch_at = ?, "
            "updated_at = CASE WHEN status = 'queued' THEN ? ELSE updated_at END WHERE task_id = ?",
            (next_check, now, task_id)))

    def cancel_run(self, run_id: str) -> None:
        def work(db):
            db.execute("INSERT OR IGNORE INTO cancels VALUES (?)", (f"run:{run_id}",))
            db.execute("UPDATE tasks SET status = 'cancelled', error = ?, updated_at = ? "
                       "WHERE run_id = ? AND status = 'queued'", (json.dumps(CANCELLED_ERROR), time.time(), run_id))

        self._transaction(work)
        self._notify()

    def cancel_task(self, task_id: str) -> None:
        self._transaction(lambda db: db.execute("INSERT OR IGNORE INTO cancels VALUES (?)", (f"task:{task_id}",)))

    def is_cancelled(self, run_id: str, task_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM cancels WHERE key IN (?, ?)",
                                    (f"run:{run_id}", f"task:{task_id}")).fetchone() is not None

    def delete_run(self, run_id: str) -> None:
        def work(db):
            task_ids = [row[0] for row in db.execute("SELECT task_id FROM tasks WHERE run_id = ?", (run_id,))]
            db.execute("DELETE FROM tasks WHERE run_id = ?", (run_id,))
            db.executemany("DELETE FROM cancels WHERE key = ?",
                           [(f"run:{run_id}",), *((f"task:{task_id}",) for task_id in task_ids)])

        self._transaction(work)


def _lease_live(row, now: float) -> bool:
    """A lease is live until it lapses, or at once when its owner process (on this machine) is gone: an
    interrupted embedded run is taken over by the next one without waiting for the lease."""
    return (row["lease_until"] or 0) > now and not owner_gone(row["owner"] or "")


def owner_gone(owner: str) -> bool:
    """Whether the process named by a lease owner ``"host:pid:…"`` is known to be gone: it ran on this machine and
    no longer exists. An owner on another machine is never known to be gone (its lease lapses instead)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


Records = RedisRecords | SqliteRecords
