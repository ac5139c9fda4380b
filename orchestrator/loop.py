"""The reason-then-generate loop, as a reusable subgraph.

    start → advance ⟲ ─┬─ every item accepted / exhausted / rejected → finish
                       └─ every active item's prompt written, approval asked (approve=True runs) → approve → advance

Each item (a page, a question, a turn) goes through its own loop as soon as its previous step is done, with no
join across items:

    plan → prompt → [approval] → draw (N drafts) → critique ─┬─ accept / budget spent → done
                                  ▲          ▲               ├─ refine → prompt
                                  │          └───────────────┴─ edit → draw (edits of the best draft)

``advance`` is the scheduler (``runtime.advance_items``): for every item it reads its current step's task records,
moves each item whose step finished to its next stage (submitting that stage's tasks at once) and returns, so each
move is checkpointed; when no item can move it parks the run until *any* awaited task finishes. The VLM requests
that happen to be ready together still arrive together at the worker, whose dynamic batcher groups them. Task steps
are named by item, round and draft, and every seed derives from them, so neither timing nor the number of workers
changes a result; an item's lineage and scores are the same whatever the order its steps finished in. Routing is
the pure function :func:`decide`, unit-tested with scripted critiques.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict  # pydantic (the API's state schemas) needs it on Python < 3.12

from mgmflow.orchestrator.budget import PromptBudget, fit, run_budget
from mgmflow.orchestrator.runtime import (
    TaskSpec, VLMRequest, advance_items, answer_text, emit, get_run_context, parse_json, request_approval,
)
from mgmflow.orchestrator.schemas import Critique, Plan
from mgmflow.orchestrator.seeds import derive_seed
from mgmflow.orchestrator.state import ArtifactRef, RunState
from mgmflow.orchestrator.state import Critique as CritiqueRecord

Route = Literal["accept", "refine", "edit", "exhausted"]
DEFAULT_BUDGET = 3  # rounds, when the workflow's state carries none


class LoopItem(TypedDict, total=False):
    """One thing to generate: its request and inputs, and where its loop stands."""

    key: str  # unique within the run: names task steps and `chosen`
    index: int  # position, for seeds
    request: str  # what the image must show
    images: list[str]  # input artifact ids (references, e.g. a character sheet image)
    context: str  # what the critic checks besides the request (style, characters)
    plan: dict[str, Any] | None
    prompt: str
    round: int  # rounds done
    status: Literal["active", "accepted", "exhausted", "rejected"]
    stage: Literal["plan", "prompt", "approval", "draw", "critique", "done"]  # where its own loop stands
    drafts: list[dict[str, Any]]  # this round's drafts ({id, prompt, step}) while the critic looks at them
    route: Literal["refine", "edit"] | None  # what the next round does
    feedback: str
    best: str | None  # best artifact id so far (over every round)
    best_score: float


class LoopState(RunState, total=False):
    items: list[LoopItem]
    seed: int
    drafts: int  # per-run override of the build-time ``drafts``
    generation: dict[str, Any]  # per-run generation parameters (width, height, steps…), over the build-time ones


def decide(
    round_critiques: list[dict[str, Any]], *, round: int, budget: int, accept_score: int, edit_score: int
) -> Route:
    """What to do after ``round`` (1-based) given this round's critiques (``score``, ``verdict``)."""
    best = max(round_critiques, key=lambda critique: critique["score"])
    if best["score"] >= accept_score or (best["verdict"] == "accept" and best["score"] >= edit_score):
        return "accept"
    if round >= budget:
        return "exhausted"
    if best["verdict"] == "edit" and best["score"] >= edit_score:
        return "edit"  # close: fix the best draft rather than start over
    return "refine"


