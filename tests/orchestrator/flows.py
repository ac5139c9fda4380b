"""Minimal workflows for the runtime tests, registered in-process (not through entry points).

``refine``: the reusable loop on one request (real tiny VLM and diffusion tasks). ``turns``: a multi-turn thread
whose later turns see earlier messages and images.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Annotated, Any

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from mgmflow.orchestrator.loop import LoopState, build_refine_loop
from mgmflow.orchestrator.runtime import TaskSpec, await_tasks, emit
from mgmflow.orchestrator.state import RunState
from mgmflow.orchestrator.workflow import Workflow, register

GENERATION = {"width": 64, "height": 64, "steps": 2}


class RefineInput(BaseModel):
    request: str = Field(min_length=1, max_length=2000)
    budget: int = Field(default=2, ge=1, le=8)
    drafts: int = Field(default=1, ge=1, le=4)
    seed: int = 0


class RefineState(LoopState, total=False):
    request: str
    drafts: int


def _items(state: RefineState) -> dict[str, Any]:
    return {"items": [{"key": "main", "request": state["request"]}]}


def build_refine_graph() -> StateGraph:
    graph = StateGraph(RefineState)
    graph.add_node("items", _items)
    graph.add_node("refine", build_refine_loop(drafts=1, generation=GENERATION, plan=False).compile())
    graph.add_edge(START, "items")
    graph.add_edge("items", "refine")
    graph.add_edge("refine", END)
    return graph


def write_refine(values: dict[str, Any], out_dir: Path, context: Any) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = values["chosen"]["main"]
    (out_dir / "chosen.png").write_bytes(context.store.get(chosen, scope=context.scope))
    return {"chosen": chosen}


refine = Workflow("test-refine", RefineInput, build_refine_graph, write_refine, "the refine loop on one request")


class TurnInput(BaseModel):
    text: str = Field(min_length=1, max_length=2000)
    draw: bool = False


class TurnState(RunState, total=False):
    text: str
    draw: bool
    turns: Annotated[list[int], operator.add]
    images_seen: Annotated[list[int], operator.add]  # images the VLM was shown at each turn


def _turn(state: TurnState) -> dict[str, Any]:
    """Answer the new turn with the whole history (earlier images included); draw when asked."""
    user = {"role": "user", "text": state["text"], "images": []}
    turn = len(state.get("turns") or [])
    history = _model_history(state.get("messages") or [], state["text"])
    specs = [TaskSpec(f"t{turn}:answer", "vlm.chat", {"messages": history, "max_new_tokens": 8, "seed": turn})]
    if state.get("draw"):
        specs.append(TaskSpec(f"t{turn}:draw", "diffusion.text2img",
                              {"prompts": [state["text"]], "seeds": [turn], **GENERATION}))
    results = await_tasks(specs)
    images = [image["artifact"] for result in results[1:] for image in result["images"]]
    emit("progress", {"stage": "turn", "done": 1, "total": 1})
    reply = {"role": "assistant", "text": results[0]["text"], "images": images}
    seen = sum(len(message["images"]) for message in history)
    return {"messages": [user, reply], "turns": [turn], "images_seen": [seen],
            "artifacts": [{"id": image, "kind": "image", "item": f"t{turn}", "step": f"t{turn}:draw"} for image in images]}


def _model_history(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """The history plus the new turn, as the VLM takes it: images ride on user turns only, so the images an
    assistant turn made travel with the next user turn (roles keep alternating)."""
    history, carried = [], []
    for message in [*messages, {"role": "user", "text": text, "images": []}]:
        if message["role"] == "assistant":
            history.append({**message, "images": []})
            carried = list(message["images"])
        else:
            history.append({**message, "images": [*carried, *message["images"]]})
            carried = []
    return history


def build_turn_graph() -> StateGraph:
    graph = StateGraph(TurnState)
    graph.add_node("turn", _turn)
    graph.add_edge(START, "turn")
    graph.add_edge("turn", END)
    return graph


turns = Workflow("test-turns", TurnInput, build_turn_graph, None, "a multi-turn thread")


def register_all() -> None:
    register(refine)
    register(turns)
