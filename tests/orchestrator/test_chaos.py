"""Chaos with real parts: story runs on `mgmflow worker` processes (GPU queues with several threads each, and
orchestration), a private redis-server with AOF and PostgreSQL, under the settings users run (10 s leases, an
hour of visibility timeout as with real models). Faults land at hooked instants (``mgmflow.workers.faults``: the process
stops itself there and the test acts), never after a sleep:

- kill -9 of a GPU worker between recording a step's outcome and sending its completion notice;
- kill -9 of a driver between creating a step's record and publishing its message (the message is lost);
- SIGSTOP of a GPU worker holding a step, past its lease (another takes it over; the stalled one wakes);
- SIGSTOP of a driver about to write a checkpoint, while another takes the run over (then it wakes);
- kill -9 of Redis with steps in flight, restarted on its AOF, under multi-threaded workers.

Every run ends with all its pages, PNG bytes identical to an undisturbed run's, every step's work started
exactly once (counted by the workers where it starts) and recorded once, nothing left running or queued.
(Ctrl-C at the park instant is in ``test_embedded_durability``: the CLI drives runs only when embedded.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from fault_support import FaultLog, owner_pid, resume, stopped, taken_over
from testkit import wait_for
from worker_support import Services

pytestmark = [pytest.mark.services, pytest.mark.timeout(900)]
STORY = {"premise": "A lighthouse keeper befriends a whale.", "pages": 2, "seed": 5, "rounds": 1, "steps": 4}
# The defaults users run, with the visibility timeout of real models: recovery may not wait for it.
SETTINGS = {"lease_s": 10.0, "visibility_timeout_s": 3600.0, "max_deliveries": 3}
GPU = "vlm,diffusion,edit"


class Chaos:
    def __init__(self, folder, home, database_url):
        self.services = Services(folder, home)
        self.faults = FaultLog(folder)
        self.redis = self.services.redis(persistent=True)
        self.settings = {**SETTINGS, "database_url": database_url}
        self.gpus, self.drivers = [], []

    def start(self, role: str, count: int, faults: str = "") -> list:
        """Replace every worker of ``role`` by ``count`` new ones, armed with ``faults``."""
        old = self.gpus if role == "gpu" else self.drivers
        for worker in old:
            worker.kill()
        armed = {"faults": faults, "faults_log": self.faults.path} if faults else {}
        started = [self.services.worker(self.redis, GPU if role == "gpu" else "orchestrator",
                                        **self.settings, **armed) for _ in range(count)]
        for worker in started:
            worker.wait_ready(240)
        old[:] = started
        return started

    def service(self):
        from mgmflow.orchestrator.runs import RunService

        return RunService(self.services.settings(self.redis, **self.settings))

    def arrival(self, point: str, workers: list) -> int:
        """The pid of the first of ``workers`` to stop at ``point``."""
        pids = {worker.process.pid for worker in workers}
        pid = wait_for(lambda: [pid for pid, _ in self.faults.arrivals(point) if pid in pids], 240,
                       f"a worker at {point}", interval=0.05)[0]
        wait_for(lambda: stopped(pid), 10, "the process to stop")
        return pid

    def until(self, predicate, what: str, keep_stopped: frozenset = frozenset(), timeout: float = 300):
        """Wait for ``predicate()``, resuming meanwhile any armed process (but ``keep_stopped``) that stops at its
        point: only the first arrival is the fault."""
        def reached():
            for pid in set(self.faults.arrivals_any()) - keep_stopped:
                if _alive(pid) and stopped(pid):
                    resume(pid)
            return predicate()

        return wait_for(reached, timeout, what, interval=0.2)

    def finish(self, service, run_id: str, keep_stopped: frozenset = frozenset()):
        return self.until(lambda: (run := service.get_run(run_id)).done and run, f"run {run_id} to end",
                          keep_stopped)

    def close(self):
        self.services.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return os.path.exists(f"/proc/{pid}/stat") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except ProcessLookupError:
        return False


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, mgmflow_home, module_postgres_url):
    stack = Chaos(tmp_path_factory.mktemp("chaos"), mgmflow_home, module_postgres_url)
    stack.start("gpu", 2)
    stack.start("driver", 1)
    yield stack
    stack.close()


@pytest.fixture(scope="module")
def undisturbed(chaos):
    """The PNG bytes of an undisturbed run, page by page."""
    service = chaos.service()
    run = service.create_run("story", STORY)
    final = chaos.finish(service, run.run_id)
    return _checked(service, final)


def _checked(service, final, stalled: int | None = None) -> dict[str, bytes]:
    """Assert what every run must end with; return its pages' PNG bytes. Each step's work started once, but for
    the steps a stalled worker (pid ``stalled``) was in the middle of: another worker took them over, so their work
    started exactly twice (their outcome is still recorded once)."""
    assert final.status == "success", final.error
    client = service.orchestrator.client
    task_ids = sorted(client.records.redis.smembers(f"mgmflow:run:{final.run_id}:tasks"))
    records = {task_id: client.get(task_id) for task_id in task_ids}
    events = list(service.all_events(final.run_id))
    interrupted = taken_over(events, records, stalled) if stalled is not None else set()
    assert task_ids and {task_id: (r.status, r.executions) for task_id, r in records.items()} == {
        task_id: ("done", 2 if task_id in interrupted else 1) for task_id in task_ids}
    finished = [event.data["task_id"] for event in events if event.type == "task.finished"]
    assert sorted(finished) == task_ids  # each step's outcome recorded exactly once
    assert not client.records.redis.zrange("mgmflow:watch", 0, -1)  # nothing left running or queued
    values = service.output_values(final)
    assert sorted(values["chosen"]) == ["page-01", "page-02"]
    return {page: service.orchestrator.store.get(artifact, scope=final.scope)
            for page, artifact in values["chosen"].items()}


def test_a_gpu_worker_killed_before_its_completion_notice(chaos, undisturbed):
    workers = chaos.start("gpu", 2, "step.finished=stop")
    service = chaos.service()
    run = service.create_run("story", STORY)
    victim = chaos.arrival("step.finished", workers)
    os.kill(victim, signal.SIGKILL)  # the step is recorded done; its notice is never sent
    assert _checked(service, chaos.finish(service, run.run_id)) == undisturbed


def test_a_driver_killed_between_a_steps_record_and_its_message(chaos, undisturbed):
    drivers = chaos.start("driver", 2, "submit.registered=stop")
    service = chaos.service()
    run = service.create_run("story", STORY)
    victim = chaos.arrival("submit.registered", drivers)
    os.kill(victim, signal.SIGKILL)  # a record "queued", and no message anywhere
    started = time.monotonic()
    assert _checked(service, chaos.finish(service, run.run_id)) == undisturbed
    assert time.monotonic() - started < 120  # not the visibility timeout (an hour)


def test_a_gpu_worker_stalled_past_its_lease(chaos, undisturbed):
    workers = chaos.start("gpu", 2, "step.acquired=stop")
    service = chaos.service()
    run = service.create_run("story", STORY)
    stalled = chaos.arrival("step.acquired", workers)
    (task_id,) = [info["task_id"] for pid, info in chaos.faults.arrivals("step.acquired") if pid == stalled]
    client = service.orchestrator.client
    # its lease lapses; the step is sent again and taken over by the other worker, which records it
    chaos.until(lambda: client.get(task_id).status == "done", "the takeover", keep_stopped=frozenset({stalled}))
    resume(stalled)  # wakes with the step no longer its own: it stops, recording nothing
    assert _checked(service, chaos.finish(service, run.run_id), stalled=stalled) == undisturbed
    assert client.get(task_id).executions == 1  # the stall came before its work started: it ran once, elsewhere
    assert all(worker.process.poll() is None for worker in workers)


def test_a_driver_stalled_while_another_takes_the_run_over(chaos, undisturbed):
    drivers = chaos.start("driver", 2, "checkpoint.write=stop@3")
    service = chaos.service()
    run = service.create_run("story", STORY)
    stalled = chaos.arrival("checkpoint.write", drivers)
    final = chaos.finish(service, run.run_id, keep_stopped=frozenset({stalled}))  # the other driver takes over
    resume(stalled)  # the stale driver's checkpoint write is refused
    time.sleep(1)
    assert _checked(service, final) == undisturbed
    assert service.get_run(run.run_id).status == "success"
    history = service.thread_history(final.thread_id, limit=1000)
    parents = [entry["checkpoint_id"] for entry in history]
    assert len(parents) == len(set(parents))


def test_redis_killed_and_restarted_on_its_aof_under_multithreaded_workers(chaos, undisturbed):
    workers = chaos.start("gpu", 2)
    service = chaos.service()
    run = service.create_run("story", STORY)
    service.orchestrator.client.wait_for_event(run.run_id, lambda event: event.type == "task.step", timeout=120)
    chaos.redis.kill()
    time.sleep(1)
    chaos.redis.start()
    assert _checked(service, chaos.finish(service, run.run_id)) == undisturbed
    assert all(worker.process.poll() is None for worker in [*workers, *chaos.drivers])  # none went down