def build_refine_loop(
    *,
    name: str = "refine",
    drafts: int = 2,
    accept_score: int = 7,
    edit_score: int = 5,
    plan: bool = True,
    generation: dict[str, Any] | None = None,
    edit_kind: str = "edit.instruct",
) -> StateGraph:
    """The loop as an uncompiled ``StateGraph[LoopState]``.

    ``name`` prefixes every task step (use two names to run the loop twice in one run); ``drafts`` images per
    round; ``accept_score``/``edit_score`` are the critic's thresholds (0-10); ``generation`` is merged into every
    text-to-image / edit payload (width, height, steps, guidance…).
    """
    if drafts < 1:
        raise ValueError("drafts must be >= 1")
    extra = dict(generation or {})

    def step(item: LoopItem, *parts: str) -> str:
        return ":".join((name, item["key"], *parts))

    def start(state: LoopState) -> dict[str, Any]:
        """Give every item its loop fields; a budget below one round is an input error caught by the workflow."""
        items = [
            {"index": position, "images": [], "context": "", "plan": None, "round": 0, "status": "active",
             "stage": "plan" if plan else "prompt", "route": None, "feedback": "", "best": None, "best_score": -1.0,
             "drafts": [], **item}
            for position, item in enumerate(state["items"])
        ]
        return {"items": items, "prompt_budget": run_budget(state).to_state()}

    # What each stage asks of the workers (pure: the same item gives the same tasks, under the same ids).
    def tasks(state: LoopState, item: LoopItem) -> list[TaskSpec]:
        budget, stage = run_budget(state), item["stage"]
        if stage == "plan":
            return [VLMRequest(step(item, "plan"), _plan_prompt(item, budget), Plan, tuple(item["images"]),
                               seed=state["seed"],
                               max_new_tokens=min(PLAN_TOKENS, budget.answer_room(images=len(item["images"])))).task()]
        if stage == "prompt":
            return [TaskSpec(step(item, f"r{item['round']}", "prompt"), "vlm.write_prompt",
                             {"request": _prompt_request(item, budget), "images": item["images"],
                              "max_new_tokens": min(PROMPT_TOKENS, budget.answer_room(images=len(item["images"]))),
                              "seed": derive_seed(state["seed"], item["index"], item["round"])})]
        if stage == "draw":
            parameters = {**extra, **(state.get("generation") or {})}
            return [_generation_task(item, draft, state["seed"], step(item, f"r{item['round']}", f"d{draft}"),
                                     parameters, edit_kind) for draft in range(state.get("drafts") or drafts)]
        if stage == "critique":
            return [VLMRequest(f"{ref['step']}:critique", _critique_prompt(item, ref, budget), Critique, (ref["id"],),
                               seed=state["seed"],
                               max_new_tokens=min(CRITIQUE_TOKENS, budget.answer_room(images=1))).task()
                    for ref in item["drafts"]]
        return []  # approval, done: nothing to run

    # What a finished stage makes of an item (pure, but for the events it emits).
    def complete(state: LoopState, item: LoopItem, specs: list[TaskSpec], results: list[Any]) -> tuple[LoopItem, dict]:
        stage, out = item["stage"], {}
        if stage == "plan":
            answer = parse_json(Plan, answer_text(results[0], step=specs[0].step), step=specs[0].step).model_dump()
            item = {**item, "plan": answer, "stage": "prompt"}
        elif stage == "prompt":
            prompt = (results[0].get("image_prompt") or "").strip() or _fallback_prompt(item)
            held = item["round"] == 0 and get_run_context().approve
            item = {**item, "prompt": prompt, "stage": "approval" if held else "draw"}
        elif stage == "draw":
            refs: list[ArtifactRef] = [{
                "id": _artifact_id(result), "kind": "image", "parent": spec.payload.get("image"),
                "prompt": spec.payload["prompts"][0], "seed": spec.payload["seeds"][0], "model": result.get("model"),
                "tool": spec.kind, "step": spec.step, "item": item["key"], "round": item["round"] + 1, "scores": {},
            } for spec, result in zip(specs, results)]
            for ref in refs:
                emit("artifact", dict(ref))
            item = {**item, "stage": "critique", "drafts": [{key: ref[key] for key in ("id", "prompt", "step")}
                                                             for ref in refs]}
            out["artifacts"] = refs
        elif stage == "critique":
            answers = [parse_json(Critique, answer_text(result, step=spec.step), step=spec.step)
                       for spec, result in zip(specs, results)]
            item, out = select(state, item, answers)
        return item, out

    def select(state: LoopState, item: LoopItem, answers: list[Critique]) -> tuple[LoopItem, dict]:
        """Keep the item's best draft so far and decide its next round."""
        this_round = item["round"] + 1
        mine: list[CritiqueRecord] = [
            {"artifact": ref["id"], "item": item["key"], "round": this_round, **answer.model_dump()}
            for ref, answer in zip(item["drafts"], answers)
        ]
        best = max(mine, key=lambda critique: critique["score"])
        route = decide(mine, round=this_round, budget=state.get("budget", DEFAULT_BUDGET), accept_score=accept_score,
                       edit_score=edit_score)
        improved = best["score"] > item["best_score"]
        status = {"accept": "accepted", "exhausted": "exhausted"}.get(route, "active")
        item = {
            **item, "round": this_round, "feedback": best["feedback"], "drafts": [],
            "best": best["artifact"] if improved else item["best"],
            "best_score": best["score"] if improved else item["best_score"],
            "status": status, "route": route if route in ("refine", "edit") else None,
            "stage": {"refine": "prompt", "edit": "draw"}.get(route, "done"),
        }
        scores = {"item": item["key"], "round": this_round, "route": route, "best": best["artifact"],
                  "scores": {critique["artifact"]: critique["score"] for critique in mine}}
        return item, {"critiques": mine, "scores": [scores],
                      "artifacts": [{"id": c["artifact"], "scores": {"critique": float(c["score"])}} for c in mine]}

    def advance(state: LoopState) -> dict[str, Any]:
        """Move every item whose step finished on to its next stage; park until any awaited task finishes."""
        items, moved, out = advance_items(state["items"], partial(tasks, state), partial(complete, state))
        if not moved:
            return {}  # every item is done or waits for approval
        keys = {items[position]["key"] for position in moved}
        report(state, items, keys, out.get("scores", []))
        plans = [item["plan"] for item in items if item["key"] in keys and item.get("plan")]
        update = {**out, "items": items, "iteration": max(item["round"] for item in items)}
        if len(items) == 1 and plans:
            update["plan"] = plans[0]
        return update

    def report(state: LoopState, items: list[LoopItem], moved: set[str], new_scores: list[dict]) -> None:
        """Events of the items that just ended: each with its chosen image and its best score per round."""
        ended = [item for item in items if item["key"] in moved and item["status"] != "active"]
        rounds = [*(state.get("scores") or []), *new_scores]
        for item in ended:
            mine = sorted((entry for entry in rounds if entry["item"] == item["key"]), key=lambda e: e["round"])
            emit("item", {"stage": name, "key": item["key"], "index": item["index"], "status": item["status"],
                          "artifact": item["best"], "score": item["best_score"], "rounds": item["round"],
                          "scores": [max(entry["scores"].values()) for entry in mine]})
        if ended:
            done = sum(item["status"] != "active" for item in items)
            emit("progress", {"stage": name, "done": done, "total": len(items)})

    def approve(state: LoopState) -> dict[str, Any]:
        """Human approval before the first generation (runs started with approve=True only), of every prompt."""
        todo = [item for item in state["items"] if item["status"] == "active" and item["stage"] == "approval"]
        answer = request_approval({"stage": name, "items": [{"key": i["key"], "prompt": i["prompt"]} for i in todo]})
        answer = {"approved": True} if answer is None else answer
        if not answer.get("approved", True):
            held = [{**item, "status": "rejected", "stage": "done"} for item in todo]
        else:
            prompts = dict(answer.get("prompts") or {})
            if answer.get("prompt"):
                prompts.update({item["key"]: answer["prompt"] for item in todo})
            held = [{**item, "prompt": prompts.get(item["key"], item["prompt"]), "stage": "draw"} for item in todo]
        by_key = {item["key"]: item for item in held}
        return {"items": [by_key.get(item["key"], item) for item in state["items"]]}

    def finish(state: LoopState) -> dict[str, Any]:
        """The chosen result per item: its best draft over every round."""
        return {"chosen": {item["key"]: item["best"] for item in state["items"] if item.get("best")}}

    def next_move(state: LoopState) -> Literal["advance", "approve", "finish"]:
        active = [item for item in state["items"] if item["status"] == "active"]
        if any(item["stage"] not in ("approval", "done") for item in active):
            return "advance"
        return "approve" if active else "finish"

    graph = StateGraph(LoopState)
    graph.add_node("start", start)
    graph.add_node("advance", advance)
    graph.add_node("approve", approve)
    graph.add_node("finish", finish)
    graph.add_edge(START, "start")
    graph.add_conditional_edges("start", next_move)
    graph.add_conditional_edges("advance", next_move)
    graph.add_edge("approve", "advance")
    graph.add_edge("finish", END)
    return graph


