"""``visual_reasoning``: a question about one or more images, answered with its evidence.

    load_images → plan → look → crop → inspect → stage_answer → write_answer → END

The VLM plans (``Plan``), looks at every image and names the regions worth a closer look (``Regions``, one
join for all images); the regions are cropped from the *original* high-resolution artifacts (new artifacts whose
metadata names parent and box), the VLM answers each region's question on its crop (one join), and the final
answer is written from the images and that evidence. The state keeps the plan, every region, crop and
intermediate answer, so the answer can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from mgmflow.orchestrator.references import ArtifactId
from mgmflow.orchestrator.runtime import (
    RunContext, TaskSpec, VLMRequest, await_tasks, emit, get_run_context, vlm_json_many,
)
from mgmflow.orchestrator.schemas import Plan, Regions
from mgmflow.orchestrator.state import RunState
from mgmflow.orchestrator.workflow import Workflow
from mgmflow.tools.tasks import crop_region
from mgmflow.workflows.inputs import clip, resolve_images, stage_messages

MAX_REGIONS = 8  # crops inspected per question, over all images
# Room for the longest answer each schema allows (a random model fills every field to its bound).
PLAN_TOKENS = 1024
LOOK_TOKENS = 1024
REGION_TOKENS = 96
ANSWER_TOKENS = 256
# Byte budgets (as JSON) of texts inside task messages, which are capped at 4 KB.
QUESTION_BYTES = 1200
PLAN_BYTES = 800


class VisualReasoningInput(BaseModel):
    """The flags of ``mgmflow run visual_reasoning`` and the input of an HTTP run."""

    question: str = Field(min_length=1, max_length=1000, description="what to find out about the images")
    images: list[ArtifactId] = Field(min_length=1, max_length=4,
                                         description="artifact ids of the images (the CLI uploads files given by path)")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the VLM's sampling (greedy by default)")


class VisualReasoningState(RunState, total=False):
    question: str
    images: list[str]  # the input references, then artifact ids once loaded
    seed: int
    regions: list[dict[str, Any]]  # {image, x0, y0, x1, y1, question, crop, answer}
    answer_request: str
    answer: str


def load_images(state: VisualReasoningState) -> dict[str, Any]:
    """Turn the input references into artifact ids of this run's scope."""
    return {"images": resolve_images(state["images"])}


def plan(state: VisualReasoningState) -> dict[str, Any]:
    """Understand the question and plan how to look."""
    (answer,) = vlm_json_many([VLMRequest("plan", plan_prompt(state["question"], len(state["images"])), Plan,
                                          tuple(state["images"]), seed=state["seed"], max_new_tokens=PLAN_TOKENS)])
    return {"plan": answer.model_dump()}


def look(state: VisualReasoningState) -> dict[str, Any]:
    """Each image: which regions to zoom into, and what to ask about each (one join for every image)."""
    answers = vlm_json_many([
        VLMRequest(f"look:{index}", look_prompt(state["question"], state["plan"]), Regions, (image,),
                   seed=state["seed"], max_new_tokens=LOOK_TOKENS)
        for index, image in enumerate(state["images"])
    ])
    regions = [{"image": image, **region.model_dump()}
               for image, answer in zip(state["images"], answers) for region in answer.regions]
    return {"regions": regions[:MAX_REGIONS]}


def crop(state: VisualReasoningState) -> dict[str, Any]:
    """Crop every region out of its original image, as new artifacts with their lineage."""
    context = get_run_context()
    regions, refs = [], []
    for index, region in enumerate(state["regions"]):
        box = (region["x0"], region["y0"], region["x1"], region["y1"])
        stored = crop_region(context.store, context.scope, region["image"], box)
        regions.append({**region, "crop": stored.id})
        refs.append({"id": stored.id, "kind": "image", "parent": region["image"], "prompt": region["question"],
                     "tool": "zoom", "step": f"crop:{index}", "item": "main", "round": 0})
    return {"regions": regions, "artifacts": refs}


def inspect(state: VisualReasoningState) -> dict[str, Any]:
    """Ask each region's question on its crop (one join)."""
    results = await_tasks([
        TaskSpec(f"inspect:{index}", "vlm.chat", {
            "messages": [{"role": "user", "text": region_prompt(state["question"], region["question"]),
                          "images": [region["crop"]]}],
            "max_new_tokens": REGION_TOKENS, "seed": state["seed"]})
        for index, region in enumerate(state["regions"])
    ])
    regions = [{**region, "answer": result["text"]} for region, result in zip(state["regions"], results)]
    emit("progress", {"stage": "inspect", "done": len(regions), "total": len(regions)})
    return {"regions": regions}


