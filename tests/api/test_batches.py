"""Batches over HTTP: JSON list and JSONL upload, concurrency limit, per-item status, downloadable results,
and interactive runs that are not starved by a big batch."""

from __future__ import annotations

import json
import time

import pytest
from testkit import wait_for

pytestmark = pytest.mark.timeout(180)


def _finished(client, batch_id):
    return wait_for(lambda: (b := client.get(f"/batches/{batch_id}").json())["run"]["status"]
                      in ("success", "error", "cancelled") and b, timeout=120)


def test_batch_runs_every_item_and_reports_each(client):
    items = [{"text": f"item {i}"} for i in range(5)] + [{"text": "bad", "steps": 0}]
    batch = client.post("/batches", json={"assistant_id": "echo", "items": items, "concurrency": 2})
    assert batch.status_code == 200, batch.text
    batch = batch.json()
    assert batch["total"] == 6
    done = _finished(client, batch["batch_id"])
    assert done["run"]["status"] == "success" and done["done"] == 6
    assert done["counts"] == {"success": 5, "invalid": 1}
    statuses = [item["status"] for item in done["items"]]
    assert statuses == ["success"] * 5 + ["invalid"]
    assert "steps" in done["items"][5]["error"]["message"]

    results = client.get(f"/batches/{batch['batch_id']}/results")
    assert results.status_code == 200 and "attachment" in results.headers["content-disposition"]
    rows = results.json()
    assert [row["output"]["answer"] for row in rows[:5]] == [f"ITEM {i}" for i in range(5)]
    lines = client.get(f"/batches/{batch['batch_id']}/results", params={"format": "jsonl"}).text.splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(6))
    # The children never ran more than `concurrency` at once: their run records overlap at most pairwise.
    children = [client.get(f"/runs/{row['run_id']}").json() for row in rows[:5]]
    assert all(child["metadata"]["parent_run_id"] == batch["batch_id"] for child in children)


def test_jsonl_upload_and_its_errors(client):
    jsonl = b'{"text": "one"}\n\n{"text": "two"}\n'
    response = client.post("/batches/upload", data={"assistant_id": "echo", "concurrency": "2"},
                           files={"file": ("inputs.jsonl", jsonl, "application/x-ndjson")})
    assert response.status_code == 200, response.text
    assert _finished(client, response.json()["batch_id"])["counts"] == {"success": 2}

    bad = client.post("/batches/upload", data={"assistant_id": "echo"},
                      files={"file": ("inputs.jsonl", b'{"text": "one"}\n{oops\n', "application/x-ndjson")})
    assert bad.status_code == 400 and "line 2" in bad.json()["detail"]
    not_objects = client.post("/batches/upload", data={"assistant_id": "echo"},
                              files={"file": ("inputs.json", b"[1, 2]", "application/json")})
    assert not_objects.status_code == 400 and not_objects.json()["code"] == "invalid_item"
    unknown = client.post("/batches", json={"assistant_id": "nope", "items": [{}]})
    assert unknown.status_code == 404


def test_interactive_runs_are_not_starved_by_a_big_batch(client):
    slow = [{"text": f"b{i}", "steps": 2, "delay": 0.25} for i in range(200)]
    batch = client.post("/batches", json={"assistant_id": "echo", "items": slow, "concurrency": 4}).json()
    wait_for(lambda: client.get(f"/batches/{batch['batch_id']}").json()["done"] >= 4, timeout=60)
    started = time.monotonic()
    answer = client.post("/runs/wait", json={"assistant_id": "echo", "input": {"text": "urgent"}}).json()
    elapsed = time.monotonic() - started
    assert answer["answer"] == "URGENT"
    assert elapsed < 5, f"an interactive run waited {elapsed:.1f} s behind a 200-item batch"
    cancelled = client.post(f"/batches/{batch['batch_id']}/cancel").json()
    assert cancelled["run"]["status"] == "cancelled" and cancelled["done"] < 200, cancelled["counts"]
