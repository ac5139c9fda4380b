"""Distributed runs with real parts: a private redis-server, `mgmflow worker` subprocesses (GPU queues and
orchestration), checkpoints and run records in the machine's PostgreSQL.

One story run survives kill -9 of its orchestration worker (killed on its first node event, while it drives the
graph) and of the GPU worker running a diffusion step (killed on that step's progress event): it completes, and
no finished step runs again.
"""

from __future__ import annotations

import pytest

from fault_support import owner_pid, taken_over
from worker_support import Services

pytestmark = [pytest.mark.services, pytest.mark.timeout(420)]


@pytest.fixture
def services(tmp_path, mgmflow_home):
    started = Services(tmp_path, mgmflow_home)
    yield started
    started.close()



def test_story_survives_kill_9_of_orchestration_and_gpu_workers(services, postgres_url):
    from mgmflow.orchestrator.runs import RunService

    redis = services.redis()
    database = {"database_url": postgres_url}
    gpus = [services.worker(redis, "vlm,diffusion,edit", **database) for _ in range(2)]
    first_driver = services.worker(redis, "orchestrator", **database)
    for worker in (*gpus, first_driver):
        worker.wait_ready(240)

    service = RunService(services.settings(redis, **database))
    client = service.orchestrator.client
    run = service.create_run("story", {"premise": "A lighthouse keeper befriends a whale.", "pages": 2, "seed": 5,
                                       "rounds": 1, "steps": 4})

    # 1. kill -9 the orchestration worker while it drives the graph; a new one takes over from the checkpoint
    client.wait_for_event(run.run_id, lambda event: event.type == "node", timeout=60)
    first_driver.kill()
    services.worker(redis, "orchestrator", **database).wait_ready(120)

    # 2. kill -9 the GPU worker that runs a diffusion step, on the step's progress event
    step = client.wait_for_event(run.run_id, lambda event: event.type == "task.step", timeout=120)
    killed_task = step.data["task_id"]
    (victim,) = [worker for worker in gpus if worker.process.pid == owner_pid(client.get(killed_task).owner)]
    victim.kill()

    final = service.wait(run.run_id, timeout=240)
    assert final.status == "success", final.error

    # no finished step ran twice: the work of each started once, counted where it starts, except the steps the
    # killed worker was in the middle of (the diffusion step, and whatever else it had started), which started
    # again on the other worker
    events = list(service.all_events(run.run_id))
    started = {event.data["task_id"] for event in events if event.type == "task.started"}
    records = {task_id: client.get(task_id) for task_id in started}
    interrupted = taken_over(events, records, victim.process.pid)
    assert killed_task in interrupted
    assert {task_id: (record.status, record.executions) for task_id, record in records.items()} == {
        task_id: ("done", 2 if task_id in interrupted else 1) for task_id in records}
    assert records[killed_task].deliveries >= 2  # it was redelivered after the kill
    values = service.output_values(final)
    assert sorted(values["chosen"]) == ["page-01", "page-02"]
