"""Where runs live: LangGraph checkpoints and the run records, in one database.

SQLite (``$MGMFLOW_HOME/checkpoints.sqlite``) is the default, embedded or with only a broker set; PostgreSQL
(``MGMFLOW_DATABASE_URL=postgresql://…``) serves several machines. Both are opened once per process and shared.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from langgraph.checkpoint.base import BaseCheckpointSaver

from mgmflow.models.errors import InvalidInputError
from mgmflow.workers import faults
from mgmflow.workers.sqlite_locks import BUSY_TIMEOUT_MS, begin_immediate

SQLITE_FILE = "checkpoints.sqlite"
# The configurable key of a driver's graph config: ``(run_id, lease owner)``, the fencing token every checkpoint
# write of that drive is checked against ("__" keeps it out of the checkpoints' metadata).
LEASE_KEY = "__mgmflow_run_lease"
FENCE_STALL_S = 10  # a fenced write takes milliseconds; one idle this long in its transaction is a stalled process


class RunLeaseLost(Exception):
    """A checkpoint write of a driver that no longer holds its run's lease (it stalled and another driver took the
    run over): refused, so that a stale driver can never fork the thread's history."""


def _check_lease(connection: Any, config: dict, *, postgres: bool) -> None:
    """Inside the write's transaction: the run's lease is still the writer's (the row is locked until commit, so a
    driver taking the run over waits for this write and then reads it)."""
    run_id, owner = config["configurable"][LEASE_KEY]
    sql = "SELECT lease_owner FROM mgmflow_runs WHERE run_id = ?"
    if postgres:
        sql = sql.replace("?", "%s") + " FOR UPDATE"
    row = connection.execute(sql, (run_id,)).fetchone()
    holder = None if row is None else (row["lease_owner"] if postgres else row[0])
    if holder != owner:
        raise RunLeaseLost(f"run {run_id}: the lease is held by {holder!r}, not by this driver ({owner})")


@dataclass
class Database:
    """A checkpointer and a DB-API connection factory for run records, on the same database."""

    url: str
    saver: BaseCheckpointSaver
    dialect: str  # "sqlite" | "postgres"
    _sqlite: sqlite3.Connection | None = None
    _pool: Any = None  # psycopg_pool.ConnectionPool
    _lock: Any = None  # the SqliteSaver's lock: records and checkpoints share its connection
    _local: threading.local = field(default_factory=threading.local)  # .connection: this thread's open transaction

    @property
    def _path(self) -> str:
        return self.url.removeprefix("sqlite:///")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Run the ``execute`` calls of this thread inside the block as one transaction: one commit (one WAL
        append on SQLite instead of one per statement), rolled back on an exception. Not reentrant."""
        if self.dialect == "sqlite":
            with self._lock, self._sqlite:
                begin_immediate(self._sqlite, self._path)  # take the write lock now
                self._local.connection = self._sqlite
                try:
                    yield
                finally:
                    self._local.connection = None
            return
        with self._pool.connection() as connection, connection.transaction():
            self._local.connection = connection
            try:
                yield
            finally:
                self._local.connection = None

    def execute(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Run one statement (``?`` placeholders) in its own transaction, or in this thread's open
        :meth:`transaction`; rows for a query, else []."""
        return self._execute(sql, params)[0]

    def changed(self, sql: str, params: tuple = ()) -> int:
        """Run one update and return how many rows it changed (for compare-and-set)."""
        return self._execute(sql, params)[1]

    def _execute(self, sql: str, params: tuple) -> tuple[list[tuple], int]:
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            return self._run(connection, sql, params)
        if self.dialect == "sqlite":
            with self._lock, self._sqlite:  # the connection is shared by threads: serialise its use
                if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                    begin_immediate(self._sqlite, self._path)  # a writer waits there, not in SQLite's busy handler
                return self._run(self._sqlite, sql, params)
        with self._pool.connection() as connection:
            return self._run(connection, sql, params)

    def _run(self, connection: Any, sql: str, params: tuple) -> tuple[list[tuple], int]:
        """Rows and row count of one statement (the count read here, not later from shared state: another
        thread's statement may have run in between)."""
        if self.dialect == "postgres":
            sql = sql.replace("?", "%s")
        cursor = connection.execute(sql, params)
        rows = cursor.fetchall() if cursor.description else []
        return rows, cursor.rowcount

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pool is not None:
            self._pool.close()


_databases: dict[str, Database] = {}
_databases_lock = threading.Lock()


def database_url(settings: Any) -> str:
    """The database of a deployment: ``MGMFLOW_DATABASE_URL``, else the SQLite file under ``MGMFLOW_HOME``."""
    if settings.database_url:
        return settings.database_url
    return f"sqlite:///{Path(settings.home).expanduser() / SQLITE_FILE}"


def open_database(settings: Any) -> Database:
    """The process-wide :class:`Database` of ``settings`` (opened, and set up, on first use)."""
    url = database_url(settings)
    with _databases_lock:
        if url not in _databases:
            _databases[url] = _open(url)
        return _databases[url]