def stage_answer(state: VisualReasoningState) -> dict[str, Any]:
    """Store the final request (the question, the images and every piece of evidence)."""
    messages = [{"role": "user", "text": answer_prompt(state["question"], state["regions"]),
                 "images": list(state["images"])}]
    return {"answer_request": stage_messages(messages)}


def write_answer(state: VisualReasoningState) -> dict[str, Any]:
    """Answer the question from the images and the evidence."""
    (result,) = await_tasks([TaskSpec("answer", "vlm.chat", {
        "messages_artifact": state["answer_request"], "max_new_tokens": ANSWER_TOKENS, "seed": state["seed"]})])
    text = result["text"]
    return {"answer": text, "messages": [{"role": "user", "text": state["question"], "images": state["images"]},
                                         {"role": "assistant", "text": text, "images": []}]}


def build_graph() -> StateGraph:
    graph = StateGraph(VisualReasoningState)
    nodes = (load_images, plan, look, crop, inspect, stage_answer, write_answer)
    names = [node.__name__ for node in nodes]
    for node in nodes:
        graph.add_node(node.__name__, node)
    graph.add_edge(START, names[0])
    for first, second in zip(names, names[1:]):
        graph.add_edge(first, second)
    graph.add_edge(names[-1], END)
    return graph


def evidence(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The regions looked at: image, box, question, crop artifact and the intermediate answer."""
    return [{"image": region["image"], "box": [region[k] for k in ("x0", "y0", "x1", "y1")],
             "question": region["question"], "crop": region["crop"], "answer": region["answer"]}
            for region in values.get("regions") or []]


def write_output(values: dict[str, Any], out_dir: Path, context: RunContext) -> dict[str, Any]:
    """``answer.json`` (answer, plan, evidence) and the crops as PNGs beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    items = evidence(values)
    for index, item in enumerate(items, start=1):
        item["crop_image"] = f"region-{index:02d}.png"
        (out_dir / item["crop_image"]).write_bytes(context.store.get(item["crop"], scope=context.scope))
    report = {"question": values["question"], "answer": values["answer"], "plan": values.get("plan"),
              "images": values["images"], "evidence": items}
    (out_dir / "answer.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def describe_output(report: dict[str, Any], out_dir: Path) -> str:
    """The answer, then each region looked at with its crop's file, for the terminal."""
    lines = [report["answer"]]
    for item in report["evidence"]:
        box = ", ".join(f"{value:.2f}" for value in item["box"])
        lines.append(f"  [{box}] {item['question']} -> {item['answer']} ({out_dir / item['crop_image']})")
    lines.append(f"(answer.json in {out_dir})")
    return "\n".join(lines)


# Prompts, formatted from raw state.
def plan_prompt(question: str, images: int) -> str:
    return (f"Question about {images} image(s): {clip(question, QUESTION_BYTES)}\n"
            "Plan how to answer it by looking at the image(s): the goal, the steps, and what to look for. "
            "Answer in JSON.")


def look_prompt(question: str, plan_: dict[str, Any]) -> str:
    steps = clip("; ".join(plan_.get("steps") or []), PLAN_BYTES)
    return (f"Question: {clip(question, QUESTION_BYTES)}\nPlan: {steps}\n"
            "Name up to four regions of this image worth a closer look to answer, as boxes in relative "
            "coordinates (0-1), each with what to ask about it. Answer in JSON.")


def region_prompt(question: str, region_question: str) -> str:
    overall = clip(question, QUESTION_BYTES)
    return f"This is a close-up of part of an image. Overall question: {overall}\n{region_question}"


def answer_prompt(question: str, regions: list[dict[str, Any]]) -> str:
    notes = "\n".join(f"- image {region['image']}, region {[round(region[k], 2) for k in ('x0', 'y0', 'x1', 'y1')]}: "
                      f"{region['question']} → {region['answer']}" for region in regions)
    return f"Question: {question}\nWhat closer looks found:\n{notes}\nAnswer the question, citing the evidence."


workflow = Workflow(
    name="visual_reasoning",
    input_model=VisualReasoningInput,
    build_graph=build_graph,
    write_output=write_output,
    describe_output=describe_output,
    description="a question about images → plan → look → zoom into regions → an answer with its evidence",
)
