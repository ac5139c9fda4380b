"""Diffusion previews as a run option: a run created with ``previews: N`` streams ``task.step`` events that carry
preview artifact ids, which its owner (and nobody else) downloads as PNGs; without the option there are none."""

from __future__ import annotations

import io
import json

import pytest
from api_support import KEYS, auth, make_app
from langgraph.graph import END, START, StateGraph
from PIL import Image
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from mgmflow.orchestrator.runtime import TaskSpec, await_tasks
from mgmflow.orchestrator.workflow import Workflow, register

pytestmark = pytest.mark.timeout(180)

STEPS = 3


class SketchInput(BaseModel):
    prompt: str = Field(min_length=1, max_length=200)


class SketchState(TypedDict, total=False):
    prompt: str
    image: str


def _draw(state: SketchState) -> SketchState:
    """Draw the prompt once on the tiny default model: a few steps, so each one can leave a preview."""
    payload = {"prompts": [state["prompt"]], "seeds": [7], "steps": STEPS, "exclusive": True}
    (result,) = await_tasks([TaskSpec("draw", "diffusion.text2img", payload)])
    return {"image": result["images"][0]["artifact"]}


def _build_graph() -> StateGraph:
    graph = StateGraph(SketchState)
    graph.add_node("draw", _draw)
    graph.add_edge(START, "draw")
    graph.add_edge("draw", END)
    return graph


@pytest.fixture(scope="module")
def keyed(api_env):
    from fastapi.testclient import TestClient

    register(Workflow(name="sketch", input_model=SketchInput, build_graph=_build_graph, description="tests"))
    with TestClient(make_app(api_keys=list(KEYS))) as test_client:
        yield test_client


def _stream(client, body: dict, headers: dict) -> list[tuple[str, dict]]:
    """The SSE events of a run started with ``body``, to its end: (event, data) pairs."""
    events, event = [], None
    with client.stream("POST", "/runs/stream", json=body, headers=headers) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((event, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "end" and events[-1][1]["status"] == "success", events[-3:]
    return events


def test_a_run_with_previews_streams_downloadable_previews(keyed):
    alice, bob = (auth(key) for key in KEYS)
    events = _stream(keyed, {"assistant_id": "sketch", "input": {"prompt": "a red fox"}, "previews": 1}, alice)
    steps = [data for event, data in events if event == "task.step"]
    assert [data["step"] for data in steps] == list(range(1, STEPS + 1))
    assert all(data.get("preview") for data in steps), steps
    for data in steps:
        response = keyed.get(f"/artifacts/{data['preview']}/content", headers=alice)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(response.content))
        image.verify()  # a whole, valid PNG
        assert image.format == "PNG" and image.width > 0
        assert keyed.get(f"/artifacts/{data['preview']}", headers=alice).json()["metadata"]["preview"] is True
    # Another key cannot read them.
    assert keyed.get(f"/artifacts/{steps[0]['preview']}/content", headers=bob).status_code == 404


def test_previews_every_n_steps_keep_the_last(keyed):
    events = _stream(keyed, {"assistant_id": "sketch", "input": {"prompt": "an owl"}, "previews": 2}, auth(KEYS[0]))
    steps = [data for event, data in events if event == "task.step"]
    assert [data["step"] for data in steps if data.get("preview")] == [2, 3]  # every second step, and the final one


def test_a_run_without_previews_has_none(keyed):
    events = _stream(keyed, {"assistant_id": "sketch", "input": {"prompt": "a red fox"}}, auth(KEYS[0]))
    steps = [data for event, data in events if event == "task.step"]
    assert len(steps) == STEPS and not any("preview" in data for data in steps)


def test_previews_are_bounded(keyed):
    body = {"assistant_id": "sketch", "input": {"prompt": "x"}, "previews": -1}
    assert keyed.post("/runs", json=body, headers=auth(KEYS[0])).status_code == 422
    body["previews"] = 1001
    assert keyed.post("/runs", json=body, headers=auth(KEYS[0])).status_code == 422


def test_the_cli_keeps_the_latest_preview_while_the_run_draws(keyed, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mgmflow.orchestrator import cli
    from mgmflow.orchestrator.runs import RunService

    written = []

    def spy(service, run_id, artifact_id, path):
        write_preview(service, run_id, artifact_id, path)
        written.append((run_id, path.read_bytes()))

    write_preview = cli._write_preview
    monkeypatch.setattr(cli, "_write_preview", spy)
    out = tmp_path / "sketch"
    result = CliRunner().invoke(cli.main, ["run", "sketch", "--prompt", "a kite", "--previews", "2", "--out", str(out),
                                           "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(written) == 2 and all(png[:8] == b"\x89PNG\r\n\x1a\n" for _, png in written)  # steps 2 and 3
    assert not (out / cli.PREVIEW_FILE).exists()  # gone once the run has ended
    assert RunService().get_run(written[0][0]).previews == 2
