"""The main job (embedded, SQLite, the default leases) stopped at exact instants by fault points
(``mgmflow.workers.faults``), then the same command again: it ends with every page, and a stale driver cannot fork the
thread's checkpoint history."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fault_support import FaultLog, resume, stopped
from testkit import wait_for

MGMFLOW = str(Path(sys.executable).parent / "mgmflow")
COMMAND = ["run", "story", "--premise", "A kite escapes into a thunderstorm.", "--pages", "2", "--seed", "11",
           "--rounds", "1", "--steps", "2"]
pytestmark = pytest.mark.timeout(400)


def _env(home: Path, **extra) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MGMFLOW_")}
    return {**env, "MGMFLOW_HOME": str(home), "OMP_NUM_THREADS": "1", **extra}  # default lease and timeouts


def _start(home: Path, out: Path, stderr=subprocess.PIPE, **extra) -> subprocess.Popen:
    # Ctrl-C as in a terminal (a background CI job would otherwise inherit SIGINT ignored)
    return subprocess.Popen([MGMFLOW, *COMMAND, "--out", str(out)], env=_env(home, **extra), stdout=subprocess.PIPE,
                            stderr=stderr, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _run(home: Path, out: Path, timeout: float = 240, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([MGMFLOW, *COMMAND, "--out", str(out)], env=_env(home, **extra), capture_output=True,
                          text=True, timeout=timeout)


def _pages(out: Path) -> dict[int, bytes]:
    manifest = json.loads((out / "manifest.json").read_text())
    return {page["page"]: (out / page["image"]).read_bytes() for page in manifest["pages"]}


def _forks(home: Path) -> list:
    """Checkpoints of the root graph sharing a parent: a forked history."""
    with sqlite3.connect(home / "checkpoints.sqlite") as db:
        return db.execute("SELECT parent_checkpoint_id, COUNT(*) FROM checkpoints WHERE checkpoint_ns = '' AND "
                          "parent_checkpoint_id IS NOT NULL GROUP BY thread_id, parent_checkpoint_id "
                          "HAVING COUNT(*) > 1").fetchall()


def _executions(home: Path) -> dict[str, tuple[str, int]]:
    with sqlite3.connect(home / "tasks.sqlite") as db:
        return {task: (status, count) for task, status, count in
                db.execute("SELECT task_id, status, executions FROM tasks")}


def test_a_driver_stalled_while_another_takes_over_cannot_fork_the_run(tmp_path):
    home, out, faults = tmp_path / "home", tmp_path / "board", FaultLog(tmp_path)
    stalled = _start(home, out, **faults.env("checkpoint.write=stop@8"))
    try:
        pid, _ = faults.wait("checkpoint.write", check=lambda: stalled.poll() is None or pytest.fail(stalled.stderr.read()))
        wait_for(lambda: stopped(pid), 10, "the driver to stop")
        # the same command takes the run over once the stalled driver's lease lapses, and completes it
        second = _run(home, out)
        assert second.returncode == 0 and "continuing run" in second.stderr, second.stderr[-3000:]
        pages = _pages(out)
        assert sorted(pages) == [1, 2]
        resume(pid)  # the stale driver wakes: its next checkpoint write must be refused
        assert stalled.wait(120) == 0, stalled.stderr[-3000:]
    finally:
        if stalled.poll() is None:
            os.kill(stalled.pid, signal.SIGKILL)
    third = _run(home, out)  # the finished run's outputs again: its own, whatever the thread holds
    assert third.returncode == 0, third.stderr[-3000:]
    assert _pages(out) == pages
    assert _forks(home) == []


def test_a_driver_stopped_inside_its_checkpoint_write_is_named_and_waited_for(tmp_path):
    """SQLite has no server to end a stopped process's transaction (a Ctrl-Z'd run in another terminal): the same
    command waits for it, names it, and goes on once it resumes; neither run fails and the history does not fork."""
    home, out, faults = tmp_path / "home", tmp_path / "board", FaultLog(tmp_path)
    stalled = _start(home, out, **faults.env("checkpoint.locked=stop@8"))
    second, stderr = None, tmp_path / "second.stderr"
    try:
        pid, _ = faults.wait("checkpoint.locked", check=lambda: stalled.poll() is None or pytest.fail(stalled.stderr.read()))
        wait_for(lambda: stopped(pid), 10, "the driver to stop")
        with stderr.open("w") as sink:
            second = _start(home, out, stderr=sink)
        notice = f"process {pid} holds its write lock and is stopped"
        wait_for(lambda: notice in stderr.read_text() or second.poll() is not None, 120, "the notice")
        assert second.poll() is None, stderr.read_text()[-3000:]  # it waits: no error, no run failed
        resume(pid)
        assert second.wait(240) == 0, stderr.read_text()[-3000:]
        assert stalled.wait(120) == 0, stalled.stderr.read()[-3000:]
    finally:
        for process in (stalled, second):
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
    assert sorted(_pages(out)) == [1, 2]
    assert _forks(home) == []
    assert {status for status, count in _executions(home).values()} == {"done"}


@pytest.mark.parametrize("lease", [None, "60"], ids=["default-lease", "60s-lease"])
def test_ctrl_c_at_the_park_instant_then_the_same_command_at_once(tmp_path, lease):
    """The rerun must not wait out the dead process's lease (with the default 10 s the rerun's own start-up may
    outlast it on a loaded machine; 60 s shows the case it does not)."""
    home, out, faults = tmp_path / "home", tmp_path / "board", FaultLog(tmp_path)
    leases = {"MGMFLOW_LEASE_S": lease} if lease else {}
    # the driver stops right after recording its first park, holding the run's lease; no step's work starts here
    first = _start(home, out, **leases, **faults.env("driver.parked=block,step.acquired=block@0"))
    try:
        faults.wait("driver.parked", check=lambda: first.poll() is None or pytest.fail(first.stderr.read()))
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    started = time.monotonic()
    second = _run(home, out, timeout=180, **leases)  # within the dead process's lease
    assert second.returncode == 0, second.stderr[-3000:]
    if lease:  # it took the dead process's lease over instead of waiting it out
        assert time.monotonic() - started < float(lease)
    assert sorted(_pages(out)) == [1, 2]
    assert {count for status, count in _executions(home).values()} == {1}
    assert {status for status, count in _executions(home).values()} == {"done"}
