"""Run webhooks are delivered at least once: recorded with the run, retried with backoff until the receiver takes
them, each attempt under the same idempotency key, and delivered by the next API process when the one that admitted
the run stopped first."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from api_support import make_app
from fastapi.testclient import TestClient
from testkit import wait_for

pytestmark = pytest.mark.timeout(120)


class Receiver:
    """A local HTTP endpoint that answers 500 to its first ``failures`` POSTs, then 204; it keeps every POST."""

    def __init__(self, failures: int = 0):
        self.failures = failures
        self.posts: list[dict] = []  # {"status": answered, "headers": {lowercase name: value}, "body": {...}}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(receiver.posts) < receiver.failures else 204
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.posts.append({"status": status, "headers": headers, "body": body})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"

    def delivered(self) -> list[dict]:
        return [post for post in self.posts if post["status"] == 204]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def _app():
    return make_app(webhook_hosts=["127.0.0.1"], webhook_backoff_s=0.2)


def test_a_failed_delivery_is_retried_under_the_same_idempotency_key(api_env):
    with Receiver(failures=1) as receiver, TestClient(_app()) as client:
        run = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "hook"},
                                         "webhook": receiver.url}).json()
        wait_for(receiver.delivered, timeout=30, what="the webhook's second attempt")
        store = client.app.state.context.runs.runs
        state = wait_for(lambda: (s := store.webhook_state(run["run_id"]))["status"] == "delivered" and s)
    assert [post["status"] for post in receiver.posts] == [500, 204]
    first, second = (post["headers"] for post in receiver.posts)
    assert first["idempotency-key"] == second["idempotency-key"] == f"{run['run_id']}:{first['x-mgmflow-delivery']}"
    assert (first["x-mgmflow-attempt"], second["x-mgmflow-attempt"]) == ("1", "2")
    final = receiver.delivered()[0]["body"]
    assert final["run_id"] == run["run_id"] and final["status"] == "success"
    assert state["attempts"] == 2 and state["error"] is None


def test_a_pending_webhook_is_delivered_by_the_next_api_process(api_env):
    with Receiver() as receiver:
        # 1. The first API admits a slow run and stops before it ends: nobody has posted its webhook.
        first = _app()
        with TestClient(first) as client:
            run = client.post("/runs", json={"assistant_id": "echo", "webhook": receiver.url,
                                             "input": {"text": "later", "steps": 3, "delay": 0.3}}).json()
        service = first.state.context.runs
        assert service.wait(run["run_id"], timeout=30).status == "success"
        assert service.runs.webhook_state(run["run_id"])["status"] == "pending" and not receiver.posts

        # 2. A fresh app over the same store delivers it.
        with TestClient(_app()):
            wait_for(receiver.delivered, timeout=30, what="the pending webhook")
            wait_for(lambda: service.runs.webhook_state(run["run_id"])["status"] == "delivered")
    (post,) = receiver.posts
    assert post["body"]["run_id"] == run["run_id"] and post["body"]["status"] == "success"
    assert post["headers"]["x-mgmflow-run-id"] == run["run_id"]


def test_webhooks_to_hosts_not_allowed_are_refused(api_env):
    with TestClient(_app()) as client:
        response = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x"},
                                              "webhook": "http://169.254.169.254/latest"})
    assert response.status_code == 422 and response.json()["code"] == "webhook_not_allowed"
