"""Embedded mode: no broker; the same tasks on Celery's in-memory transport and an in-process worker."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from celery import shared_task

sys.path.insert(0, str(Path(__file__).parent))
import worker_test_steps  # noqa: E402,F401 — test-only kinds, served by the embedded worker too
from payloads import check_result, inputs, round_trip_payloads  # noqa: E402

from mgmflow.workers.client import TaskClient  # noqa: E402
from mgmflow.workers.settings import Settings  # noqa: E402

pytestmark = pytest.mark.timeout(240)
notified: list[dict] = []


@shared_task(name="orchestrator.test_resume")
def resume(**kwargs):
    """Stands for the orchestrator's completion task."""
    notified.append(kwargs)


@pytest.fixture(scope="module")
def client(mgmflow_home):
    return TaskClient(Settings(home=mgmflow_home, batch_window_ms=5))


def test_every_kind_round_trips_in_process(client):
    assert client.settings.embedded and client.app.conf.broker_url == "memory://"
    image, mask = inputs(client)
    notified.clear()
    payloads = round_trip_payloads(image, mask)
    for kind, payload in payloads.items():
        client.submit(kind, payload, task_id=f"ert:{kind}", run_id="ert", scope="alice",
                      notify=("orchestrator.test_resume", {"run_id": "ert"}))
    for kind in payloads:
        record = client.wait(f"ert:{kind}", timeout=180)
        assert record.status == "done", (kind, record.error)
        check_result(client, kind, record.result)
    client.wait_for_event("ert", lambda e: e.type == "task.finished", timeout=5)
    import time

    deadline = time.monotonic() + 10
    while len(notified) < len(payloads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(n["task_id"] for n in notified) == sorted(f"ert:{kind}" for kind in payloads)
    assert all(n["run_id"] == "ert" for n in notified)
    # records are SQLite under MGMFLOW_HOME: a rerun of the same job finds its finished steps
    assert (Path(client.settings.home) / "tasks.sqlite").exists()


def test_bad_input_and_cancel_in_process(client):
    foreign, _ = inputs(client, scope="mallory")
    client.submit("edit.img2img", {"prompts": ["x"], "image": foreign}, task_id="ebad:a", run_id="ebad",
                  scope="alice")
    record = client.wait("ebad:a", timeout=60)
    assert record.status == "failed" and record.error["code"] == "artifact_not_found"
    client.submit("diffusion.text2img", {"prompts": ["long"], "seeds": [1], "steps": 200}, task_id="ecancel:a",
                  run_id="ecancel", scope="alice")
    client.wait_for_event("ecancel", lambda e: e.type == "task.step", timeout=60)
    client.cancel("ecancel")
    assert client.wait("ecancel:a", timeout=30).status == "cancelled"


def test_deadline_and_oversized_message(client):
    import time

    from mgmflow.models.errors import InvalidInputError

    client.submit("diffusion.text2img", {"prompts": ["slow"], "seeds": [1], "steps": 200}, task_id="edl:a",
                  run_id="edl", scope="alice", deadline=time.time() + 0.5)
    record = client.wait("edl:a", timeout=60)
    assert record.status == "timed_out" and record.error["code"] == "timed_out"
    with pytest.raises(InvalidInputError, match="artifact store"):
        client.submit("vlm.chat", {"messages": [{"role": "user", "text": "x" * 5000}]}, task_id="edl:b",
                      run_id="edl", scope="alice")
    with pytest.raises(InvalidInputError, match="unknown task kind"):
        client.submit("vlm.nope", {}, task_id="edl:c", run_id="edl", scope="alice")


def test_a_rerun_after_ctrl_c_keeps_finished_steps_and_redoes_the_rest(client, tmp_path):
    import os
    import signal
    import subprocess
    import time

    script = f"""
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job inherits SIG_IGN)
sys.path.insert(0, r"{Path(__file__).parent}")
import worker_test_steps
from mgmflow.workers.client import TaskClient
from mgmflow.workers.settings import Settings
client = TaskClient(Settings(home=r"{client.settings.home}"))
client.submit("test.echo", {{"value": 1}}, task_id="ctrlc:a", run_id="ctrlc", scope="alice")
client.wait("ctrlc:a", timeout=60)
client.submit("test.echo", {{"value": 2, "steps": 600, "step_s": 0.1}}, task_id="ctrlc:b", run_id="ctrlc",
              scope="alice")
time.sleep(600)
"""
    process = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while (record := client.get("ctrlc:b")) is None or record.status != "running":
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)  # Ctrl-C: the running step is abandoned, not waited for or cancelled
        process.wait(timeout=20)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert client.get("ctrlc:b").status == "running"
    client.submit("test.echo", {"value": 1}, task_id="ctrlc:a", run_id="ctrlc", scope="alice")
    client.submit("test.echo", {"value": 2}, task_id="ctrlc:b", run_id="ctrlc", scope="alice")
    finished, redone = client.wait("ctrlc:a", timeout=5), client.wait("ctrlc:b", timeout=60)
    assert finished.status == "done" and finished.executions == 1 and finished.deliveries == 1
    # its work started twice, in the interrupted process and here; the finished step's once
    assert redone.status == "done" and redone.executions == 2 and redone.deliveries == 2
    assert redone.result["pid"] == os.getpid()  # redone here, not by the killed process
