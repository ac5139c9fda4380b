"""Fault points: named instants in the durable paths where a test (or the soak bench) stops a process.

    faults.point("step.acquired", task_id=...)

does nothing unless the process was started with ``MGMFLOW_FAULTS`` naming that point. Then, at the point's
n-th arrival in this process (``name@n``, default the first), it appends ``name pid {info}`` to the file
``MGMFLOW_FAULTS_LOG`` (the test watches it) and

- ``name=stop``: stops the whole process (SIGSTOP to itself), as a stall would; it goes on after SIGCONT. The stop
  comes between the process's database transactions (it first takes the locks registered with
  :func:`hold_during_stops`), as the point's instant says: a stall inside a transaction is a point placed inside one;
- ``name=block``: blocks the arriving thread for good (the test kills the process or interrupts it there);
  ``block@0`` blocks every arrival.

So a test injects a kill -9, a SIGSTOP or a Ctrl-C at the exact instant that matters, never after a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading

_lock = threading.Lock()
_arrivals: dict[str, int] = {}


def _armed() -> dict[str, tuple[str, int]]:
    """``MGMFLOW_FAULTS="step.acquired=stop,driver.parked=block@2"`` → {point: (action, arrival)}."""
    armed = {}
    for entry in filter(None, (part.strip() for part in os.environ.get("MGMFLOW_FAULTS", "").split(","))):
        name, _, rest = entry.partition("=")
        action, _, nth = (rest or "stop").partition("@")
        armed[name] = (action, int(nth or 1))
    return armed


_ARMED = _armed()
_transaction_locks: list = []


def hold_during_stops(lock) -> None:
    """Register a re-entrant lock that each of this process's transactions on some database holds throughout: a
    ``stop`` waits for the open transaction to end and holds the lock while stopped, so no other thread of the
    process is stopped inside one (a SQLite file's write lock would be held for as long as the stall lasts)."""
    _transaction_locks.append(lock)


def point(name: str, **info) -> None:
    """Announce and act if ``name`` is armed for this arrival; a no-op otherwise (the common case)."""
    if name not in _ARMED:
        return
    action, nth = _ARMED[name]
    with _lock:
        _arrivals[name] = _arrivals.get(name, 0) + 1
        if _arrivals[name] != nth and nth != 0:
            return
        with open(os.environ["MGMFLOW_FAULTS_LOG"], "a") as log:
            log.write(f"{name} {os.getpid()} {json.dumps(info)}\n")
    if action == "block":
        threading.Event().wait()
    with contextlib.ExitStack() as held:
        for lock in _transaction_locks:
            held.enter_context(lock)
        # To this thread, not the process: a process-directed SIGSTOP may be taken by another thread, and this one
        # would run on (out of the point, into the next transaction) until the kernel stops it as well.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
