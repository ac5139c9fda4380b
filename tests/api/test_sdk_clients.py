"""The official ``langgraph-sdk`` client against a live server: threads, runs, streaming, state, cancel, join."""

from __future__ import annotations

import asyncio

import pytest
from langgraph_sdk import get_client

pytestmark = pytest.mark.timeout(120)


def test_langgraph_sdk_thread_run_stream_state_cancel(live_server):
    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        assistants = await client.assistants.search(limit=50)
        assert "echo" in {a["assistant_id"] for a in assistants}
        schemas = await client.assistants.get_schemas("echo")
        assert "text" in schemas["input_schema"]["properties"]

        thread = await client.threads.create(metadata={"purpose": "sdk-test"})
        parts = [part async for part in client.runs.stream(
            thread["thread_id"], "echo", input={"text": "streamed", "steps": 3}, stream_mode="updates")]
        events = [part.event for part in parts]
        assert events[0] == "metadata" and events[-1] == "end"
        assert events.count("progress") == 3 and "node" in events
        assert next(p for p in parts if p.event == "values").data["answer"] == "STREAMED"
        assert all(p.id for p in parts if p.event == "progress")  # resumable: every stored event has an id

        state = await client.threads.get_state(thread["thread_id"])
        assert state["values"]["answer"] == "STREAMED"
        history = await client.threads.get_history(thread["thread_id"], limit=5)
        assert history and history[0]["values"]["answer"] == "STREAMED"
        got = await client.threads.get(thread["thread_id"])
        assert got["status"] == "idle" and got["metadata"]["purpose"] == "sdk-test"

        # Background run, cancelled while it runs; the thread shows it; join returns.
        run = await client.runs.create(thread["thread_id"], "echo", input={"text": "slow", "steps": 20, "delay": 0.2})
        await client.runs.cancel(thread["thread_id"], run["run_id"], wait=True)
        cancelled = await client.runs.get(thread["thread_id"], run["run_id"])
        assert cancelled["status"] == "cancelled"
        listed = await client.runs.list(thread["thread_id"])
        assert {r["run_id"] for r in listed} >= {run["run_id"]}

        # wait + join on a new run.
        result = await client.runs.wait(thread["thread_id"], "echo", input={"text": "waited"})
        assert result["answer"] == "WAITED"
        joined_run = await client.runs.create(None, "echo", input={"text": "joined"})
        joined = await client.runs.join(joined_run["thread_id"], joined_run["run_id"])
        assert joined["answer"] == "JOINED"

    asyncio.run(scenario())


def test_stream_resumes_after_last_event_id(live_server):
    import httpx

    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        run = http.post("/runs", json={"assistant_id": "echo", "input": {"text": "resume", "steps": 4}}).json()
        path = f"/threads/{run['thread_id']}/runs/{run['run_id']}/stream"

        def read(headers):
            with http.stream("GET", path, headers=headers) as response:
                assert response.status_code == 200
                assert response.headers["location"] == path
                events, current = [], {}
                for line in response.iter_lines():
                    if not line:
                        if current:
                            events.append(current)
                        current = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        current[name] = value
                return events

        full = read({})
        progress = [e for e in full if e.get("event") == "progress"]
        assert len(progress) == 4
        resumed = read({"Last-Event-ID": progress[1]["id"]})
        assert [e["id"] for e in resumed if e.get("event") == "progress"] == [e["id"] for e in progress[2:]]
        assert "metadata" not in {e.get("event") for e in resumed}
        assert http.get(path, headers={"Last-Event-ID": "../etc"}).status_code == 400
