"""Bad input gets a clear 4xx JSON error, never a 500: malformed JSON, wrong types, unknown workflow, limits,
oversized bodies, truncated and bomb images, path-traversal ids, rate limits and quotas."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
from testkit import wait_for
from api_support import make_app
from fastapi.testclient import TestClient
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def _png(size=(16, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(width=50_000, height=50_000) -> bytes:
    """A tiny PNG whose header claims 2.5 gigapixels."""
    data = bytearray(_png((1, 1)))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]
    if code is not None:
        assert body["code"] == code, body
    return body


@pytest.mark.parametrize(("body", "status", "code"), [
    (b"{not json", 400, "malformed_json"),
    (b'{"assistant_id": 5}', 422, "invalid_request"),
    (b'{"assistant_id": "echo", "input": []}', 422, "invalid_request"),
    (b'{"assistant_id": "no-such-workflow"}', 404, "unknown_workflow"),
    (b'{"assistant_id": "echo", "input": {"text": "x", "steps": 0}}', 400, "invalid_input"),
    (b'{"assistant_id": "echo", "input": {"text": "x", "pages": 65}}', 422, "too_many_pages"),
    (b'{"assistant_id": "echo", "input": {"text": "x"}, "webhook": "http://169.254.169.254/latest"}', 400,
     "webhook_not_allowed"),
    (b'{"assistant_id": "echo", "input": {"text": "x"}, "priority": 12}', 422, "invalid_request"),
])
def test_bad_run_requests(client, body, status, code):
    response = client.post("/runs", content=body, headers={"Content-Type": "application/json"})
    _error(response, status, code)


def test_prompt_length_limit(client):
    response = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x" * 40_000}})
    _error(response, 413, "prompt_too_long")


@pytest.mark.parametrize("path", [
    "/artifacts/..%2F..%2Fetc%2Fpasswd", "/artifacts/..%2F..%2Fetc%2Fpasswd/content", "/runs/..%2F..%2Fx",
    "/threads/..%2F..%2Fx", "/threads/..%2F..%2Fx/state", "/threads/x/runs/..%2F..",
    "/assistants/..%2Fecho",
])
def test_path_traversal_ids_are_404(client, path):
    _error(client.get(path), 404)


def test_image_upload_and_download(client):
    created = client.post("/artifacts", files={"file": ("photo.png", _png((40, 30)), "image/png")})
    assert created.status_code == 201, created.text
    artifact = created.json()
    assert artifact["media_type"] == "image/png" and artifact["metadata"]["width"] == 40
    content = client.get(f"/artifacts/{artifact['id']}/content")
    assert content.status_code == 200 and Image.open(io.BytesIO(content.content)).size == (40, 30)
    assert client.get(f"/artifacts/{artifact['id']}").json()["sha256"] == artifact["sha256"]


@pytest.mark.parametrize(("data", "what"), [
    (_png()[:60], "truncated"),
    (_bomb_png(), "too large"),
    (b"GIF89a but not really", "not a readable image"),
    (b"", "empty"),
])
def test_bad_uploads(client, data, what):
    response = client.post("/artifacts", files={"file": ("x.png", data, "image/png")})
    body = _error(response, 400)
    assert body["code"] == "invalid_image"


def test_upload_without_a_file_is_422(client):
    _error(client.post("/artifacts", data={"nothing": "here"}), 422)


def test_bad_last_event_id(client):
    run = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "x"}}).json()
    response = client.get(f"/threads/{run['thread_id']}/runs/{run['run_id']}/stream",
                          headers={"Last-Event-ID": "0-0' OR 1=1"})
    _error(response, 400, "bad_event_id")


@pytest.fixture(scope="module")
def strict_client(api_env):
    # Its own key, so that its quota counts only its own runs.
    with TestClient(make_app(max_body_bytes=4096, rate_limit_per_second=1, rate_limit_burst=40,
                             max_active_runs_per_key=2, api_keys=["strict-key"])) as test_client:
        test_client.headers["Authorization"] = "Bearer strict-key"
        yield test_client


def test_oversized_bodies_are_413(strict_client):
    big = b'{"assistant_id": "echo", "input": {"text": "' + b"x" * 10_000 + b'"}}'
    response = strict_client.post("/runs", content=big, headers={"Content-Type": "application/json"})
    _error(response, 413, "body_too_large")

    def chunks():  # no Content-Length: counted while streamed
        for _ in range(10):
            yield b"x" * 1000

    response = strict_client.post("/runs", content=chunks(), headers={"Content-Type": "application/json"})
    _error(response, 413, "body_too_large")


def test_quota_of_unfinished_runs(strict_client):
    """The quota counts running runs as well as waiting ones: a running and a waiting run fill a quota of 2."""
    slow = {"assistant_id": "echo", "input": {"text": "slow", "steps": 20, "delay": 0.1}}
    thread = strict_client.post("/threads", json={}).json()["thread_id"]
    first = strict_client.post(f"/threads/{thread}/runs", json=slow)
    assert first.status_code == 200, first.text
    first = first.json()
    wait_for(lambda: strict_client.get(f"/runs/{first['run_id']}").json()["status"] == "running")
    second = strict_client.post(f"/threads/{thread}/runs", json=slow).json()  # waits behind the first
    assert strict_client.get(f"/runs/{second['run_id']}").json()["status"] == "pending"
    response = strict_client.post(f"/threads/{thread}/runs", json=slow)
    assert response.status_code == 429 and response.json()["code"] == "quota_exceeded"
    for run in (second, first):
        strict_client.post(f"/threads/{thread}/runs/{run['run_id']}/cancel")


def test_rate_limit(api_env):
    with TestClient(make_app(rate_limit_per_second=0.5, rate_limit_burst=3)) as limited:
        statuses = [limited.get("/runs").status_code for _ in range(5)]
        assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
        response = limited.get("/runs")
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert limited.get("/healthz").status_code == 200  # health is never rate limited
