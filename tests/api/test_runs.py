"""Runs and threads over HTTP (embedded app): create, wait, read with position and progress, list, cancel,
idempotency, priorities, scoping by API key."""

from __future__ import annotations

import pytest
from testkit import wait_for
from api_support import KEYS, auth

pytestmark = pytest.mark.timeout(120)


def _wait(client, run, headers=None):
    return wait_for(lambda: (r := client.get(f"/runs/{run['run_id']}", headers=headers).json())["status"]
                      in ("success", "error", "cancelled", "timeout") and r)


def test_background_run_completes_and_reports_progress(client):
    response = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "hello", "steps": 3}})
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["assistant_id"] == "echo" and run["status"] in ("pending", "running")
    assert response.headers["content-location"] == f"/threads/{run['thread_id']}/runs/{run['run_id']}"
    done = _wait(client, run)
    assert done["status"] == "success" and done["position"] is None
    state = client.get(f"/threads/{run['thread_id']}/state").json()
    assert state["values"]["answer"] == "HELLO"
    listed = client.get(f"/threads/{run['thread_id']}/runs").json()
    assert [r["run_id"] for r in listed] == [run["run_id"]]


def test_wait_returns_the_final_state(client):
    response = client.post("/runs/wait", json={"assistant_id": "echo", "input": {"text": "abc"}})
    assert response.status_code == 200 and response.json()["answer"] == "ABC"


def test_a_run_joins_to_the_state_it_ended_with_not_its_threads_latest(client):
    """A later run on the thread writes newer checkpoints: joining the earlier run (its values, its replayed stream)
    still gives what that run ended with."""
    thread = client.post("/threads", json={}).json()["thread_id"]
    first, second = (client.post(f"/threads/{thread}/runs/wait", json={"assistant_id": "echo", "input": {"text": text}})
                     for text in ("first", "second"))
    assert first.json()["answer"] == "FIRST" and second.json()["answer"] == "SECOND"
    assert client.get(f"/threads/{thread}/state").json()["values"]["answer"] == "SECOND"
    run_id = first.headers["content-location"].rsplit("/", 1)[1]
    for path in (f"/threads/{thread}/runs/{run_id}/join", f"/runs/{run_id}/join"):
        assert client.get(path).json()["answer"] == "FIRST", path
    with client.stream("GET", f"/threads/{thread}/runs/{run_id}/stream") as response:
        text = "".join(response.iter_text())
    values = [line for line in text.splitlines() if line.startswith("data:") and '"answer"' in line]
    assert values and '"FIRST"' in values[-1] and "SECOND" not in text


def test_running_run_shows_progress_and_queued_runs_their_position(client):
    thread = client.post("/threads", json={}).json()["thread_id"]
    slow = {"assistant_id": "echo", "input": {"text": "slow", "steps": 6, "delay": 0.3}}
    first, second, third = (client.post(f"/threads/{thread}/runs", json=slow).json() for _ in range(3))
    # Runs on a thread are serial: the second and third wait; the third has the second ahead of it.
    progress = wait_for(lambda: client.get(f"/runs/{first['run_id']}").json()["progress"])
    assert progress["stage"] == "echo" and 1 <= progress["done"] <= 6 and progress["total"] == 6
    waiting = client.get(f"/threads/{thread}/runs/{third['run_id']}").json()
    assert waiting["status"] == "pending" and waiting["position"] >= 1
    assert client.get(f"/runs/{second['run_id']}").json()["position"] < waiting["position"]
    for run in (third, second, first):
        cancelled = client.post(f"/threads/{thread}/runs/{run['run_id']}/cancel?wait=1").json()
        assert cancelled["status"] == "cancelled"


def test_idempotency_key_returns_the_same_run(client):
    body = {"assistant_id": "echo", "input": {"text": "once"}}
    headers = {"Idempotency-Key": "submission-42"}
    first = client.post("/runs", json=body, headers=headers).json()
    second = client.post("/runs", json=body, headers=headers).json()
    assert first["run_id"] == second["run_id"]
    third = client.post("/runs", json=body, headers={"Idempotency-Key": "submission-43"}).json()
    assert third["run_id"] != first["run_id"]


def test_run_listing_is_paginated(client):
    for text in ("p1", "p2", "p3"):
        client.post("/runs", json={"assistant_id": "echo", "input": {"text": text}})
    page1 = client.get("/runs", params={"limit": 2}).json()
    page2 = client.get("/runs", params={"limit": 2, "offset": 2}).json()
    assert len(page1) == 2 and page2
    assert not {r["run_id"] for r in page1} & {r["run_id"] for r in page2}


def test_batch_of_runs(client):
    body = [{"assistant_id": "echo", "input": {"text": f"b{i}"}} for i in range(3)]
    runs = client.post("/runs/batch", json=body).json()
    assert len({r["run_id"] for r in runs}) == 3
    assert all(_wait(client, run)["status"] == "success" for run in runs)


def test_keys_see_only_their_own_runs_threads_and_artifacts(keyed_client):
    alice, bob = (auth(key) for key in KEYS)
    assert keyed_client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x"}}).status_code == 401
    assert keyed_client.get("/runs", headers=auth("wrong")).status_code == 401
    run = keyed_client.post("/runs", json={"assistant_id": "echo", "input": {"text": "mine"}}, headers=alice).json()
    assert _wait(keyed_client, run, alice)["status"] == "success"
    for path in (f"/runs/{run['run_id']}", f"/threads/{run['thread_id']}", f"/threads/{run['thread_id']}/state",
                 f"/threads/{run['thread_id']}/runs/{run['run_id']}"):
        assert keyed_client.get(path, headers=alice).status_code == 200, path
        assert keyed_client.get(path, headers=bob).status_code == 404, path
    assert run["run_id"] not in {r["run_id"] for r in keyed_client.get("/runs", headers=bob).json()}
    # x-api-key (what langgraph-sdk sends) works too.
    assert keyed_client.get(f"/runs/{run['run_id']}", headers={"x-api-key": KEYS[0]}).status_code == 200
    # Bob cannot post to Alice's thread either.
    response = keyed_client.post(f"/threads/{run['thread_id']}/runs", headers=bob,
                                 json={"assistant_id": "echo", "input": {"text": "intrude"}})
    assert response.status_code == 404


def test_stream_says_queued_with_the_position(client):
    thread = client.post("/threads", json={}).json()["thread_id"]
    slow = {"assistant_id": "echo", "input": {"text": "first", "steps": 4, "delay": 0.2}}
    first = client.post(f"/threads/{thread}/runs", json=slow).json()
    with client.stream("POST", f"/threads/{thread}/runs/stream",
                       json={"assistant_id": "echo", "input": {"text": "second"}}) as response:
        text = "".join(response.iter_text())
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert events[0] == "metadata" and events[1] == "queued" and events[-1] == "end"
    assert events.index("queued") < events.index("node")
    assert client.get(f"/runs/{first['run_id']}").json()["status"] == "success"


def test_webhook_is_called_when_the_run_ends(api_env):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from api_support import make_app
    from fastapi.testclient import TestClient

    received = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with TestClient(make_app(webhook_hosts=[f"http://127.0.0.1:{server.server_port}"])) as hooked:
            run = hooked.post("/runs", json={"assistant_id": "echo", "input": {"text": "hook"},
                                             "webhook": f"http://127.0.0.1:{server.server_port}/done"}).json()
            wait_for(lambda: received, timeout=30)
        assert received[0]["run_id"] == run["run_id"] and received[0]["status"] == "success"
    finally:
        server.shutdown()
