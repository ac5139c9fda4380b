"""``visual_reasoning``: a question about one or more images, answered with its evidence.

    load_images → plan → advance ⟲ ─┬─ an image's look finished → crop → advance
                                    └─ every region answered, every group noted → stage_answer → write_answer → END

The VLM plans (``Plan``); then each image goes on its own way as soon as its previous step is done, with no join
across images: the VLM looks at it and names the regions worth a closer look (``Regions``; each image keeps its share
of ``MAX_REGIONS``), the regions are cropped from the *original* high-resolution artifact (new artifacts whose
metadata names parent and box), and the VLM answers each region's question on its crop. The only join is the final
answer, written from the images and that evidence. ``advance`` is the scheduler (``runtime.advance_items``): it moves
every image whose step finished, returns so the move is checkpointed, and parks until any awaited task finishes;
crops are made in a node of their own, so an inspection is only ever submitted with a checkpointed crop. Task steps
are named by image and region, so the result does not depend on the order steps finish in. The state keeps the
plan, every region, crop and intermediate answer, so the answer can be checked.

Every prompt fits the model's context by construction (``orchestrator.budget``). When the images cannot all be in
one prompt beside the question and the answer (four images of 576 visual tokens on a 2,048-token model), the VLM
also looks at them in groups that fit (``observe``, submitted with the plan: each group's notes, as text) and answers
from those notes and the regions' answers, every text clipped to its share. An image that cannot fit even alone is
refused at admission.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field
from typing_extensions import TypedDict  # pydantic (the API's state schemas) needs it on Python < 3.12

from mgmflow.models.errors import ContextLengthError
from mgmflow.orchestrator.budget import PromptBudget, configured_budget, fill, run_budget
from mgmflow.orchestrator.references import ArtifactId
from mgmflow.orchestrator.runtime import (
    RunContext, TaskSpec, VLMRequest, advance_items, answer_text, await_tasks, emit, get_run_context, parse_json,
    submit_tasks, vlm_json_many,
)
from mgmflow.orchestrator.schemas import Plan, Regions
from mgmflow.orchestrator.state import RunState
from mgmflow.orchestrator.workflow import Workflow
from mgmflow.tools.tasks import crop_region
from mgmflow.workflows.inputs import clip, resolve_images, stage_messages

MAX_REGIONS = 8  # crops inspected per question, over all images (each image its share)
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


class Item(TypedDict, total=False):
    """An image on its way (look → crop → inspect → done), or a group of images to note (observe → done)."""

    stage: Literal["look", "crop", "inspect", "observe", "done"]
    index: int  # the image's or the group's position: names its task steps
    images: list[str]  # the image, or the group's images
    regions: list[dict[str, Any]]  # an image's, once looked at (as in the state's ``regions``)
    note: str  # a group's, once noted


class VisualReasoningState(RunState, total=False):
    question: str
    images: list[str]  # the input references, then artifact ids once loaded
    seed: int
    groups: list[list[str]]  # the images in groups that fit one prompt (one group: all of them)
    items: list[Item]  # where each image (and each group, when there are several) stands
    regions: list[dict[str, Any]]  # {image, x0, y0, x1, y1, question, crop, answer}, in image order
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
    """Turn the input references into artifact ids of this run's scope, in groups that fit one prompt; every image
    (and every group, when there are several) starts on its own way."""
    images, budget = resolve_images(state["images"]), configured_budget()
    size = group_size(budget)
    groups = [images[first:first + size] for first in range(0, len(images), size)]
    items: list[Item] = [{"stage": "look", "index": index, "images": [image]} for index, image in enumerate(images)]
    if len(groups) > 1:
        items += [{"stage": "observe", "index": index, "images": group} for index, group in enumerate(groups)]
    return {"images": images, "prompt_budget": budget.to_state(), "groups": groups, **gathered(items)}


def plan(state: VisualReasoningState) -> dict[str, Any]:
    """Understand the question and plan how to look (seeing the images that fit beside a whole plan). The groups'
    notes need no plan: they start with it."""
    submit_tasks([observe_task(state, item) for item in state["items"] if item["stage"] == "observe"])
    budget = run_budget(state)
    seen = state["images"][:budget.images_per_prompt(text_bytes=TEXT_BYTES, answer_tokens=PLAN_TOKENS)]
    limit = budget.prompt_bytes(images=len(seen), answer_tokens=PLAN_TOKENS, share=0)
    (answer,) = vlm_json_many([VLMRequest(
        "plan", plan_prompt(state["question"], len(seen), len(state["images"]), limit), Plan, tuple(seen),
        seed=state["seed"], max_new_tokens=min(PLAN_TOKENS, budget.answer_room(images=len(seen), share=0)))])
    return {"plan": answer.model_dump()}


def advance(state: VisualReasoningState) -> dict[str, Any]:
    """Move every image (and group) whose step finished on to its next step; park until any awaited task finishes."""
    items, moved, _ = advance_items(state["items"], partial(tasks, state), partial(complete, state))
    if not moved:
        return {}  # every item is done, or waits for its crops
    if any(items[position]["stage"] == "done" for position in moved):
        emit("progress", {"stage": "evidence", "done": sum(item["stage"] == "done" for item in items),
                          "total": len(items)})
    return gathered(items)


# What an item's current step asks of the VLM (pure: the same item gives the same tasks, under the same steps).
def tasks(state: VisualReasoningState, item: Item) -> list[TaskSpec]:
    if item["stage"] == "look":
        return [look_task(state, item)]
    if item["stage"] == "inspect":
        return inspect_tasks(state, item)
    if item["stage"] == "observe":
        return [observe_task(state, item)]
    return []  # crop (a node of its own), done


def look_task(state: VisualReasoningState, item: Item) -> TaskSpec:
    """Which regions of the image to zoom into, and what to ask about each."""
    budget = run_budget(state)
    answer_tokens = min(LOOK_TOKENS, budget.answer_room(images=1, share=LOOK_SHARE))
    count = max(1, min(LOOK_REGIONS, answer_tokens * LOOK_REGIONS // LOOK_TOKENS))
    prompt = look_prompt(state["question"], state["plan"], count,
                         budget.prompt_bytes(images=1, answer_tokens=LOOK_TOKENS, share=LOOK_SHARE))
    return VLMRequest(f"look:{item['index']}", prompt, Regions, tuple(item["images"]), seed=state["seed"],
                      max_new_tokens=answer_tokens,
                      list_sizes=None if count == LOOK_REGIONS else {"regions": count}).task()


def inspect_tasks(state: VisualReasoningState, item: Item) -> list[TaskSpec]:
    """Each region's question, asked on its crop."""
    budget = run_budget(state)
    limit = budget.prompt_bytes(images=1, answer_tokens=REGION_TOKENS)
    return [TaskSpec(f"inspect:{item['index']}:{number}", "vlm.chat", {
        "messages": [{"role": "user", "text": region_prompt(state["question"], region["question"], limit),
                      "images": [region["crop"]]}],
        "max_new_tokens": min(REGION_TOKENS, budget.answer_room(images=1)), "seed": state["seed"]})
        for number, region in enumerate(item["regions"])]


