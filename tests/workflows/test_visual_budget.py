"""A question about four images fits the model (issue 14): every prompt of ``visual_reasoning``, with every answer
filled to its bound, fits the context with room for its answer on the tiny presets and the released geometries;
where the images cannot all be in one prompt the VLM looks at them in groups that fit and answers from the groups'
notes, so the answer uses every image either way; an image that cannot fit even alone is refused at admission.
Checked by the real engine on the tiny preset and on a tiny checkpoint with a released model's visual geometry (576
tokens an image in 2,048: four images overflow it), end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
from dataclasses import replace
from types import SimpleNamespace

import pytest
from prompt_checks import engine_length, upper_bound, vlm_requests
from test_prompt_budgets import GEOMETRIES, filled
from test_story_graph import png
from wf_helpers import ScriptedClient, drive, finish, scripted_context
from worker_support import MGMFLOW

from mgmflow.models.errors import ContextLengthError
from mgmflow.orchestrator.budget import PromptBudget, budget_for
from mgmflow.orchestrator.schemas import LONG, SHORT
from mgmflow.orchestrator.workflow import get_workflow
from mgmflow.workflows import visual_reasoning as vr

QUESTION = filled("Which of these pictures is the brightest, and what lies in its upper left corner?", 1000)
_LABEL = re.compile(r"^- images? (\d+)(?:-(\d+))?[:,]", re.MULTILINE)


def worst_case_script(store):
    """Every structured answer filled to its schema's bounds, every free answer as long as its room in bytes."""
    def script(kind: str, payload: dict, step: str) -> dict:
        if step == "plan":
            steps = [filled(f"step {n}", SHORT) for n in range(6)]
            return {"text": json.dumps({"goal": filled("goal", LONG), "steps": steps, "prompt": filled("p", LONG)})}
        if step.startswith("look:"):
            count = payload["json_schema"]["properties"]["regions"]["maxItems"]
            return {"text": json.dumps({"regions": [{"x0": 0.2 * n, "y0": 0.1, "x1": 0.2 * n + 0.3, "y1": 0.6,
                                                     "question": filled(f"what {n}", SHORT)} for n in range(count)]})}
        return {"text": filled(step, 4 * payload["max_new_tokens"])}  # inspect, observe, answer

    return script


def four_images(store) -> list[str]:
    return [store.put(png((60 * n, 90, 200 - 40 * n), size=96), scope="test", media_type="image/png").id
            for n in range(4)]


def run_worst_case(store, model: str):
    client = ScriptedClient(worst_case_script(store))
    context = dataclasses.replace(scripted_context(client, store=store), settings=SimpleNamespace(vlm_model=model))
    state = vr.VisualReasoningInput(question=QUESTION, images=four_images(store)).model_dump(mode="json")
    return drive(vr.build_graph(), state, client, context=context), vlm_requests(client, store)


def images_the_answer_used(values: dict, messages: list[dict]) -> set[int]:
    """The image numbers the final prompt carries: its images, or a group's notes on them."""
    (message,) = messages
    numbers = {values["images"].index(image) + 1 for image in message["images"]}
    for first, last in _LABEL.findall(message["text"].split("What closer looks found:")[0]):
        numbers |= set(range(int(first), int(last or first) + 1))
    return numbers


@pytest.mark.parametrize("model", GEOMETRIES)
def test_every_prompt_of_a_four_image_question_fits_the_context(model, store):
    budget = budget_for(model)
    values, requests = run_worst_case(store, model)
    for step, messages, payload in requests:
        bound = upper_bound(messages, budget.image_tokens)
        assert bound + payload["max_new_tokens"] <= budget.context_tokens, (model, step, bound)
    steps = [step for step, *_ in requests]
    groups = values["groups"]
    assert [len(group) for group in groups] == ([4] if model in ("tiny", "tiny-hd") else [1, 1, 1, 1])
    assert steps.count("answer") == 1 and sum(s.startswith("observe:") for s in steps) == (len(groups) > 1) * 4
    assert {region["image"] for region in values["regions"]} == set(values["images"])  # every image looked into
    (answer,) = [messages for step, messages, _ in requests if step == "answer"]
    assert images_the_answer_used(values, answer) == {1, 2, 3, 4}


