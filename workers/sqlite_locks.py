"""Taking a SQLite file's write lock when several processes of one machine share it (embedded runs, a CLI beside an
API server, orchestration workers on one home).

A process stopped inside a write transaction (Ctrl-Z, a debugger, a paused VM) keeps the lock for as long as it
stays stopped: SQLite has no server to end its transaction, so every other writer must wait for it to resume or
die. A writer waiting on such a process says so, naming it, and waits on instead of failing its work; a lock held
this long by a process that is running is a fault, raised after the busy timeout as before.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000  # several processes may share one SQLite file
NOTICE_AFTER_S = 5.0  # a write transaction takes milliseconds: a writer waiting this long looks for the holder
# The WAL index (the "-shm" file) holds SQLite's WAL locks from this byte on; the first is the write lock.
_WAL_WRITE_LOCK_BYTE = 120


def begin_immediate(connection: sqlite3.Connection, path: str | Path) -> None:
    """``BEGIN IMMEDIATE`` on ``connection`` (to the file ``path``), retried every 0.1 to 2 ms while another
    process holds the write lock. SQLite's own busy handler sleeps 1, 2, 5, 10 … 100 ms between tries: under
    contention from other processes it turns waits for sub-millisecond transactions into tail latencies of tens or
    hundreds of ms. Past the busy timeout it raises ``sqlite3.OperationalError``, unless the holder is stopped."""
    started = time.monotonic()
    deadline, delay, next_look, told = started + BUSY_TIMEOUT_MS / 1000, 0.0001, started + NOTICE_AFTER_S, None
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                if told:
                    logger.warning("%s: process %d resumed; writing again", Path(path).name, told)
                return
            except sqlite3.OperationalError as error:
                if "locked" not in str(error):
                    raise
            now = time.monotonic()
            if now >= next_look:
                next_look = now + 1.0
                holder = write_lock_holder(path)
                if holder is not None and process_stopped(holder):
                    deadline = now + BUSY_TIMEOUT_MS / 1000  # the stall ends when it resumes or dies, not before
                    if told != holder:
                        told = holder
                        logger.warning("%s: process %d holds its write lock and is stopped; every writer waits until "
                                       "it resumes (kill -CONT %d) or ends", Path(path).name, holder, holder)
            if now >= deadline:
                raise sqlite3.OperationalError(f"database is locked: {Path(path).name}'s write lock was held for "
                                               f"{now - started:.0f} s")
            time.sleep(delay)
            delay = min(2 * delay, 0.002)
    finally:
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def write_lock_holder(path: str | Path) -> int | None:
    """The pid of the process holding the WAL write lock of the database at ``path``, from ``/proc/locks`` (Linux;
    None elsewhere, or when no other process holds it). Never by ``fcntl(F_GETLK)``: opening and closing the file in
    this process would drop the POSIX locks its own SQLite connections hold on it."""
    if sys.platform != "linux":
        return None
    try:
        shm = os.stat(f"{path}-shm")
        locks = Path("/proc/locks").read_text()
    except OSError:
        return None
    for line in locks.splitlines():
        # "1: POSIX  ADVISORY  WRITE 7939 fe:00:2147070 120 120"
        fields = line.split()
        if len(fields) < 8 or fields[1] != "POSIX" or fields[3] != "WRITE":
            continue
        major, minor, inode = fields[5].split(":")
        start, end = int(fields[6]), fields[7]
        if ((int(inode), os.makedev(int(major, 16), int(minor, 16))) == (shm.st_ino, shm.st_dev)
                and start <= _WAL_WRITE_LOCK_BYTE and (end == "EOF" or int(end) >= _WAL_WRITE_LOCK_BYTE)):
            return int(fields[4])
    return None


def process_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, Ctrl-Z, a debugger): state T or t in ``/proc``. False when unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False
