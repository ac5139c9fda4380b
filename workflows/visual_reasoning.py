"""``visual_reasoning``: a question about one or more images, answered with its evidence.

    load_images → plan → look → crop → inspect ─┬─ the images fit one prompt ─────┬→ stage_answer → write_answer → END
                                                └─ observe (in groups that fit) ──┘

The VLM plans (``Plan``), looks at every image and names the regions worth a closer look (``Regions``, one
join for all images); the regions are cropped from the *original* high-resolution artifacts (new artifacts whose
metadata names parent and box), the VLM answers each region's question on its crop (one join), and the final
answer is written from the images and that evidence. The state keeps the plan, every region, crop and
intermediate answer, so the answer can be checked.

Every prompt fits the model's context by construction (``orchestrator.budget``). When the images cannot all be in
one prompt beside the question and the answer (four images of 576 visual tokens on a 2,048-token model), the VLM
looks at them in groups that fit (``observe``: each group's notes, as text) and answers from those notes and the
regions' answers, every text clipped to its share. An image that cannot fit even alone is refused at admission.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from mgmflow.models.errors import ContextLengthError
from mgmflow.orchestrator.budget import PromptBudget, configured_budget, fill, run_budget
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
LOOK_REGIONS = 4  # the most regions one look names (``Regions``)
# Room for the longest answer each schema allows (a random model fills every field to its bound).
PLAN_TOKENS = 1024
LOOK_TOKENS = 1024  # for LOOK_REGIONS regions: a look with less room names fewer
REGION_TOKENS = 96
NOTE_TOKENS = 256  # a group's observations
ANSWER_TOKENS = 256
TEXT_BYTES = 512  # the least text a prompt carries beside its images: the question (clipped) and what to do
LOOK_SHARE = 0.4  # of a look's room for its text: the rest is for the regions it names
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
    groups: list[list[str]]  # the images in groups that fit one prompt (one group: all of them)
    regions: list[dict[str, Any]]  # {image, x0, y0, x1, y1, question, crop, answer}
    notes: list[str]  # each group's observations, when there are several groups
    answer_request: str
    answer: str


def group_size(budget: PromptBudget) -> int:
    """The most images one prompt carries beside the question and a whole answer; ``ContextLengthError`` when not
    even one fits."""
    size = budget.images_per_prompt(text_bytes=TEXT_BYTES, answer_tokens=ANSWER_TOKENS)
    if size < 1:
        raise ContextLengthError(
            f"one image takes {budget.image_tokens} of this model's {budget.context_tokens} context tokens: no room "
            "is left for the question and its answer")
    return size


def check_budget(request: VisualReasoningInput, budget: PromptBudget) -> None:
    """At admission: one image at least fits a prompt (more are looked at in groups)."""
    group_size(budget)


def load_images(state: VisualReasoningState) -> dict[str, Any]:
    """Turn the input references into artifact ids of this run's scope, in groups that fit one prompt."""
    images, budget = resolve_images(state["images"]), configured_budget()
    size = group_size(budget)
    return {"images": images, "prompt_budget": budget.to_state(), "notes": [],
            "groups": [images[first:first + size] for first in range(0, len(images), size)]}


def plan(state: VisualReasoningState) -> dict[str, Any]:
    """Understand the question and plan how to look (seeing the images that fit beside a whole plan)."""
    budget = run_budget(state)
    seen = state["images"][:budget.images_per_prompt(text_bytes=TEXT_BYTES, answer_tokens=PLAN_TOKENS)]
    limit = budget.prompt_bytes(images=len(seen), answer_tokens=PLAN_TOKENS, share=0)
    (answer,) = vlm_json_many([VLMRequest(
        "plan", plan_prompt(state["question"], len(seen), len(state["images"]), limit), Plan, tuple(seen),
        seed=state["seed"], max_new_tokens=min(PLAN_TOKENS, budget.answer_room(images=len(seen), share=0)))])
    return {"plan": answer.model_dump()}


