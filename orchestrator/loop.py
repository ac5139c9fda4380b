"""The reason-then-generate loop, as a reusable subgraph.

    plan → write_prompts → approve → generate → critique → select ─┬─ any item still active → write_prompts
                                                                   └─ all accepted / exhausted → finish

It works on a list of ``items`` (one per page, question, turn) so that each stage is one join point for all of
them: the pages of a story generate in parallel across workers while the graph waits at a single interrupt
(interrupts inside ``Send`` branches resume wrongly). Each item keeps its own round, best draft and route;
routing is the pure function :func:`decide`, unit-tested with scripted critiques.
"""

from __future__ import annotations

from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from typing_extensions import TypedDict  # pydantic (the API's state schemas) needs it on Python < 3.12

from mgmflow.orchestrator.budget import PromptBudget, fit, run_budget
from mgmflow.orchestrator.runtime import TaskSpec, VLMRequest, await_tasks, emit, request_approval, vlm_json_many
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

    def active(state: LoopState) -> list[LoopItem]:
        return [item for item in state["items"] if item.get("status", "active") == "active"]

    def replace(state: LoopState, updated: list[LoopItem]) -> list[LoopItem]:
        by_key = {item["key"]: item for item in updated}
        return [by_key.get(item["key"], item) for item in state["items"]]

    def start(state: LoopState) -> dict[str, Any]:
        """Give every item its loop fields; a budget below one round is an input error caught by the workflow."""
        items = [
            {"index": position, "images": [], "context": "", "plan": None, "round": 0, "status": "active",
             "route": None, "feedback": "", "best": None, "best_score": -1.0, **item}
            for position, item in enumerate(state["items"])
        ]
        return {"items": items, "prompt_budget": run_budget(state).to_state()}

    def make_plan(state: LoopState) -> dict[str, Any]:
        """Understand each request and its inputs; plan what to draw."""
        todo = [item for item in active(state) if item.get("plan") is None]
        if not plan or not todo:
            return {}
        answers = vlm_json_many([
            VLMRequest(step(item, "plan"), _plan_prompt(item, run_budget(state)), Plan, tuple(item["images"]), seed=state["seed"],
                       max_new_tokens=min(PLAN_TOKENS, run_budget(state).answer_room(images=len(item["images"]))))
            for item in todo
        ])
        planned = [{**item, "plan": answer.model_dump()} for item, answer in zip(todo, answers)]
        update: dict[str, Any] = {"items": replace(state, planned)}
        if len(state["items"]) == 1:
            update["plan"] = planned[0]["plan"]
        return update

    def write_prompts(state: LoopState) -> dict[str, Any]:
        """Write (or rewrite from the critic's feedback) one image prompt per item through MGM's <GEN> path."""
        todo = [item for item in active(state) if item.get("route") != "edit"]
        if not todo:
            return {}
        results = await_tasks([
            TaskSpec(step(item, f"r{item['round']}", "prompt"), "vlm.write_prompt",
                     {"request": _prompt_request(item, run_budget(state)), "images": item["images"],
                      "max_new_tokens": min(PROMPT_TOKENS, run_budget(state).answer_room(images=len(item["images"]))), "seed": derive_seed(state["seed"], item["index"], item["round"])})
            for item in todo
        ])
        written = [
            {**item, "prompt": (result.get("image_prompt") or "").strip() or _fallback_prompt(item)}
            for item, result in zip(todo, results)
        ]
        return {"items": replace(state, written)}

    def approve(state: LoopState) -> dict[str, Any]:
        """Human approval before the first generation (runs started with approve=True only)."""
        todo = [item for item in active(state) if item["round"] == 0]
        if not todo:
            return {}
        answer = request_approval({"stage": name, "items": [{"key": i["key"], "prompt": i["prompt"]} for i in todo]})
        if answer is None:
            return {}
        if not answer.get("approved", True):
            return {"items": replace(state, [{**item, "status": "rejected"} for item in todo])}
        prompts = dict(answer.get("prompts") or {})
        if answer.get("prompt"):
            prompts.update({item["key"]: answer["prompt"] for item in todo})
        return {"items": replace(state, [{**item, "prompt": prompts.get(item["key"], item["prompt"])} for item in todo])}

    def generate(state: LoopState) -> dict[str, Any]:
        """N drafts per active item (text-to-image, or edits of the best draft), all items in one join."""
        parameters = {**extra, **(state.get("generation") or {})}
        plans = [(item, draft) for item in active(state) for draft in range(state.get("drafts") or drafts)]
        specs = [_generation_task(item, draft, state["seed"], step(item, f"r{item['round']}", f"d{draft}"),
                                  parameters, edit_kind) for item, draft in plans]
        results = await_tasks(specs)
        refs: list[ArtifactRef] = []
        for (item, draft), spec, result in zip(plans, specs, results):
            refs.append({
                "id": _artifact_id(result), "kind": "image", "parent": spec.payload.get("image"),
                "prompt": spec.payload["prompts"][0], "seed": spec.payload["seeds"][0],
                "model": result.get("model"), "tool": spec.kind,
                "step": spec.step, "item": item["key"], "round": item["round"] + 1, "scores": {},
            })
        for ref in refs:
            emit("artifact", dict(ref))
        return {"artifacts": refs}

    def critique(state: LoopState) -> dict[str, Any]:
        """The VLM scores every new draft against its item's request (structured Critique)."""
        by_key = {item["key"]: item for item in active(state)}
        drafts_now = [ref for ref in state["artifacts"]
                      if ref.get("item") in by_key and ref.get("round") == by_key[ref["item"]]["round"] + 1
                      and ref.get("step", "").startswith(f"{name}:")]
        answers = vlm_json_many([
            VLMRequest(f"{ref['step']}:critique", _critique_prompt(by_key[ref["item"]], ref, run_budget(state)), Critique,
                       (ref["id"],), seed=state["seed"],
                       max_new_tokens=min(CRITIQUE_TOKENS, run_budget(state).answer_room(images=1)))
            for ref in drafts_now
        ])
        records: list[CritiqueRecord] = [
            {"artifact": ref["id"], "item": ref["item"], "round": ref["round"], **answer.model_dump()}
            for ref, answer in zip(drafts_now, answers)
        ]
        scored = [{"id": ref["id"], "scores": {"critique": float(answer.score)}} for ref, answer in zip(drafts_now, answers)]
        return {"critiques": records, "artifacts": scored}

    def select(state: LoopState) -> dict[str, Any]:
        """Keep each item's best draft so far and decide its next round."""
        updated, rounds = [], []
        for item in active(state):
            this_round = item["round"] + 1
            mine = [c for c in state["critiques"] if c["item"] == item["key"] and c["round"] == this_round]
            best = max(mine, key=lambda c: c["score"])
            route = decide(mine, round=this_round, budget=state.get("budget", DEFAULT_BUDGET), accept_score=accept_score,
                           edit_score=edit_score)
            improved = best["score"] > item["best_score"]
            updated.append({
                **item, "round": this_round, "feedback": best["feedback"],
                "best": best["artifact"] if improved else item["best"],
                "best_score": best["score"] if improved else item["best_score"],
                "status": {"accept": "accepted", "exhausted": "exhausted"}.get(route, "active"),
                "route": route if route in ("refine", "edit") else None,
            })
            rounds.append({"item": item["key"], "round": this_round, "route": route, "best": best["artifact"],
                           "scores": {c["artifact"]: c["score"] for c in mine}})
        items = replace(state, updated)
        done = sum(item["status"] != "active" for item in items)
        emit("progress", {"stage": name, "done": done, "total": len(items)})
        return {"items": items, "scores": rounds, "iteration": max(item["round"] for item in items)}

    def finish(state: LoopState) -> dict[str, Any]:
        """The chosen result per item: its best draft over every round."""
        return {"chosen": {item["key"]: item["best"] for item in state["items"] if item.get("best")}}

    def next_round(state: LoopState) -> Literal["write_prompts", "finish"]:
        return "write_prompts" if active(state) else "finish"

    def after_approval(state: LoopState) -> Literal["generate", "finish"]:
        return "generate" if active(state) else "finish"

    graph = StateGraph(LoopState)
    graph.add_node("start", start)
    graph.add_node("plan", make_plan)
    graph.add_node("write_prompts", write_prompts)
    graph.add_node("approve", approve)
    graph.add_node("generate", generate)
    graph.add_node("critique", critique)
    graph.add_node("select", select)
    graph.add_node("finish", finish)
    graph.add_edge(START, "start")
    graph.add_edge("start", "plan")
    graph.add_edge("plan", "write_prompts")
    graph.add_edge("write_prompts", "approve")
    graph.add_conditional_edges("approve", after_approval)
    graph.add_edge("generate", "critique")
    graph.add_edge("critique", "select")
    graph.add_conditional_edges("select", next_round)
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
