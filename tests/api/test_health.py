"""/healthz stays fast while a model runs, /readyz names what is unreachable, /metrics exposes the figures."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from testkit import free_port, wait_for
from api_support import make_app
from fastapi.testclient import TestClient

pytestmark = pytest.mark.timeout(180)


def test_healthz_answers_within_a_second_while_a_model_runs(live_server):
    model = httpx.get(f"{live_server.url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "a long answer please"}]}
    # Loaded once first (building a tiny preset is Python-heavy); then the event loop must stay free while it runs.
    httpx.post(f"{live_server.url}/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=120)
    chat = threading.Thread(target=httpx.post, args=(f"{live_server.url}/v1/chat/completions",),
                            kwargs={"json": body, "timeout": 120})
    chat.start()
    try:
        worst = 0.0
        while chat.is_alive():
            started = time.perf_counter()
            assert httpx.get(f"{live_server.url}/healthz", timeout=5).status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.1)
        assert worst < 1.0, f"/healthz took {worst:.2f} s while the model ran"
    finally:
        chat.join(120)


def test_readyz_reports_each_dependency(client, api_env):
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"broker": "ok", "store": "ok", "checkpointer": "ok"}
    with TestClient(make_app(broker_url=f"redis://127.0.0.1:{free_port()}/0")) as broken:
        response = broken.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["broker"].startswith("unreachable")


def test_metrics_expose_queue_runs_tasks_and_errors(client):
    run = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "metered"}}).json()
    wait_for(lambda: client.get(f"/runs/{run['run_id']}").json()["status"] == "success")
    client.get("/runs/no-such-run")
    text = client.get("/metrics").text
    assert 'mgmflow_run_seconds_count{status="success",workflow="echo"}' in text
    assert 'mgmflow_http_requests_total{method="GET",route="/runs/{run_id}",status="404"}' in text
    assert "mgmflow_queue_depth" in text and "mgmflow_task_seconds" in text and "mgmflow_errors_total" in text


def test_log_lines_carry_the_run_and_task_ids():
    import io
    import logging

    from mgmflow.orchestrator.api.logs import FORMAT, RunTagFilter, current_run, current_task

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RunTagFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("mgmflow.test.tags")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside")
        run, task = current_run.set("run-1"), current_task.set("run-1:draw")
        logger.warning("inside")
        current_run.reset(run)
        current_task.reset(task)
    finally:
        logger.removeHandler(handler)
    outside, inside = stream.getvalue().splitlines()
    assert "run=- task=- outside" in outside and "run=run-1 task=run-1:draw inside" in inside