def look(state: VisualReasoningState) -> dict[str, Any]:
    """Each image: which regions to zoom into, and what to ask about each (one join for every image)."""
    budget = run_budget(state)
    answer_tokens = min(LOOK_TOKENS, budget.answer_room(images=1, share=LOOK_SHARE))
    count = max(1, min(LOOK_REGIONS, answer_tokens * LOOK_REGIONS // LOOK_TOKENS))
    prompt = look_prompt(state["question"], state["plan"], count,
                         budget.prompt_bytes(images=1, answer_tokens=LOOK_TOKENS, share=LOOK_SHARE))
    answers = vlm_json_many([
        VLMRequest(f"look:{index}", prompt, Regions, (image,), seed=state["seed"], max_new_tokens=answer_tokens,
                   list_sizes=None if count == LOOK_REGIONS else {"regions": count})
        for index, image in enumerate(state["images"])
    ])
    return {"regions": spread([[{"image": image, **region.model_dump()} for region in answer.regions]
                               for image, answer in zip(state["images"], answers)], MAX_REGIONS)}


def spread(per_image: list[list[dict[str, Any]]], limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` regions, every image's first before any image's second, in image order."""
    ranked = sorted((rank, index) for index, regions in enumerate(per_image) for rank in range(len(regions)))
    kept = set(ranked[:limit])
    return [region for index, regions in enumerate(per_image) for rank, region in enumerate(regions)
            if (rank, index) in kept]


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
    budget = run_budget(state)
    limit = budget.prompt_bytes(images=1, answer_tokens=REGION_TOKENS)
    results = await_tasks([
        TaskSpec(f"inspect:{index}", "vlm.chat", {
            "messages": [{"role": "user", "text": region_prompt(state["question"], region["question"], limit),
                          "images": [region["crop"]]}],
            "max_new_tokens": min(REGION_TOKENS, budget.answer_room(images=1)), "seed": state["seed"]})
        for index, region in enumerate(state["regions"])
    ])
    regions = [{**region, "answer": result["text"]} for region, result in zip(state["regions"], results)]
    emit("progress", {"stage": "inspect", "done": len(regions), "total": len(regions)})
    return {"regions": regions}


def after_inspect(state: VisualReasoningState) -> Literal["observe", "stage_answer"]:
    return "observe" if len(state["groups"]) > 1 else "stage_answer"


def observe(state: VisualReasoningState) -> dict[str, Any]:
    """Each group of images: what it shows that bears on the question, as notes (one join)."""
    budget, first = run_budget(state), 1
    tasks = []
    for index, group in enumerate(state["groups"]):
        limit = budget.prompt_bytes(images=len(group), answer_tokens=NOTE_TOKENS, share=0)
        text = observe_prompt(state["question"], range(first, first + len(group)), len(state["images"]), limit)
        tasks.append(TaskSpec(f"observe:{index}", "vlm.chat", {
            "messages": [{"role": "user", "text": text, "images": group}], "seed": state["seed"],
            "max_new_tokens": min(NOTE_TOKENS, budget.answer_room(images=len(group), share=0))}))
        first += len(group)
    return {"notes": [result["text"] for result in await_tasks(tasks)]}


def stage_answer(state: VisualReasoningState) -> dict[str, Any]:
    """Store the final request: the question, every piece of evidence, and the images when they all fit (else the
    groups' notes stand for them)."""
    images = list(state["images"]) if len(state["groups"]) == 1 else []
    limit = run_budget(state).prompt_bytes(images=len(images), answer_tokens=ANSWER_TOKENS, share=0)
    text = answer_prompt(state["question"], state["images"], state["groups"], state.get("notes") or [],
                         state["regions"], limit)
    return {"answer_request": stage_messages([{"role": "user", "text": text, "images": images}])}


def write_answer(state: VisualReasoningState) -> dict[str, Any]:
    """Answer the question from the images and the evidence."""
    (result,) = await_tasks([TaskSpec("answer", "vlm.chat", {
        "messages_artifact": state["answer_request"], "max_new_tokens": ANSWER_TOKENS, "seed": state["seed"]})])
    text = result["text"]
    return {"answer": text, "messages": [{"role": "user", "text": state["question"], "images": state["images"]},
                                         {"role": "assistant", "text": text, "images": []}]}


def build_graph() -> StateGraph:
    graph = StateGraph(VisualReasoningState)
    for node in (load_images, plan, look, crop, inspect, observe, stage_answer, write_answer):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "load_images")
    for first, second in (("load_images", "plan"), ("plan", "look"), ("look", "crop"), ("crop", "inspect"),
                          ("observe", "stage_answer"), ("stage_answer", "write_answer")):
        graph.add_edge(first, second)
    graph.add_conditional_edges("inspect", after_inspect)
    graph.add_edge("write_answer", END)
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
              "images": values["images"], "evidence": items,
              "notes": [{"images": group, "note": note}
                        for group, note in zip(values.get("groups") or [], values.get("notes") or [])]}
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


# Prompts, formatted from raw state, each within ``limit`` bytes (as JSON).
def plan_prompt(question: str, seen: int, images: int, limit: int) -> str:
    shown = "" if seen == images else f" ({seen} of them shown here)" if seen else " (not shown here)"
    return fill(f"Question about {images} image(s){shown}: {{}}\n"
                "Plan how to answer it by looking at the image(s): the goal, the steps, and what to look for. "
                "Answer in JSON.", limit, [clip(question, QUESTION_BYTES)])


def look_prompt(question: str, plan_: dict[str, Any], regions: int, limit: int) -> str:
    steps = clip("; ".join(plan_.get("steps") or []), PLAN_BYTES)
    return fill(f"Question: {{}}\nPlan: {{}}\nName up to {regions} region(s) of this image worth a closer look to "
                "answer, as boxes in relative coordinates (0-1), each with what to ask about it. Answer in JSON.",
                limit, [clip(question, QUESTION_BYTES), steps])


def region_prompt(question: str, region_question: str, limit: int) -> str:
    return fill("This is a close-up of part of an image. Overall question: {}\n{}", limit,
                [clip(question, QUESTION_BYTES), region_question])


def observe_prompt(question: str, numbers: range, images: int, limit: int) -> str:
    return fill(f"These are {_images(numbers)} of {images}. Question about all of them: {{}}\n"
                "Note, image by image, what these images show that bears on the question.",
                limit, [clip(question, QUESTION_BYTES)])


def answer_prompt(question: str, images: list[str], groups: list[list[str]], notes: list[str],
                  regions: list[dict[str, Any]], limit: int) -> str:
    """The question, each group's notes and each region's answer, labelled by image number (1 = the first image)."""
    number = {image: index for index, image in enumerate(images, start=1)}
    template, texts = "Question: {}\n", [clip(question, QUESTION_BYTES)]
    if notes:
        template += "What the images show:\n"
        for group, note in zip(groups, notes):
            template += f"- {_images(range(number[group[0]], number[group[-1]] + 1))}: {{}}\n"
            texts.append(note)
    template += "What closer looks found:\n"
    for region in regions:
        box = [round(region[k], 2) for k in ("x0", "y0", "x1", "y1")]
        template += f"- image {number[region['image']]}, region {box}: {{}} → {{}}\n"
        texts += [region["question"], region["answer"]]
    return fill(template + "Answer the question, citing the evidence.", limit, texts)


def _images(numbers: range) -> str:
    return f"image {numbers[0]}" if len(numbers) == 1 else f"images {numbers[0]}-{numbers[-1]}"


workflow = Workflow(
    name="visual_reasoning",
    input_model=VisualReasoningInput,
    build_graph=build_graph,
    write_output=write_output,
    describe_output=describe_output,
    check_budget=check_budget,
    description="a question about images → plan → look → zoom into regions → an answer with its evidence",
)
