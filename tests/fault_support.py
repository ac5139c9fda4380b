"""Fault injection at hooked instants (``mgmflow.workers.faults``): arm points in a process's environment, wait until the
process reaches one (it then stops itself, or blocks the arriving thread), and act on it: SIGKILL, SIGSTOP-length
stalls, SIGINT."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from testkit import wait_for


class FaultLog:
    def __init__(self, folder: Path):
        self.path = folder / "faults.log"
        self.path.touch()

    def env(self, points: str) -> dict[str, str]:
        """Variables arming ``points`` (``"step.acquired=stop,driver.parked=block@2"``) in a process."""
        return {"MGMFLOW_FAULTS": points, "MGMFLOW_FAULTS_LOG": str(self.path)}

    def arrivals(self, point: str) -> list[tuple[int, dict]]:
        lines = [line.split(" ", 2) for line in self.path.read_text().splitlines()]
        return [(int(pid), json.loads(info)) for name, pid, info in lines if name == point]

    def arrivals_any(self) -> list[int]:
        """The pids of every arrival so far, at any point."""
        return [int(line.split(" ", 2)[1]) for line in self.path.read_text().splitlines()]

    def wait(self, point: str, timeout: float = 240, check=None) -> tuple[int, dict]:
        """(pid, info) of the first process to reach ``point``; ``check()`` may raise meanwhile (a process died)."""
        def reached():
            if check is not None:
                check()
            return self.arrivals(point)

        return wait_for(reached, timeout, f"a process at fault point {point}", interval=0.05)[0]


def stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T): a process that stopped itself at a fault point. The
    main thread's state alone shows a group stop only begun: other threads may still run for a moment."""
    states = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:  # a thread that has just ended
            continue
    return bool(states) and all(state in ("T", "t") for state in states)


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def owner_pid(owner: str) -> int:
    return int(owner.split(":")[1])  # owners are "host:pid:nonce"


def taken_over(events: list, records: dict, pid: int) -> set[str]:
    """The steps worker ``pid`` (killed or stalled) was in the middle of: it started them and another worker
    recorded them. Their work starts exactly twice; every other step's once. With pages moving on independently,
    a worker may be drawing one page while it writes another page's prompt: both are its steps."""
    return {event.data["task_id"] for event in events if event.type == "task.started"
            and owner_pid(event.data["owner"]) == pid and owner_pid(records[event.data["task_id"]].owner) != pid}
