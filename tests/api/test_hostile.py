"""Hostile requests over HTTP against a live server with API keys (issue 12, "Low"): each is refused with a short
4xx/503 JSON error, never a 500 or a dropped connection, and leaves nothing behind."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
from api_support import LiveServer, auth, make_app
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel
from testkit import wait_for
from typing_extensions import TypedDict

from mgmflow.orchestrator.runtime import request_approval
from mgmflow.orchestrator.workflow import Workflow, register
from mgmflow.workers.steps import StepContext

pytestmark = pytest.mark.timeout(120)

KEYS = ("hostile-a", "hostile-b", "hostile-empty")


class AskInput(BaseModel):
    prompt: str = "a lighthouse"


class AskState(TypedDict, total=False):
    prompt: str
    answer: str


def _ask(state: AskState) -> AskState:
    """Stop for approval (runs started with ``approve``), then answer with the approved prompt."""
    value = request_approval({"prompt": state["prompt"]}) or {}
    return {"answer": value.get("prompt", state["prompt"])}


def _ask_graph() -> StateGraph:
    graph = StateGraph(AskState)
    graph.add_node("ask", _ask)
    graph.add_edge(START, "ask")
    graph.add_edge("ask", END)
    return graph


@pytest.fixture(scope="module")
def server(api_env):
    register(Workflow(name="ask", input_model=AskInput, build_graph=_ask_graph, description="Approval for tests"))
    with LiveServer(make_app(api_keys=list(KEYS), max_prompt_chars=1000)) as live:
        yield live


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _refused(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert isinstance(body["detail"], str) and 0 < len(body["detail"]) <= 300, body
    if code is not None:
        assert body["code"] == code, body
    return body


def _nothing_created(http: httpx.Client, key: str = "hostile-empty") -> None:
    assert http.get("/runs", headers=auth(key)).json() == []
    assert http.post("/threads/search", json={}, headers=auth(key)).json() == []


def test_a_non_ascii_api_key_is_401(http):
    for raw in ("Bearer clé-ü".encode(), b"Bearer \xff\xfe", "Bearer hostile-a\u00e9".encode("latin-1")):
        response = http.get("/runs", headers={"Authorization": raw})
        _refused(response, 401, "unauthorized")
    response = http.get("/runs", headers={"x-api-key": "ключ".encode()})
    _refused(response, 401, "unauthorized")


@pytest.mark.parametrize("path", ["/runs", "/threads/t-offset/runs"])
def test_an_offset_beyond_a_64_bit_integer_is_422(http, path):
    http.post("/threads", json={"thread_id": "t-offset", "if_exists": "do_nothing"}, headers=auth("hostile-a"))
    for offset in (2**63, 10**30):
        _refused(http.get(path, params={"offset": offset}, headers=auth("hostile-a")), 422, "invalid_request")


@pytest.mark.parametrize("thread_id", ["thréad", "line\r\nX-Injected: 1", "nul\x00byte", "a" * 200, "sp ace"])
def test_bad_path_ids_create_nothing(http, thread_id):
    path = f"/threads/{quote(thread_id, safe='')}/runs"
    body = {"assistant_id": "echo", "input": {"text": "x"}, "if_not_exists": "create"}
    for suffix in ("", "/wait", "/stream"):
        _refused(http.post(path + suffix, json=body, headers=auth("hostile-empty")), 422, "invalid_request")
    _refused(http.get(path, headers=auth("hostile-empty")), 422, "invalid_request")
    _nothing_created(http)


def test_a_resume_value_obeys_the_prompt_limit(http):
    headers = auth("hostile-a")
    thread = http.post("/threads", json={}, headers=headers).json()["thread_id"]
    run = http.post(f"/threads/{thread}/runs", json={"assistant_id": "ask", "approve": True}, headers=headers).json()
    wait_for(lambda: http.get(f"/runs/{run['run_id']}", headers=headers).json()["status"] == "interrupted")
    long = {"assistant_id": "ask", "command": {"resume": {"prompt": "x" * 5000}}}
    _refused(http.post(f"/threads/{thread}/runs", json=long, headers=headers), 413, "prompt_too_long")
    assert http.get(f"/runs/{run['run_id']}", headers=headers).json()["status"] == "interrupted"
    short = {"assistant_id": "ask", "command": {"resume": {"prompt": "a boat"}}}
    assert http.post(f"/threads/{thread}/runs", json=short, headers=headers).status_code == 200
    final = http.get(f"/threads/{thread}/runs/{run['run_id']}/join", headers=headers).json()
    assert final["answer"] == "a boat"


def test_the_queue_position_counts_only_the_callers_runs(http):
    # B's thread: one slow run, then one waiting behind it. A's runs pending meanwhile must not count for B.
    a, b = auth("hostile-a"), auth("hostile-b")
    slow = {"assistant_id": "echo", "input": {"text": "slow", "steps": 20, "delay": 0.1}}
    a_thread = http.post("/threads", json={}, headers=a).json()["thread_id"]
    a_runs = [http.post(f"/threads/{a_thread}/runs", json=slow, headers=a).json() for _ in range(3)]
    b_thread = http.post("/threads", json={}, headers=b).json()["thread_id"]
    first = http.post(f"/threads/{b_thread}/runs", json=slow, headers=b).json()
    second = http.post(f"/threads/{b_thread}/runs", json=slow, headers=b).json()
    try:
        read = http.get(f"/runs/{second['run_id']}", headers=b).json()
        a_pending = [http.get(f"/runs/{r['run_id']}", headers=a).json()["status"] for r in a_runs].count("pending")
        assert read["status"] == "pending" and a_pending >= 2  # A's runs on one thread wait for each other
        assert read["position"] in (0, 1)  # B's first run, if it has not started yet; never A's
    finally:
        for run, headers in [(second, b), (first, b), *[(r, a) for r in a_runs]]:
            http.post(f"/threads/{run['thread_id']}/runs/{run['run_id']}/cancel", headers=headers)


def test_readiness_does_not_show_connection_strings(api_env):
    broker = "redis://:s3cret-password@127.0.0.1:1/0"  # nothing listens on port 1
    with LiveServer(make_app(broker_url=broker, api_keys=["k"])) as live:
        response = httpx.get(f"{live.url}/readyz", timeout=30)
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["broker"] == "unreachable" and checks["store"] == "ok", checks
    assert "s3cret" not in response.text and "127.0.0.1" not in response.text



def test_error_bodies_are_short_and_free_of_internals(http):
    junk = http.post("/artifacts", files={"file": ("x.png", b"GIF89a but not really", "image/png")},
                     headers=auth("hostile-a"))
    body = _refused(junk, 400, "invalid_image")
    assert "object at 0x" not in body["detail"] and "BytesIO" not in body["detail"]
    # The regex parser's message spans lines and repeats the pattern: the client gets one short line.
    schema = {"type": "string", "pattern": "((" + "a" * 500}
    chat = http.post("/v1/chat/completions", headers=auth("hostile-a"), json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})
    assert chat.status_code == 400, chat.text
    message = chat.json()["error"]["message"]
    assert len(message) <= 300 and "\n" not in message and message.endswith("unclosed group"), message


def test_redis_down_is_503_with_retry_after(api_env, tmp_path):
    from worker_support import RedisServer

    redis = RedisServer(tmp_path)
    try:
        with LiveServer(make_app(broker_url=redis.url, api_keys=["k"])) as live, \
                httpx.Client(base_url=live.url, headers=auth("k"), timeout=60) as client:
            assert client.get("/runs").status_code == 200
            redis.kill()
            for method, path, body in [("GET", "/runs", None), ("GET", "/runs/no-such-run", None),
                                       ("POST", "/runs", {"assistant_id": "echo", "input": {"text": "x"}})]:
                response = client.request(method, path, json=body)
                refused = _refused(response, 503, "unavailable")
                assert int(response.headers["Retry-After"]) >= 1 and "127.0.0.1" not in refused["detail"]
    finally:
        redis.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_an_abandoned_chat_completion_stops_its_model_step(server, stream, monkeypatch):
    # The test watches which model steps the route submits (a spy on the in-process task client).
    tasks = server.server.config.app.state.context.tasks
    submitted: list[str] = []
    submit = tasks.submit

    def spy(kind, payload, *, task_id, **kwargs):
        submitted.append(task_id)
        return submit(kind, payload, task_id=task_id, **kwargs)

    # The step holds at its first token until the server has cancelled it: a model fast enough to finish before the
    # client's timeout (or before the server notices the hang-up) would otherwise end "done", for nobody.
    publish_token = StepContext.on_token

    def held_at_first_token(ctx, text):
        publish_token(ctx, text)
        if ctx.header.task_id in submitted:
            wait_for(lambda: ctx.runtime.records.is_cancelled(ctx.header.run_id, ctx.header.task_id), 30,
                     "the server to cancel the abandoned step")

    monkeypatch.setattr(StepContext, "on_token", held_at_first_token)
    tasks.submit = spy
    body = {"model": "tiny", "max_tokens": 8192, "temperature": 1.0, "seed": 5, "stream": stream,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    try:
        with httpx.Client(base_url=server.url, headers=auth("hostile-a"), timeout=httpx.Timeout(30, read=1)) as client:
            if stream:
                with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = response.iter_lines()
                    while '"content": "' not in next(lines) or not submitted:  # a token arrived: the step runs
                        pass
                # leaving the block closes the connection mid-stream
            else:
                with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and hangs up
                    client.post("/v1/chat/completions", json=body)
    finally:
        tasks.submit = submit
    (task_id,) = submitted
    record = wait_for(lambda: (r := tasks.get(task_id)) is not None and r.final and r, timeout=20,
                      what="the abandoned step to end")
    assert record.status == "cancelled", record
