"""A tiny workflow for API tests: no model, a few progress events, an answer. Registered in-process by the
fixtures (and by the subprocess wrappers of the distributed tests), never through an entry point."""

from __future__ import annotations

import time
from typing_extensions import TypedDict  # (typing.TypedDict has no JSON schema on Python < 3.12)

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from mgmflow.orchestrator.runtime import emit
from mgmflow.orchestrator.workflow import Workflow, register


class EchoInput(BaseModel):
    text: str = Field(min_length=1, max_length=1000)
    steps: int = Field(2, ge=1, le=20)
    delay: float = Field(0.0, ge=0, le=5)


class EchoState(TypedDict, total=False):
    text: str
    steps: int
    delay: float
    answer: str


def _echo(state: EchoState) -> EchoState:
    """Count ``steps`` progress events (``delay`` seconds apart), then answer the text in capitals."""
    for done in range(1, state["steps"] + 1):
        time.sleep(state.get("delay", 0.0))
        emit("progress", {"done": done, "total": state["steps"], "stage": "echo"})
    return {"answer": state["text"].upper()}


def build_graph() -> StateGraph:
    graph = StateGraph(EchoState)
    graph.add_node("echo", _echo)
    graph.add_edge(START, "echo")
    graph.add_edge("echo", END)
    return graph


def build_nested_graph() -> StateGraph:
    """The echo graph as a subgraph node (``outer``): what streaming with ``stream_subgraphs`` is tested on."""
    graph = StateGraph(EchoState)
    graph.add_node("outer", build_graph().compile())
    graph.add_edge(START, "outer")
    graph.add_edge("outer", END)
    return graph


ECHO = Workflow(name="echo", input_model=EchoInput, build_graph=build_graph, description="Echo for tests")
NESTED = Workflow(name="echo_nested", input_model=EchoInput, build_graph=build_nested_graph,
                  description="Echo inside a subgraph, for tests")


def register_echo() -> None:
    register(ECHO)
    register(NESTED)