def _generation_task(item: LoopItem, draft: int, seed: int, step: str, extra: dict[str, Any], edit_kind: str) -> TaskSpec:
    draft_seed = derive_seed(seed, item["index"], item["round"], draft)
    if item.get("route") == "edit" and item.get("best"):
        instruction = item["feedback"] or item["request"]
        return TaskSpec(step, edit_kind, {**extra, "image": item["best"], "prompts": [instruction], "seeds": [draft_seed]})
    return TaskSpec(step, "diffusion.text2img", {**extra, "prompts": [item["prompt"]], "seeds": [draft_seed]})


def _artifact_id(result: dict[str, Any]) -> str:
    """The image a generation task produced (one prompt, one seed: one image)."""
    return result["images"][0]["artifact"]


PLAN_TOKENS = 512  # VLMRequest's default answer room
PROMPT_TOKENS = 256  # the <GEN> answer's room (vlm.write_prompt's default max_new_tokens)
CRITIQUE_TOKENS = 512


def _plan_prompt(item: LoopItem, budget: PromptBudget) -> str:
    head, tail = "Plan an image for this request.\nRequest: ", "\nAnswer in JSON."
    limit = budget.prompt_bytes(images=len(item["images"]), answer_tokens=PLAN_TOKENS) - len(head + tail) - 16
    request, context = fit([item["request"], item.get("context") or ""], limit)
    return f"{head}{request}{f'{chr(10)}Context: {context}' if context else ''}{tail}"


