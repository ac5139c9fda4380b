"""Run and thread records, next to the checkpoints in the same database.

A run record says what the run is (workflow, input, thread, scope, priority, idempotency key) and where it stands
(status, the task ids it awaits, a pending human resume value, its error). The graph's own state lives in the
LangGraph checkpoints. A short lease on the record makes one process at a time drive a run.

A run may carry a webhook: its URL and delivery state (pending, delivered, failed; attempts, next attempt) live in
the record too, so that a delivery survives the process that admitted the run (at least once).

Columns added after the first release are added to existing databases when a store opens them (``_ADDED``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.checkpoint import Database

DEFAULT_SCOPE = "default"  # the open server's and the CLI's
ACTIVE = ("pending", "running", "interrupted")
TERMINAL = ("success", "error", "timeout", "cancelled")
STATUSES = ACTIVE + TERMINAL


def scoped_thread_id(scope: str, thread_id: str) -> str:
    """The stored id of a scope's thread ``thread_id``: thread ids are per scope, so that two keys may both have a
    thread "t1" and neither learns of the other's nor takes an id the other will choose. The default scope's ids
    are stored as they are."""
    return thread_id if scope == DEFAULT_SCOPE else f"{scope}/{thread_id}"


def public_thread_id(scope: str, stored: str) -> str:
    """The id a scope knows its thread by (the inverse of :func:`scoped_thread_id`)."""
    return stored.removeprefix(f"{scope}/")


class RunNotFound(InvalidInputError):
    """No run (or thread) with that id in the caller's scope."""

    code = "not_found"


@dataclass
class RunInfo:
    run_id: str
    thread_id: str
    workflow: str
    status: str
    scope: str
    input: dict[str, Any]
    approve: bool = False
    priority: int = 5
    idempotency_key: str | None = None
    awaited: list[str] = field(default_factory=list)
    interrupt: list[dict[str, Any]] | None = None  # pending approval payloads while status == interrupted
    error: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    updated_at: float = 0.0
    resume_value: Any = None
    previews: int = 0  # store a diffusion preview every N denoising steps (0: none)
    webhook: str | None = None  # POSTed the finished run; delivery state in the webhook_* columns
    webhook_status: str | None = None  # pending | delivered | failed (None: no webhook)
    # The checkpoint the run ended with: its outputs are read there, never from whatever is latest on its thread.
    ended_checkpoint: str | None = None
    # The HTTP API's stream modes the run was created with (None: none named), which a join naming none streams in.
    stream_mode: list[str] | None = None
    stream_subgraphs: bool = False

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = (
    "run_id", "thread_id", "workflow", "status", "scope", "input", "approve", "priority", "idempotency_key",
    "awaited", "interrupt", "error", "metadata", "created_at", "updated_at", "resume_value", "previews", "webhook",
    "webhook_status", "ended_checkpoint", "stream_mode", "stream_subgraphs",
)
_JSON = {"input", "awaited", "interrupt", "error", "metadata", "resume_value", "stream_mode"}
_NULLABLE_JSON = {"interrupt", "error", "resume_value", "stream_mode"}  # None is stored as NULL
_BOOL = {"approve", "stream_subgraphs"}

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS mgmflow_runs (
        run_id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, workflow TEXT NOT NULL, status TEXT NOT NULL,
        scope TEXT NOT NULL, input TEXT NOT NULL, approve INTEGER NOT NULL, priority INTEGER NOT NULL,
        idempotency_key TEXT, awaited TEXT NOT NULL, interrupt TEXT, error TEXT, metadata TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, resume_value TEXT,
        lease_owner TEXT, lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0)""",
    # (previews and the webhook columns come from _ADDED, on new and old databases alike)
    "CREATE UNIQUE INDEX IF NOT EXISTS mgmflow_runs_idem ON mgmflow_runs (scope, idempotency_key)",
    "CREATE INDEX IF NOT EXISTS mgmflow_runs_thread ON mgmflow_runs (thread_id, created_at)",
    "CREATE INDEX IF NOT EXISTS mgmflow_runs_status ON mgmflow_runs (status, updated_at)",
    # A key's runs of one status in list order, read without a sort: the quota check on every submission
    # (one row at offset limit-1 of its pending runs) and the listing pages.
    "CREATE INDEX IF NOT EXISTS mgmflow_runs_scope ON mgmflow_runs (scope, status, created_at DESC, run_id)",
    """CREATE TABLE IF NOT EXISTS mgmflow_threads (
        thread_id TEXT PRIMARY KEY, scope TEXT NOT NULL, workflow TEXT, metadata TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL)""",
)

# Columns added since the first release: name → definition. Every store adds those its database lacks.
_ADDED = {
    "previews": "INTEGER NOT NULL DEFAULT 0",
    "webhook": "TEXT",
    "webhook_status": "TEXT",
    "webhook_attempts": "INTEGER NOT NULL DEFAULT 0",
    # The next delivery attempt (epoch s); while one process delivers, when its claim lapses.
    "webhook_next_at": "DOUBLE PRECISION NOT NULL DEFAULT 0",
    "webhook_error": "TEXT",  # the last attempt's failure
    "ended_checkpoint": "TEXT",
    "stream_mode": "TEXT",
    "stream_subgraphs": "INTEGER NOT NULL DEFAULT 0",
}
# Only runs whose webhook is still to be delivered, in the order they are due: the delivery loop's one query.
_AFTER_ADDED = (
    "CREATE INDEX IF NOT EXISTS mgmflow_runs_webhook ON mgmflow_runs (webhook_next_at)"
    " WHERE webhook_status = 'pending'",
)


@dataclass(frozen=True)
class PendingWebhook:
    """A finished run's webhook that is due: what a delivery attempt needs."""

    run_id: str
    scope: str
    url: str
    attempts: int
    next_at: float


