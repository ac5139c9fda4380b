"""A SQLite writer waiting on another process: a stopped holder is named and waited for (its stall ends when it
resumes), a running one that holds the lock past the busy timeout is an error."""

from __future__ import annotations

import logging
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest
from fault_support import resume, stopped
from testkit import wait_for

from mgmflow.workers import sqlite_locks
from mgmflow.workers.sqlite_locks import begin_immediate, write_lock_holder

# Takes the write lock, writes a row, then stops (or, with "run", waits on its stdin) before it commits.
HOLDER = textwrap.dedent("""
    import signal, sqlite3, sys, threading
    db = sqlite3.connect(sys.argv[1], isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO notes VALUES ('from the holder')")
    print("locked", flush=True)
    if sys.argv[2] == "stop":
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
    else:
        sys.stdin.read()
    db.execute("COMMIT")
""")


@pytest.fixture
def database(tmp_path, monkeypatch):
    path = tmp_path / "notes.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE notes (text TEXT)")
    monkeypatch.setattr(sqlite_locks, "BUSY_TIMEOUT_MS", 1000)
    monkeypatch.setattr(sqlite_locks, "NOTICE_AFTER_S", 0.2)
    return path


def _holder(path, mode: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_stopped_holder_is_named_and_waited_for_past_the_busy_timeout(database, caplog):
    holder = _holder(database, "stop")
    try:
        wait_for(lambda: stopped(holder.pid), 10, "the holder to stop")
        assert write_lock_holder(database) == holder.pid
        connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        began = threading.Event()
        waiter = threading.Thread(target=lambda: (begin_immediate(connection, database), began.set()), daemon=True)
        with caplog.at_level(logging.WARNING, logger=sqlite_locks.__name__):
            waiter.start()
            wait_for(lambda: f"process {holder.pid} holds its write lock and is stopped" in caplog.text, 10,
                     "the notice naming the stopped holder")
            assert not began.wait(3 * sqlite_locks.BUSY_TIMEOUT_MS / 1000)  # no error either: the thread still waits
            assert waiter.is_alive()
            resume(holder.pid)
            assert began.wait(10)
        assert f"process {holder.pid} resumed" in caplog.text
        assert holder.wait(10) == 0
        # it began after the holder's commit, so it reads the holder's row
        assert connection.execute("SELECT text FROM notes").fetchall() == [("from the holder",)]
        connection.execute("COMMIT")
        assert write_lock_holder(database) is None
    finally:
        holder.kill()


def test_a_running_holder_past_the_busy_timeout_is_an_error(database, caplog):
    holder = _holder(database, "run")
    try:
        assert write_lock_holder(database) == holder.pid
        connection = sqlite3.connect(database, isolation_level=None)
        with caplog.at_level(logging.WARNING, logger=sqlite_locks.__name__), \
                pytest.raises(sqlite3.OperationalError, match="database is locked"):
            begin_immediate(connection, database)
        assert "stopped" not in caplog.text
        holder.stdin.close()  # it commits and ends; the lock is free
        assert holder.wait(10) == 0
        begin_immediate(connection, database)
        connection.execute("ROLLBACK")
    finally:
        holder.kill()