def _prompt_request(item: LoopItem, budget: PromptBudget) -> str:
    """The <GEN> request: what to draw, the context, the plan, and in a refine round the critic's feedback; the
    variable texts share what the model's context leaves (the longest are cut first)."""
    plan = item.get("plan") or {}
    refine = item.get("route") == "refine"
    texts = [item["request"], item.get("context") or "", plan.get("goal", ""), plan.get("prompt", ""),
             item.get("prompt", "") if refine else "", item.get("feedback", "") if refine else ""]
    template = ["Request: {}", "Context: {}", "Plan: {} Suggested prompt: {}",
                "Previous prompt: {}\nCritic's feedback: {}\nImprove the prompt.", "Generate an image for it."]
    fixed = sum(len(line.replace("{}", "")) + 1 for line in template)
    limit = budget.prompt_bytes(images=len(item["images"]), answer_tokens=PROMPT_TOKENS) - fixed
    request, context, goal, suggested, previous, feedback = fit(texts, limit)
    lines = [f"Request: {request}"]
    if context:
        lines.append(f"Context: {context}")
    if plan:
        lines.append(f"Plan: {goal} Suggested prompt: {suggested}")
    if refine:
        lines.append(f"Previous prompt: {previous}\nCritic's feedback: {feedback}\nImprove the prompt.")
    lines.append("Generate an image for it.")
    return "\n".join(lines)


def _fallback_prompt(item: LoopItem) -> str:
    """When the VLM writes no <h>…</h> prompt: the plan's prompt, else the request itself."""
    return ((item.get("plan") or {}).get("prompt") or item["request"]).strip()


def _critique_prompt(item: LoopItem, ref: ArtifactRef, budget: PromptBudget) -> str:
    head = "Judge this image against its intent.\nIntent: "
    tail = ("Give a score from 0 to 10, a verdict (accept, refine the prompt, or edit this image) and feedback.")
    limit = budget.prompt_bytes(images=1, answer_tokens=CRITIQUE_TOKENS) - len(head + tail) - 48
    request, context, prompt = fit([item["request"], item.get("context") or "", ref.get("prompt") or ""], limit)
    context = f"\nIt must also respect: {context}" if context else ""
    return f"{head}{request}{context}\nPrompt used: {prompt}\n{tail}"