def test_an_image_that_cannot_fit_alone_is_refused_at_admission():
    grid_of_five_views = PromptBudget(2048, 5 * 576)  # an HD geometry in a 2,048-token context
    with pytest.raises(ContextLengthError, match="no room"):
        get_workflow("visual_reasoning").validate_input({"question": "what?", "images": ["a" * 22]},
                                                        grid_of_five_views)
    get_workflow("visual_reasoning").validate_input({"question": "what?", "images": ["a" * 22] * 4},
                                                    budget_for("mgm-7b-hd"))


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory):
    """A tiny random checkpoint with a released model's visual geometry: CLIP at 336 px, 576 tokens an image, in a
    2,048-token context (the ``small`` preset's towers, the tiny LLM)."""
    from mgmflow.models.mgm import presets

    folder = tmp_path_factory.mktemp("wide-tiny")
    presets.build_tiny(replace(presets.TINY_PRESETS["small"], text=presets.TINY_PRESETS["tiny-llama"].text), folder)
    assert budget_for(str(folder)) == PromptBudget(2048, 576)
    return folder


@pytest.mark.parametrize("checkpoint", ["tiny", "wide"])
def test_the_engine_accepts_every_prompt_of_a_four_image_question(checkpoint, mgmflow_home, store, wide_tiny):
    from mgmflow.models.mgm.engine import MGMEngine

    model = "tiny" if checkpoint == "tiny" else str(wide_tiny)
    engine = MGMEngine.from_pretrained(model)
    values, requests = run_worst_case(store, model)
    for step, messages, payload in requests:
        length = engine_length(engine, messages, payload, store)
        assert length + payload["max_new_tokens"] <= engine.context_length, (step, length)


@pytest.mark.timeout(300)
def test_a_four_image_question_completes_on_the_tiny_model(embedded, tmp_path):
    from mgmflow.orchestrator.references import store_file

    images = []
    for n in range(4):
        (tmp_path / f"{n}.png").write_bytes(png((60 * n, 90, 200 - 40 * n), size=96))
        images.append(store_file(embedded.orchestrator.store, tmp_path / f"{n}.png", scope="default"))
    run = finish(embedded, embedded.create_run("visual_reasoning", {"question": QUESTION, "images": images}))
    values = embedded.output_values(run)
    context = embedded.context(run)
    answer = json.loads(context.store.get(values["answer_request"], scope="default"))
    assert values["answer"] and images_the_answer_used(values, answer) == {1, 2, 3, 4}
    assert {region["image"] for region in values["regions"]} == set(images)


@pytest.mark.timeout(300)
def test_a_four_image_question_completes_where_the_images_overflow_the_context(wide_tiny, mgmflow_home, tmp_path):
    """``mgmflow run`` on the wide checkpoint: four images of 576 tokens cannot share a 2,048-token prompt, so the
    answer is written from each image's notes and regions."""
    home = tmp_path / "home"
    (home / "presets").mkdir(parents=True)
    paths = []
    for n in range(4):
        paths += ["--images", str(tmp_path / f"{n}.png")]
        (tmp_path / f"{n}.png").write_bytes(png((60 * n, 90, 200 - 40 * n), size=96))
    env = {**os.environ, "MGMFLOW_HOME": str(home), "MGMFLOW_VLM_MODEL": str(wide_tiny), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([MGMFLOW, "run", "visual_reasoning",
                           "--question", QUESTION, *paths, "--out", str(tmp_path / "out"), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "answer.json").read_text())
    assert report["answer"] and [len(note["images"]) for note in report["notes"]] == [1, 1, 1, 1]
    assert all(note["note"] for note in report["notes"])
    assert {item["image"] for item in report["evidence"]} == set(report["images"])