def _open(url: str) -> Database:
    if url.startswith("sqlite:///"):
        return _open_sqlite(Path(url.removeprefix("sqlite:///")))
    if url.startswith(("postgresql://", "postgres://")):
        return _open_postgres(url)
    raise InvalidInputError(f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://…")


class _FencedWrites:
    """The saver's two writes (``put``, ``put_writes``) of a driver's config (``LEASE_KEY``) run in the saver's
    ``_lease_held`` transaction, which checks the driver's lease; writes of any other config as the saver makes them."""

    @contextlib.contextmanager
    def _fenced(self, config):
        if LEASE_KEY not in config["configurable"]:
            yield
            return
        faults.point("checkpoint.write", run_id=config["configurable"][LEASE_KEY][0])
        with self._lease_held(config):
            yield

    def put(self, config, checkpoint, metadata, new_versions):
        with self._fenced(config):
            return super().put(config, checkpoint, metadata, new_versions)

    def put_writes(self, config, writes, task_id, task_path=""):
        with self._fenced(config):
            return super().put_writes(config, writes, task_id, task_path)


def _fenced_sqlite_saver(connection: sqlite3.Connection, path: Path) -> BaseCheckpointSaver:
    from langgraph.checkpoint.sqlite import SqliteSaver

    class FencedSqliteSaver(_FencedWrites, SqliteSaver):
        """Writes of a driver's config commit only while its lease holds, in one transaction."""

        def __init__(self, conn, path):
            super().__init__(conn)
            self.path = path
            # The fenced write holds it around the saver's own cursor(); so does every transaction on the connection.
            self.lock = threading.RLock()
            faults.hold_during_stops(self.lock)

        @contextlib.contextmanager
        def _lease_held(self, config):
            with self.lock:
                begin_immediate(self.conn, self.path)  # the write lock first: a takeover commits before or after us
                try:
                    _check_lease(self.conn, config, postgres=False)
                    faults.point("checkpoint.locked", run_id=config["configurable"][LEASE_KEY][0])
                    yield  # the saver's cursor() commits
                except BaseException:
                    self.conn.rollback()
                    raise

    return FencedSqliteSaver(connection, path)


class _OneByOne:
    """A cursor whose ``executemany`` runs one statement at a time. psycopg pipelines ``executemany``, and a process
    stopped mid-pipeline leaves its server session waiting for the pipeline's end, which no idle-in-transaction
    timeout ends; between whole statements it does (see ``end_stalled_transactions``)."""

    def __init__(self, cursor: Any):
        self._cursor = cursor

    def executemany(self, query: str, params_seq) -> None:
        for params in params_seq:
            self._cursor.execute(query, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


def _fenced_postgres_saver(pool: Any) -> BaseCheckpointSaver:
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg.rows import dict_row

    class FencedPostgresSaver(_FencedWrites, PostgresSaver):
        """Writes of a driver's config run in one transaction with a check of its lease, which locks the run's row
        until they commit."""

        def __init__(self, conn):
            super().__init__(conn)
            self._local = threading.local()  # .connection: this thread's fenced transaction

        @contextlib.contextmanager
        def _lease_held(self, config):
            with self.conn.connection() as connection, connection.transaction():
                _check_lease(connection, config, postgres=True)
                self._local.connection = connection
                try:
                    yield
                finally:
                    self._local.connection = None

        @contextlib.contextmanager
        def _cursor(self, *, pipeline: bool = False):
            connection = getattr(self._local, "connection", None)
            if connection is None:
                with super()._cursor(pipeline=pipeline) as cursor:
                    yield cursor
                return
            with connection.cursor(binary=True, row_factory=dict_row) as cursor:
                yield _OneByOne(cursor)

    return FencedPostgresSaver(pool)


def _open_sqlite(path: Path) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    # check_same_thread=False is safe: every use holds the saver's lock.
    connection = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    connection.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer across processes
    # In WAL mode NORMAL loses no integrity, only the last commits on a power cut (not on a process crash), and
    # spares an fsync per commit.
    connection.execute("PRAGMA synchronous=NORMAL")  # (the busy timeout is connect()'s timeout)
    saver = _fenced_sqlite_saver(connection, path)
    saver.setup()
    return Database(f"sqlite:///{path}", saver, "sqlite", _sqlite=connection, _lock=saver.lock)


def _open_postgres(url: str) -> Database:
    from psycopg.rows import dict_row, tuple_row
    from psycopg_pool import ConnectionPool

    # The saver needs dict rows; run records use their own pool with plain tuples.

    def end_stalled_transactions(connection) -> None:
        # A driver stopped inside a fenced write would hold its run's row lock, and with it every takeover, for as
        # long as it stays stopped: the server ends such a transaction instead.
        connection.execute(f"SET idle_in_transaction_session_timeout = '{FENCE_STALL_S}s'")

    saver_pool = ConnectionPool(url, kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
                                configure=end_stalled_transactions, min_size=1, max_size=8,
                                check=ConnectionPool.check_connection, open=True)
    saver = _fenced_postgres_saver(saver_pool)
    saver.setup()
    records_pool = ConnectionPool(url, kwargs={"autocommit": True, "row_factory": tuple_row}, min_size=1, max_size=8,
                                  check=ConnectionPool.check_connection, open=True)
    return Database(url, saver, "postgres", _pool=records_pool)
