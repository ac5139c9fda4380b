"""Run webhooks are delivered at least once: recorded with the run, retried with backoff until the receiver takes
them, each attempt under the same idempotency key, and delivered by the next API process when the one that admitted
the run stopped first. They are signed the Standard Webhooks way (checked with its reference library), and only
well-formed URLs on allowed origins (scheme, host and port) are admitted."""

from __future__ import annotations

import base64
import json
import threading
import uuid
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
        self.posts: list[dict] = []  # {"status", "headers": {lowercase name: value}, "body": {...}, "raw": bytes}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                status = 500 if len(receiver.posts) < receiver.failures else 204
                headers = {name.lower(): value for name, value in self.headers.items()}
                receiver.posts.append({"status": status, "headers": headers, "body": json.loads(raw), "raw": raw})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_port}"
        self.url = f"{self.origin}/hook"

    def delivered(self) -> list[dict]:
        return [post for post in self.posts if post["status"] == 204]

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def _app(receiver: Receiver, **settings):
    return make_app(webhook_hosts=[receiver.origin], webhook_backoff_s=0.2, webhook_secret=SECRET, **settings)


def test_a_failed_delivery_is_retried_under_the_same_idempotency_key(api_env):
    with Receiver(failures=1) as receiver, TestClient(_app(receiver)) as client:
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
        first = _app(receiver)
        with TestClient(first) as client:
            run = client.post("/runs", json={"assistant_id": "echo", "webhook": receiver.url,
                                             "input": {"text": "later", "steps": 3, "delay": 0.3}}).json()
        service = first.state.context.runs
        assert service.wait(run["run_id"], timeout=30).status == "success"
        assert service.runs.webhook_state(run["run_id"])["status"] == "pending" and not receiver.posts

        # 2. A fresh app over the same store delivers it.
        with TestClient(_app(receiver)):
            wait_for(receiver.delivered, timeout=30, what="the pending webhook")
            wait_for(lambda: service.runs.webhook_state(run["run_id"])["status"] == "delivered")
    (post,) = receiver.posts
    assert post["body"]["run_id"] == run["run_id"] and post["body"]["status"] == "success"
    assert post["headers"]["x-mgmflow-run-id"] == run["run_id"]


def test_deliveries_are_signed_the_standard_webhooks_way(api_env):
    from standardwebhooks import Webhook
    from standardwebhooks.webhooks import WebhookVerificationError

    with Receiver() as receiver, TestClient(_app(receiver)) as client:
        run = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "signed"},
                                         "webhook": receiver.url}).json()
        (post,) = wait_for(receiver.delivered, timeout=30, what="the webhook")
    headers = post["headers"]
    assert Webhook(SECRET).verify(post["raw"], headers)["run_id"] == run["run_id"]
    for tampered in (post["raw"].replace(b"success", b"error"), post["raw"] + b" "):
        with pytest.raises(WebhookVerificationError):
            Webhook(SECRET).verify(tampered, headers)
    with pytest.raises(WebhookVerificationError):  # another deployment's secret
        Webhook("whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()).verify(post["raw"], headers)
    # The id is the same on every attempt, yet nobody without the secret can compute it (it was a UUIDv5 of the
    # run id and URL, which anyone could forge a "copy" with).
    assert headers["webhook-id"] == headers["x-mgmflow-delivery"] and headers["webhook-id"].startswith("msg_")
    guessable = uuid.uuid5(uuid.NAMESPACE_URL, f"mgmflow-webhook:{run['run_id']}:{receiver.url}")
    assert headers["webhook-id"] != str(guessable)


def test_without_a_configured_secret_one_is_made_and_kept(api_env, tmp_path):
    from standardwebhooks import Webhook

    home = tmp_path / "home"
    with Receiver() as receiver:
        for count in (1, 2):  # the second API process signs with the same secret
            with TestClient(make_app(webhook_hosts=[receiver.origin], home=home)) as client:
                client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x"}, "webhook": receiver.url})
                wait_for(lambda: len(receiver.delivered()) == count, timeout=30, what=f"webhook {count}")
    secret = (home / "webhook-secret").read_text().strip()
    assert (home / "webhook-secret").stat().st_mode & 0o777 == 0o600
    assert len(receiver.delivered()) == 2
    for post in receiver.delivered():
        Webhook(secret).verify(post["raw"], post["headers"])


@pytest.mark.parametrize(("webhook", "code"), [
    ("http://169.254.169.254/latest", "webhook_not_allowed"),
    ("{origin_https}/hook", "webhook_not_allowed"),  # the allowed host and port, over another scheme
    ("http://127.0.0.1:1/hook", "webhook_not_allowed"),  # the allowed host, another port
    ("http://127.0.0.1/hook", "webhook_not_allowed"),
    ("http://user:secret@{host_port}/hook", "invalid_webhook"),
    ("http://127.0.0.1:99999/hook", "invalid_webhook"),
    ("http://[::1/hook", "invalid_webhook"),
    ("file:///etc/passwd", "invalid_webhook"),
])
def test_webhooks_off_the_allowed_origins_are_refused(api_env, webhook, code):
    with Receiver() as receiver, TestClient(_app(receiver)) as client:
        host_port = receiver.origin.removeprefix("http://")
        url = webhook.format(origin_https=f"https://{host_port}", host_port=host_port)
        before = client.get("/runs", params={"limit": 1000}).json()
        response = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x"}, "webhook": url})
        assert client.get("/runs", params={"limit": 1000}).json() == before  # nothing was created
    assert response.status_code == 400 and response.json()["code"] == code, response.text
    assert "secret" not in response.text
