"""The batch workflow: one workflow over many inputs, a concurrency limit, failures reported per item."""

from __future__ import annotations

import pytest
from wf_helpers import finish
from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel
from typing_extensions import TypedDict

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.runtime import TaskSpec, await_tasks
from mgmflow.orchestrator.workflow import Workflow, get_workflow, register, unregister


class DescribeInput(BaseModel):
    text: str
    fail: bool = False


class DescribeState(TypedDict, total=False):
    text: str
    fail: bool
    answer: str


def answer(state: DescribeState) -> dict:
    """One real (tiny) VLM task per item, so that items really run in parallel on the workers."""
    if state["fail"]:
        raise InvalidInputError("this item was made to fail")
    (result,) = await_tasks([TaskSpec("answer", "vlm.chat", {
        "messages": [{"role": "user", "text": state["text"], "images": []}], "max_new_tokens": 4})])
    return {"answer": result["text"]}


def build_graph() -> StateGraph:
    graph = StateGraph(DescribeState)
    graph.add_node("answer", answer)
    graph.add_edge(START, "answer")
    graph.add_edge("answer", END)
    return graph


@pytest.fixture
def item_workflow():
    register(Workflow("test-batch-item", DescribeInput, build_graph))
    yield "test-batch-item"
    unregister("test-batch-item")


@pytest.mark.timeout(300)
def test_batch_runs_every_item_and_reports_failures_per_item(embedded, item_workflow, tmp_path):
    items = [{"text": f"item {i}"} for i in range(5)]
    items[1] = {"text": "boom", "fail": True}  # its run fails
    items[3] = {"fail": "not a bool", "text": 7}  # its input is refused
    batch = finish(embedded, embedded.create_run("batch", {"workflow": item_workflow, "items": items,
                                                           "concurrency": 2}))
    values = embedded.output_values(batch)
    report = get_workflow("batch").write_output(values, tmp_path, embedded.context(batch))
    statuses = [item["status"] for item in report["items"]]
    assert statuses == ["success", "error", "success", "invalid", "success"]
    assert report["summary"] == {"success": 3, "error": 1, "invalid": 1}
    assert "made to fail" in report["items"][1]["error"]["message"]
    assert report["items"][3]["run_id"] is None and "text" in report["items"][3]["error"]["message"]

    # The children are ordinary runs: readable, with their own outputs, tied to the batch.
    children = [embedded.get_run(item["run_id"]) for item in report["items"] if item["run_id"]]
    assert all(child.metadata["parent_run_id"] == batch.run_id for child in children)
    assert embedded.output_values(children[0])["answer"]
    # Never more than `concurrency` children at once: each child started after an earlier one ended.
    starts = sorted(child.created_at for child in children)
    ends = sorted(child.updated_at for child in children)
    assert starts[2] >= ends[0]


def test_batch_input_is_checked_up_front():
    workflow = get_workflow("batch")
    for bad, message in [({"workflow": "nope", "items": [{}]}, "unknown workflow"),
                         ({"workflow": "batch", "items": [{}]}, "cannot run batches"),
                         ({"workflow": "story", "items": []}, "items"),
                         ({"workflow": "story", "items": [{}], "concurrency": 0}, "concurrency")]:
        with pytest.raises(InvalidInputError, match=message):
            workflow.validate_input(bad)


class EchoInput(BaseModel):
    text: str


def build_echo_graph() -> StateGraph:
    graph = StateGraph(EchoInput)
    graph.add_node("echo", lambda state: {"text": state.text.upper()})
    graph.add_edge(START, "echo")
    graph.add_edge("echo", END)
    return graph


@pytest.fixture
def echo_workflow():
    register(Workflow("test-batch-echo", EchoInput, build_echo_graph))
    yield "test-batch-echo"
    unregister("test-batch-echo")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("form", ["json-file", "jsonl-file", "inline-list", "repeated-objects"])
def test_run_batch_takes_items_from_a_file_or_inline_json(embedded, echo_workflow, tmp_path, form):
    """``mgmflow run batch --items`` reads a JSON list or JSON Lines file, an inline list, or repeated objects."""
    import json

    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main

    items = [{"text": f"{form} {i}"} for i in range(3)]
    if form == "json-file":
        (tmp_path / "items.json").write_text(json.dumps(items))
        flags = ["--items", str(tmp_path / "items.json")]
    elif form == "jsonl-file":
        (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n\n" for item in items))
        flags = ["--items", str(tmp_path / "items.jsonl")]
    elif form == "inline-list":
        flags = ["--items", json.dumps(items)]
    else:
        flags = [part for item in items for part in ("--items", json.dumps(item))]
    result = CliRunner().invoke(main, ["run", "batch", "--workflow", echo_workflow, *flags, "--concurrency", "2",
                                       "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert report["summary"] == {"success": 3}
    outputs = [embedded.output_values(embedded.get_run(item["run_id"]))["text"] for item in report["items"]]
    assert outputs == [item["text"].upper() for item in items]


@pytest.mark.parametrize(("value", "message"), [
    ("missing.jsonl", "neither JSON nor a readable JSON / JSON Lines file"),
    ("[1, 2]", "every item must be a JSON object"),
    ('{"text": ', "not JSON or JSON Lines"),
])
def test_run_batch_refuses_items_it_cannot_read_in_one_line(echo_workflow, tmp_path, value, message):
    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main

    result = CliRunner().invoke(main, ["run", "batch", "--workflow", echo_workflow, "--items", value,
                                       "--out", str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
