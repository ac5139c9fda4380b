"""The fault points themselves: a ``stop`` stops the process at the point's instant, and between its transactions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from fault_support import FaultLog, resume, stopped
from testkit import wait_for

# Thread "arriving" reaches the point; everything it does afterwards is written to ``trace``.
CHILD = textwrap.dedent("""
    import sys, threading
    from mgmflow.workers import faults

    trace = open(sys.argv[1], "a")

    def note(word):
        trace.write(word + " ")
        trace.flush()

    transaction = threading.RLock()
    faults.hold_during_stops(transaction)
    in_transaction = threading.Event()

    def other():  # another thread of the process, inside a transaction when the point is reached
        with transaction:
            note("begin")
            in_transaction.set()
            for _ in range(2_000_000):  # busy, as a statement would be
                pass
            note("commit")

    def arriving():
        in_transaction.wait()
        faults.point("test.point")
        note("after-point")

    threads = [threading.Thread(target=other), threading.Thread(target=arriving)]
    for thread in threads:
        thread.start()
    for thread in reversed(threads):  # the main thread sleeps while the point is reached, as a process's would
        thread.join()
""")


def test_a_stop_comes_at_the_point_and_after_the_open_transaction(tmp_path):
    faults, trace = FaultLog(tmp_path), tmp_path / "trace"
    trace.touch()
    env = {key: value for key, value in os.environ.items() if not key.startswith("MGMFLOW_")}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(trace)], env={**env, **faults.env("test.point=stop")},
                             stderr=subprocess.PIPE, text=True)
    try:
        pid, _ = faults.wait("test.point", check=lambda: child.poll() is None or pytest.fail(child.stderr.read()))
        wait_for(lambda: stopped(pid), 10, "every thread of the process to stop")
        # the other thread's transaction ended before the stop; the arriving thread did nothing past the point
        assert trace.read_text() == "begin commit "
        resume(pid)
        assert child.wait(30) == 0, child.stderr.read()
        assert trace.read_text() == "begin commit after-point "
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