class RunStore:
    """CRUD of run and thread records, with compare-and-set status changes and a per-run lease."""

    def __init__(self, database: Database) -> None:
        self.db = database
        for statement in _SCHEMA:
            self.db.execute(statement)
        self._add_columns()
        for statement in _AFTER_ADDED:
            self.db.execute(statement)

    def _add_columns(self) -> None:
        """Bring a database made by an earlier release up to date (several processes may race to do it)."""
        postgres = self.db.dialect == "postgres"

        def present() -> set[str]:
            sql = ("SELECT column_name FROM information_schema.columns WHERE table_name = 'mgmflow_runs'"
                   " AND table_schema = current_schema()" if postgres
                   else "SELECT name FROM pragma_table_info('mgmflow_runs')")
            return {row[0] for row in self.db.execute(sql)}

        # Look first: ALTER TABLE locks the table even when there is nothing to add.
        existing = present()
        for name in [name for name in _ADDED if name not in existing]:
            try:  # (SQLite has no ADD COLUMN IF NOT EXISTS)
                self.db.execute(f"ALTER TABLE mgmflow_runs ADD COLUMN {'IF NOT EXISTS ' if postgres else ''}"
                                f"{name} {_ADDED[name]}")
            except Exception:
                if name not in present():  # not another process adding it just now: a real failure
                    raise

    # Threads.
    def create_thread(self, *, scope: str, thread_id: str | None = None, workflow: str | None = None,
                      metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        thread = {"thread_id": thread_id or scoped_thread_id(scope, str(uuid.uuid4())), "scope": scope, "workflow": workflow,
                  "metadata": metadata or {}, "created_at": time.time()}
        inserted = self.db.execute(
            "INSERT INTO mgmflow_threads (thread_id, scope, workflow, metadata, created_at) VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (thread_id) DO NOTHING RETURNING thread_id",
            (thread["thread_id"], scope, workflow, json.dumps(thread["metadata"]), thread["created_at"]),
        )
        return thread if inserted else self.get_thread(thread["thread_id"], scope=scope)

    def get_thread(self, thread_id: str, *, scope: str | None = None) -> dict[str, Any]:
        rows = self.db.execute(
            "SELECT thread_id, scope, workflow, metadata, created_at FROM mgmflow_threads WHERE thread_id = ?",
            (thread_id,),
        )
        if not rows or (scope is not None and rows[0][1] != scope):
            raise RunNotFound(f"thread {thread_id!r} not found")
        thread_id, scope, workflow, metadata, created_at = rows[0]
        return {"thread_id": thread_id, "scope": scope, "workflow": workflow, "metadata": json.loads(metadata),
                "created_at": created_at}

    def bind_thread(self, thread_id: str, workflow: str) -> None:
        """A thread belongs to the workflow of its first run (its state has that workflow's shape)."""
        self.db.execute("UPDATE mgmflow_threads SET workflow = ? WHERE thread_id = ? AND workflow IS NULL",
                        (workflow, thread_id))

    # Runs.
    def insert(self, run: RunInfo) -> RunInfo:
        """Insert ``run``; with an idempotency key already used in its scope, return that run instead."""
        now = time.time()
        run.created_at = run.updated_at = now
        values = tuple(_encode(name, getattr(run, name)) for name in _COLUMNS)
        placeholders = ", ".join("?" for _ in _COLUMNS)
        if self.db.execute(f"INSERT INTO mgmflow_runs ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
                           " ON CONFLICT DO NOTHING RETURNING run_id", values):
            return run
        existing = self.by_idempotency_key(run.scope, run.idempotency_key) if run.idempotency_key else None
        return existing if existing is not None else self.get(run.run_id)

    def get(self, run_id: str, *, scope: str | None = None) -> RunInfo:
        rows = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM mgmflow_runs WHERE run_id = ?", (run_id,))
        if not rows or (scope is not None and rows[0][4] != scope):
            raise RunNotFound(f"run {run_id!r} not found")
        return _decode(rows[0])

    def by_idempotency_key(self, scope: str, key: str) -> RunInfo | None:
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM mgmflow_runs WHERE scope = ? AND idempotency_key = ?", (scope, key)
        )
        return _decode(rows[0]) if rows else None

    def release_idempotency_key(self, run_id: str) -> None:
        """Free a finished run's key so that the same submission starts afresh (after an error, a cancel)."""
        self.db.execute("UPDATE mgmflow_runs SET idempotency_key = NULL WHERE run_id = ?", (run_id,))

    def list(self, *, scope: str | None = None, thread_id: str | None = None, status: str | None = None,
             workflow: str | None = None, limit: int = 100, offset: int = 0) -> list[RunInfo]:
        where, params = [], []
        for column, value in (("scope", scope), ("thread_id", thread_id), ("status", status), ("workflow", workflow)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM mgmflow_runs {clause} ORDER BY created_at DESC, run_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        )
        return [_decode(row) for row in rows]

    def delete(self, run_ids: list[str]) -> None:
        """Forget runs' records (finished runs: a deletion asked for over the API)."""
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start:start + 500]
            self.db.execute(f"DELETE FROM mgmflow_runs WHERE run_id IN ({', '.join('?' for _ in chunk)})", tuple(chunk))

    def threads_ended_before(self, cutoff: float, *, limit: int = 100) -> list[tuple[str, str]]:
        """``(thread_id, scope)`` of threads whose runs have all ended, the last before ``cutoff``: what retention
        removes."""
        rows = self.db.execute(
            "SELECT thread_id, scope FROM mgmflow_runs GROUP BY thread_id, scope HAVING MAX(updated_at) < ?"
            f" AND SUM(CASE WHEN status IN ({', '.join('?' for _ in ACTIVE)}) THEN 1 ELSE 0 END) = 0 LIMIT ?",
            (cutoff, *ACTIVE, limit))
        return [(thread_id, scope) for thread_id, scope in rows]

    def delete_thread(self, thread_id: str) -> None:
        """Forget a thread's record and its runs' records."""
        with self.db.transaction():
            self.db.execute("DELETE FROM mgmflow_runs WHERE thread_id = ?", (thread_id,))
            self.db.execute("DELETE FROM mgmflow_threads WHERE thread_id = ?", (thread_id,))

    def ended_between(self, since: float, until: float, *, limit: int = 1000) -> list[tuple[str, str, str, float, float]]:
        """``(run_id, workflow, status, created_at, updated_at)`` of runs that ended in (since, until], oldest end
        first: what a metrics scrape counts, read from the status index without the runs' bodies."""
        return [tuple(row) for row in self.db.execute(
            "SELECT run_id, workflow, status, created_at, updated_at FROM mgmflow_runs"
            f" WHERE status IN ({', '.join('?' for _ in TERMINAL)}) AND updated_at > ? AND updated_at <= ?"
            " ORDER BY updated_at LIMIT ?", (*TERMINAL, since, until, limit))]

    def update(self, run_id: str, *, unless_status: tuple[str, ...] = TERMINAL, owner: str | None = None,
               **changes: Any) -> bool:
        """Change fields of a run unless its status is one of ``unless_status`` (or, with ``owner``, unless another
        driver holds its lease now); True when it changed."""
        sets = ", ".join(f"{name} = ?" for name in changes)
        params = tuple(_encode(name, value) for name, value in changes.items())
        guard = f" AND status NOT IN ({', '.join('?' for _ in unless_status)})" if unless_status else ""
        fence = (owner,) if owner is not None else ()
        guard += " AND lease_owner = ?" if fence else ""
        return self.db.changed(
            f"UPDATE mgmflow_runs SET {sets}, updated_at = ? WHERE run_id = ?{guard}",
            (*params, time.time(), run_id, *unless_status, *fence),
        ) == 1

    def active_at_least(self, scope: str, count: int) -> bool:
        """Whether ``scope`` has ``count`` or more unfinished runs (pending, running, interrupted). Reads the scope
        index alone (a count of the rows up to ``count``, no row fetched): a quota check on every submission."""
        rows = self.db.execute(
            f"SELECT 1 FROM mgmflow_runs WHERE scope = ? AND status IN ({', '.join('?' for _ in ACTIVE)})"
            " LIMIT 1 OFFSET ?", (scope, *ACTIVE, count - 1)
        )
        return bool(rows)

    def blocking_run(self, run: RunInfo) -> str | None:
        """An earlier active run on the same thread, which ``run`` must wait for (runs on a thread are serial)."""
        rows = self.db.execute(
            "SELECT run_id FROM mgmflow_runs WHERE thread_id = ? AND run_id != ? AND created_at <= ?"
            f" AND status IN ({', '.join('?' for _ in ACTIVE)}) ORDER BY created_at LIMIT 1",
            (run.thread_id, run.run_id, run.created_at, *ACTIVE),
        )
        return rows[0][0] if rows else None

    def next_pending(self, thread_id: str) -> str | None:
        rows = self.db.execute(
            "SELECT run_id FROM mgmflow_runs WHERE thread_id = ? AND status = 'pending' ORDER BY created_at LIMIT 1",
            (thread_id,),
        )
        return rows[0][0] if rows else None

    def stale(self, *, older_than: float) -> list[RunInfo]:
        """Active runs nobody holds, not touched for ``older_than`` seconds: the sweeper's candidates."""
        now = time.time()
        rows = self.db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM mgmflow_runs WHERE status IN ('pending', 'running', 'interrupted')"
            " AND updated_at < ? AND lease_expires < ? ORDER BY created_at",
            (now - older_than, now),
        )
        return [_decode(row) for row in rows]

    def position(self, run: RunInfo) -> int:
        """Runs of the same scope admitted before this one that have not started yet (its place in the queue as
        its owner sees it: other keys' traffic is not theirs to observe). Uses the (scope, status, created_at) index."""
        rows = self.db.execute(
            "SELECT COUNT(*) FROM mgmflow_runs WHERE scope = ? AND status = 'pending' AND created_at < ?",
            (run.scope, run.created_at),
        )
        return int(rows[0][0]) if run.status == "pending" else 0

    # Webhooks: recorded with the run (status pending), delivered once it has ended, at least once.
    def due_webhooks(self, *, limit: int = 100) -> list[PendingWebhook]:
        """Pending webhooks of finished runs whose next attempt is due, the longest waiting first."""
        rows = self.db.execute(
            "SELECT run_id, scope, webhook, webhook_attempts, webhook_next_at FROM mgmflow_runs"
            " WHERE webhook_status = 'pending' AND webhook_next_at <= ?"
            f" AND status IN ({', '.join('?' for _ in TERMINAL)}) ORDER BY webhook_next_at LIMIT ?",
            (time.time(), *TERMINAL, limit),
        )
        return [PendingWebhook(*row) for row in rows]

    def claim_webhook(self, webhook: PendingWebhook, *, for_s: float) -> bool:
        """Take a due webhook for one attempt (compare-and-set on its due time): other processes skip it until
        the attempt is recorded or, if this process dies, ``for_s`` seconds have passed."""
        return self.db.changed(
            "UPDATE mgmflow_runs SET webhook_next_at = ? WHERE run_id = ? AND webhook_status = 'pending'"
            " AND webhook_next_at = ?",
            (time.time() + for_s, webhook.run_id, webhook.next_at),
        ) == 1

    def webhook_attempted(self, run_id: str, *, error: str | None, retry_at: float | None) -> None:
        """Record an attempt: delivered (``error`` None), to be retried at ``retry_at``, or failed for good."""
        if error is None:
            status, next_at = "delivered", 0.0
        else:
            status, next_at = ("pending", retry_at) if retry_at is not None else ("failed", 0.0)
        self.db.execute(
            "UPDATE mgmflow_runs SET webhook_status = ?, webhook_attempts = webhook_attempts + 1,"
            " webhook_next_at = ?, webhook_error = ? WHERE run_id = ? AND webhook_status = 'pending'",
            (status, next_at, error[:500] if error else None, run_id),
        )

    def release_webhook(self, run_id: str) -> None:
        """Give a claimed webhook back without counting an attempt (this process is stopping)."""
        self.db.execute("UPDATE mgmflow_runs SET webhook_next_at = 0 WHERE run_id = ? AND webhook_status = 'pending'",
                        (run_id,))

    def webhook_state(self, run_id: str) -> dict[str, Any]:
        """``{url, status, attempts, next_at, error}`` of a run's webhook."""
        rows = self.db.execute(
            "SELECT webhook, webhook_status, webhook_attempts, webhook_next_at, webhook_error FROM mgmflow_runs"
            " WHERE run_id = ?", (run_id,),
        )
        if not rows:
            raise RunNotFound(f"run {run_id!r} not found")
        return dict(zip(("url", "status", "attempts", "next_at", "error"), rows[0]))

    # The lease: one process drives a run at a time; a dead holder's lease expires.
    def acquire(self, run_id: str, owner: str, ttl: float, *, replacing: str | None = None) -> bool:
        """Take the lease if it is free, ours or lapsed; ``replacing``: also from that holder (known to be gone)."""
        now = time.time()
        return self.db.changed(
            "UPDATE mgmflow_runs SET lease_owner = ?, lease_expires = ? WHERE run_id = ?"
            " AND (lease_owner IS NULL OR lease_owner = ? OR lease_owner = ? OR lease_expires < ?)",
            (owner, now + ttl, run_id, owner, replacing or owner, now),
        ) == 1

    def leases(self, statuses: tuple[str, ...]) -> list[tuple[str, str | None, float]]:
        """``(run_id, lease owner, lease expiry)`` of every run in ``statuses``, oldest first."""
        return [tuple(row) for row in self.db.execute(
            f"SELECT run_id, lease_owner, lease_expires FROM mgmflow_runs WHERE status IN "
            f"({', '.join('?' for _ in statuses)}) ORDER BY created_at", statuses)]

    def lease_holder(self, run_id: str) -> str | None:
        rows = self.db.execute("SELECT lease_owner FROM mgmflow_runs WHERE run_id = ?", (run_id,))
        return rows[0][0] if rows else None

    def renew(self, run_id: str, owner: str, ttl: float) -> bool:
        return self.db.changed(
            "UPDATE mgmflow_runs SET lease_expires = ? WHERE run_id = ? AND lease_owner = ?",
            (time.time() + ttl, run_id, owner),
        ) == 1

    def release(self, run_id: str, owner: str) -> None:
        self.db.execute(
            "UPDATE mgmflow_runs SET lease_owner = NULL, lease_expires = 0 WHERE run_id = ? AND lease_owner = ?",
            (run_id, owner),
        )


def _encode(name: str, value: Any) -> Any:
    if name in _JSON:
        return None if value is None and name in _NULLABLE_JSON else json.dumps(value)
    if name in _BOOL:
        return int(bool(value))
    return value


def _decode(row: tuple) -> RunInfo:
    values = {}
    for name, value in zip(_COLUMNS, row):
        if name in _JSON:
            value = json.loads(value) if value is not None else None
        elif name in _BOOL:
            value = bool(value)
        values[name] = value
    values["awaited"] = values["awaited"] or []
    values["metadata"] = values["metadata"] or {}
    return RunInfo(**values)