def observe_task(state: VisualReasoningState, item: Item) -> TaskSpec:
    """What a group of images shows that bears on the question, as notes."""
    budget, group = run_budget(state), item["images"]
    first = 1 + sum(len(earlier) for earlier in state["groups"][:item["index"]])
    limit = budget.prompt_bytes(images=len(group), answer_tokens=NOTE_TOKENS, share=0)
    text = observe_prompt(state["question"], range(first, first + len(group)), len(state["images"]), limit)
    return TaskSpec(f"observe:{item['index']}", "vlm.chat", {
        "messages": [{"role": "user", "text": text, "images": group}], "seed": state["seed"],
        "max_new_tokens": min(NOTE_TOKENS, budget.answer_room(images=len(group), share=0))})


def complete(state: VisualReasoningState, item: Item, specs: list[TaskSpec],
             results: list[Any]) -> tuple[Item, dict[str, list]]:
    """The item once its step finished: an image's regions (its share of them) to crop, then their answers; a
    group's notes."""
    if item["stage"] == "look":
        answer = parse_json(Regions, answer_text(results[0], step=specs[0].step), step=specs[0].step)
        share = region_share(item["index"], len(state["images"]))
        regions = [{"image": item["images"][0], **region.model_dump()} for region in answer.regions[:share]]
        return {**item, "regions": regions, "stage": "crop"}, {}
    if item["stage"] == "inspect":
        regions = [{**region, "answer": result["text"]} for region, result in zip(item["regions"], results)]
        return {**item, "regions": regions, "stage": "done"}, {}
    return {**item, "note": results[0]["text"], "stage": "done"}, {}  # observed


def region_share(index: int, images: int) -> int:
    """How many of the ``MAX_REGIONS`` the ``index``-th of ``images`` images keeps: as even as can be, the first
    images first, so that no image waits for another's look."""
    return MAX_REGIONS // images + (index < MAX_REGIONS % images)


def crop(state: VisualReasoningState) -> dict[str, Any]:
    """Crop the regions of every image just looked at out of its original, as new artifacts with their lineage. A
    node of its own, so that the crops are checkpointed before a task refers to them (cropping again after a crash
    here leaves an unused artifact, never a task that saw another crop)."""
    context = get_run_context()
    items, refs = [], []
    for item in state["items"]:
        if item["stage"] == "crop":
            item, made = crop_regions(context, item)
            refs += made
        items.append(item)
    return {**gathered(items), "artifacts": refs}


def crop_regions(context: RunContext, item: Item) -> tuple[Item, list[dict[str, Any]]]:
    regions, refs = [], []
    for number, region in enumerate(item["regions"]):
        box = (region["x0"], region["y0"], region["x1"], region["y1"])
        stored = crop_region(context.store, context.scope, region["image"], box)
        regions.append({**region, "crop": stored.id})
        refs.append({"id": stored.id, "kind": "image", "parent": region["image"], "prompt": region["question"],
                     "tool": "zoom", "step": f"crop:{item['index']}:{number}", "item": "main", "round": 0})
    return {**item, "regions": regions, "stage": "inspect"}, refs


def gathered(items: list[Item]) -> dict[str, Any]:
    """The items, and the evidence they hold so far: the regions in image order, the groups' notes in order."""
    return {"items": items, "regions": [region for item in items for region in item.get("regions", [])],
            "notes": [item["note"] for item in items if "note" in item]}


def next_move(state: VisualReasoningState) -> Literal["crop", "advance", "stage_answer"]:
    stages = {item["stage"] for item in state["items"]}
    if "crop" in stages:
        return "crop"
    return "stage_answer" if stages == {"done"} else "advance"


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
    for node in (load_images, plan, advance, crop, stage_answer, write_answer):
        graph.add_node(node.__name__, node)
    graph.add_edge(START, "load_images")
    for first, second in (("load_images", "plan"), ("plan", "advance"), ("crop", "advance"),
                          ("stage_answer", "write_answer")):
        graph.add_edge(first, second)
    graph.add_conditional_edges("advance", next_move)
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
