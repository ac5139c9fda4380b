"""The official ``langgraph-sdk`` client and LangGraph's ``RemoteGraph`` against a live server: threads, runs,
streaming in the Agent Server's stream modes, state, cancel, join, graphs and schemas."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.pregel.remote import RemoteGraph
from langgraph_sdk import get_client

from echo_workflow import EchoState

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
        assert [(p.event, p.data) for p in parts[1:]] == [("updates", {"echo": {"answer": "STREAMED"}}),
                                                          ("end", parts[-1].data)]
        assert parts[0].event == "metadata" and all(p.id for p in parts[1:-1])  # resumable: stored events' ids

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


async def _parts(client, thread_id, assistant_id, **options):
    return [part async for part in client.runs.stream(thread_id, assistant_id, **options)]


def test_stream_modes_have_the_agent_server_shapes(live_server):
    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        body = {"input": {"text": "modes", "steps": 2}}
        # The SDK's default mode: the state after each step, and nothing else.
        parts = await _parts(client, None, "echo", **body)
        assert [p.event for p in parts] == ["metadata", "values", "values", "end"]
        assert parts[1].data == {"text": "modes", "steps": 2, "delay": 0.0}
        assert parts[2].data["answer"] == "MODES"

        modes = ["values", "updates", "custom", "debug", "tasks", "checkpoints", "events"]
        parts = await _parts(client, None, "echo", stream_mode=modes, **body)
        by_mode = {mode: [p.data for p in parts if p.event == mode] for mode in modes}
        assert {p.event for p in parts} == {"metadata", *modes, "end"}
        assert by_mode["updates"] == [{"echo": {"answer": "MODES"}}]
        assert [c["data"]["done"] for c in by_mode["custom"] if c["type"] == "progress"] == [1, 2]
        assert [d["type"] for d in by_mode["debug"]] == ["checkpoint", "task", "task_result", "checkpoint"]
        task, result = by_mode["tasks"]
        assert task["name"] == result["name"] == "echo" and task["input"]["text"] == "modes"
        assert result["result"] == {"answer": "MODES"} and result["error"] is None
        first, last = by_mode["checkpoints"]
        assert last["parent_config"] == first["config"] and last["values"]["answer"] == "MODES"
        assert first["next"] == ["echo"] and last["next"] == [] and last["metadata"]["step"] == 1
        kinds = [(e["event"], e["name"]) for e in by_mode["events"]]
        assert kinds[0] == ("on_chain_start", "echo") and kinds[-1] == ("on_chain_end", "echo")
        assert ("on_custom_event", "progress") in kinds
        assert by_mode["events"][-1]["data"]["output"] == {"answer": "MODES"}

        # Subgraphs: namespaced events with stream_subgraphs, none without.
        plain = await _parts(client, None, "echo_nested", stream_mode="updates", **body)
        assert [p.data for p in plain if p.event == "updates"] == [{"outer": {"text": "modes", "steps": 2,
                                                                             "delay": 0.0, "answer": "MODES"}}]
        nested = await _parts(client, None, "echo_nested", stream_mode=["updates"], stream_subgraphs=True, **body)
        (inner,) = [p for p in nested if p.event.startswith("updates|")]
        assert inner.event.startswith("updates|outer:") and inner.data == {"echo": {"answer": "MODES"}}

        # Joining a finished run's stream by its id alone, in a mode, gives the same events.
        run = await client.runs.create(None, "echo", input={"text": "joined", "steps": 1})
        await client.runs.join(run["thread_id"], run["run_id"])
        async with httpx.AsyncClient(base_url=live_server.url) as http:
            response = await http.get(f"/runs/{run['run_id']}/stream", params={"stream_mode": "updates"})
        assert "event: updates" in response.text and '"JOINED"' in response.text and "event: custom" not in \
            response.text

    asyncio.run(scenario())


def test_a_join_naming_no_mode_streams_in_the_modes_the_run_was_created_with(live_server):
    """As the Agent Server: ``join_stream`` without ``stream_mode`` (an SDK reconnect names none either) gives the
    modes, and subgraph events, the run was created with; a mode named in the join still wins."""
    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        body = {"input": {"text": "joined", "steps": 2}}

        async def joined(run, **options):
            return [part async for part in client.runs.join_stream(run["thread_id"], run["run_id"], **options)]

        run = await client.runs.create(None, "echo", stream_mode=["updates", "custom"], **body)
        parts = await joined(run)
        assert {p.event for p in parts} == {"metadata", "updates", "custom", "end"}
        assert [p.data for p in parts if p.event == "updates"] == [{"echo": {"answer": "JOINED"}}]
        assert [p.data["data"]["done"] for p in parts if p.event == "custom" and p.data["type"] == "progress"] == [1, 2]
        assert {p.event for p in await joined(run, stream_mode="custom")} == {"metadata", "custom", "end"}

        default = await joined(await client.runs.create(None, "echo", **body))  # the SDK's default mode: values
        assert [p.event for p in default] == ["metadata", "values", "values", "end"]
        assert default[-2].data["answer"] == "JOINED"

        nested = await joined(await client.runs.create(None, "echo_nested", stream_mode="updates",
                                                       stream_subgraphs=True, **body))
        (inner,) = [p for p in nested if p.event.startswith("updates|outer:")]
        assert inner.data == {"echo": {"answer": "JOINED"}}

    asyncio.run(scenario())


def test_a_bad_stream_mode_is_refused_before_the_run_starts(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        before = len(http.get("/runs", params={"limit": 1000}).json())
        response = http.post("/runs/stream", json={"assistant_id": "echo", "input": {"text": "x"},
                                                   "stream_mode": ["updates", "telepathy"]})
        assert response.status_code == 422 and "stream_mode" in response.text and "checkpoints" in response.text
        assert len(http.get("/runs", params={"limit": 1000}).json()) == before


def test_messages_stream_the_models_tokens(live_server):
    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        parts = await _parts(client, None, "chat", input={"message": "Say hello.", "seed": 1},
                             stream_mode=["messages-tuple", "messages", "values"])
        chunks = [p.data for p in parts if p.event == "messages"]
        assert len(chunks) >= 2 and all(c[0]["type"] == "AIMessageChunk" for c in chunks)
        assert {c[1]["langgraph_node"] for c in chunks} == {"respond"}  # the node that awaits the VLM's task
        (complete,) = [p.data for p in parts if p.event == "messages/complete"]
        assert complete[0]["content"] == "".join(c[0]["content"] for c in chunks)
        assert [p for p in parts if p.event == "messages/partial"][-1].data == complete
        assert complete[0]["content"] == [p.data for p in parts if p.event == "values"][-1]["reply"]

        # Resumed after the second partial message, the stream goes on with the whole text so far.
        partials = [p for p in parts if p.event == "messages/partial"]
        path = f"/runs/{parts[0].data['run_id']}/stream"
        async with httpx.AsyncClient(base_url=live_server.url) as http:
            response = await http.get(path, params={"stream_mode": "messages"},
                                      headers={"Last-Event-ID": partials[1].id})
        resumed = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(resumed[0]) == partials[2].data and "messages/metadata" not in response.text

    asyncio.run(scenario())


def test_assistant_graph_and_schemas(live_server):
    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        graph = await client.assistants.get_graph("echo_nested", xray=True)
        assert {node["id"] for node in graph["nodes"]} >= {"__start__", "outer:echo", "__end__"}
        flat = await client.assistants.get_graph("echo_nested")
        assert {(e["source"], e["target"]) for e in flat["edges"]} == {("__start__", "outer"), ("outer", "__end__")}
        schemas = await client.assistants.get_schemas("echo")
        assert schemas["input_schema"]["required"] == ["text"]
        assert set(schemas["output_schema"]["properties"]) == {"text", "steps", "delay", "answer"}
        subgraphs = await client.assistants.get_subgraphs("echo_nested")
        assert set(subgraphs["outer"]["input_schema"]["properties"]) >= {"text", "answer"}
        with pytest.raises(httpx.HTTPStatusError, match="assistant 'nope' not found"):
            await client.assistants.get_graph("nope")

    asyncio.run(scenario())


def test_every_packaged_workflow_has_input_output_and_state_schemas(live_server):
    """The states are TypedDicts pydantic can describe: every workflow's output and state schema lists its state's
    keys (not null, as with ``typing.TypedDict`` on Python < 3.12)."""
    from importlib.metadata import entry_points

    from mgmflow.orchestrator.workflow import ENTRY_POINT_GROUP

    async def scenario():
        client = get_client(url=live_server.url, api_key=None)
        for point in entry_points(group=ENTRY_POINT_GROUP):
            workflow = point.load()
            state_keys = set(workflow.build_graph().state_schema.__annotations__)
            schemas = await client.assistants.get_schemas(point.name)
            assert set(schemas["input_schema"]["properties"]) == set(workflow.input_model.model_fields), point.name
            for kind in ("output_schema", "state_schema"):
                assert set((schemas[kind] or {}).get("properties", ())) == state_keys, (point.name, kind)

    asyncio.run(scenario())


def test_remote_graph_as_a_subgraph_of_a_local_graph(live_server):
    remote = RemoteGraph("echo", url=live_server.url)
    assert remote.invoke({"text": "direct"})["answer"] == "DIRECT"
    assert list(remote.stream({"text": "streamed"}, stream_mode="updates")) == [{"echo": {"answer": "STREAMED"}}]
    assert [node for node in remote.get_graph().nodes] == ["__start__", "echo", "__end__"]

    local = StateGraph(EchoState)
    local.add_node("remote", remote)
    local.add_edge(START, "remote")
    local.add_edge("remote", END)
    app = local.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "remote-subgraph-test"}}
    parts = list(app.stream({"text": "nested"}, config, stream_mode="updates", subgraphs=True))
    assert ((), {"remote": {"text": "nested", "steps": 2, "delay": 0.0, "answer": "NESTED"}}) in parts
    assert any(ns and ns[0].startswith("remote:") and update == {"echo": {"answer": "NESTED"}}
               for ns, update in parts)
    # The remote thread is the local one's: its state is on the server.
    assert remote.get_state(config).values["answer"] == "NESTED"
    assert app.get_state(config).values["answer"] == "NESTED"


def test_stateless_run_forms(live_server):
    with httpx.Client(base_url=live_server.url, timeout=30) as http:
        run = http.post("/runs", json={"assistant_id": "echo", "input": {"text": "slow", "steps": 20,
                                                                         "delay": 0.2}}).json()
        cancelled = http.post(f"/runs/{run['run_id']}/cancel", params={"wait": 1})
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        done = http.post("/runs", json={"assistant_id": "echo", "input": {"text": "by id"}}).json()
        assert http.get(f"/runs/{done['run_id']}/join").json()["answer"] == "BY ID"
        streamed = http.get(f"/runs/{done['run_id']}/stream").text
        assert "event: progress" in streamed and "event: end" in streamed
        for path in ("/runs/no-such-run/join", "/runs/no-such-run/stream"):
            assert http.get(path).status_code == 404
        assert http.post("/runs/no-such-run/cancel").status_code == 404
