"""The main job from the command line, embedded: Ctrl-C, then the same command continues from its checkpoint
in a second process, and no finished step runs again. Plus the CLI's answers to bad input."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from testkit import wait_for

MGMFLOW = str(Path(sys.executable).parent / "mgmflow")
pytestmark = pytest.mark.timeout(400)


def _env(home: Path) -> dict:
    # short leases: the interrupted process's steps are taken over within seconds
    return {**os.environ, "MGMFLOW_HOME": str(home), "OMP_NUM_THREADS": "1", "MGMFLOW_LEASE_S": "2",
            "MGMFLOW_VISIBILITY_TIMEOUT_S": "3"}


def _executions(home: Path) -> dict[str, tuple[str, int]]:
    """Every step's (status, completed executions), from the embedded task records."""
    if not (home / "tasks.sqlite").exists():
        return {}
    with sqlite3.connect(home / "tasks.sqlite") as db:
        try:
            rows = db.execute("SELECT task_id, status, executions FROM tasks").fetchall()
        except sqlite3.OperationalError:  # the table is being created
            return {}
    return {task_id: (status, executions) for task_id, status, executions in rows}


def test_ctrl_c_then_the_same_command_continues(tmp_path):
    home, out = tmp_path / "home", tmp_path / "board"
    command = [MGMFLOW, "run", "story", "--premise", "A kite escapes into a thunderstorm.", "--pages", "2",
               "--seed", "11", "--rounds", "1", "--steps", "2", "--out", str(out)]
    # Ctrl-C as in a terminal: a shell that starts a job in the background without job control (CI scripts,
    # `cmd &`) makes it ignore SIGINT, and Python then keeps ignoring it; the test must not inherit that.
    first = subprocess.Popen(command, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # interrupt once the run has finished model steps of its own (the scene list at least)
        done = wait_for(lambda: [t for t, (status, _) in _executions(home).items() if status == "done"], 240,
                        "a finished step")
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 130, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert "run the same command again" in first.stderr.read()
    assert not (out / "manifest.json").exists()
    before = _executions(home)

    second = subprocess.run(command, env=_env(home), capture_output=True, text=True, timeout=360)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing run" in second.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [page["page"] for page in manifest["pages"]] == [1, 2]
    assert all((out / page["image"]).read_bytes()[:4] == b"\x89PNG" for page in manifest["pages"])
    after = _executions(home)
    for task_id in done:
        assert after[task_id] == before[task_id] == ("done", 1), task_id  # not executed again
    # Executions count starts of work: a step Ctrl-C stopped mid-work starts once more; any other step once.
    interrupted = {task_id for task_id, (status, count) in before.items() if status != "done" and count == 1}
    assert all(count == (2 if task_id in interrupted else 1) for task_id, (status, count) in after.items()
               if status == "done"), (after, interrupted)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["run", "nope"], "unknown workflow 'nope'"),
        (["run", "story", "--premise", "x", "--pages", "65", "--out", "o"], "pages: Input should be less than"),
        (["run", "story", "--premise", "   ", "--out", "o"], "the premise is empty"),
        (["run", "story", "--premise", "x" * 9000, "--out", "o"], "the premise is 9,000 bytes"),
        (["run", "story", "--premise", "x", "--rounds", "0", "--out", "o"], "rounds: Input should be greater"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, arguments, message):
    result = subprocess.run([MGMFLOW, *arguments], env=_env(tmp_path), capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()
