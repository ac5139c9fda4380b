"""The typed run state every workflow extends: messages, artifact references with lineage, plan, rounds, scores.

State holds references (artifact ids in the store), never pixels, and only JSON primitives, so that checkpoints
stay small and serialise the same in SQLite and PostgreSQL.
"""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal

from typing_extensions import TypedDict  # pydantic (the API's state schemas) needs it on Python < 3.12


class Message(TypedDict, total=False):
    """One turn of a thread's conversation; ``images`` are artifact ids, so later turns can refer to them."""

    role: Literal["system", "user", "assistant"]
    text: str
    images: list[str]


class ArtifactRef(TypedDict, total=False):
    """A generated or uploaded artifact and where it came from (its lineage)."""

    id: str  # artifact id in the store (scope-bound)
    kind: str  # "image" | "text" | ...
    parent: str | None  # the artifact it was derived from (img2img / edit / inpaint), None for text-to-image
    prompt: str | None
    seed: int | None
    model: str | None
    tool: str | None  # the task kind that produced it, e.g. "diffusion.text2img"
    step: str  # the task step that produced it (unique within the run)
    item: str  # which item of the run it belongs to (a page, a question, "main")
    round: int
    scores: dict[str, float]  # e.g. {"critique": 7}


class Critique(TypedDict, total=False):
    """A VLM verdict on one artifact, kept per round so one can see whether refining helped."""

    artifact: str
    item: str
    round: int
    score: float
    verdict: str  # "accept" | "refine" | "edit"
    feedback: str


class RoundScores(TypedDict, total=False):
    """The scores of one item's round: every draft's score and the best one."""

    item: str
    round: int
    route: str  # what the router decided after this round
    scores: dict[str, float]  # artifact id -> score
    best: str  # artifact id


def merge_artifacts(left: list[ArtifactRef] | None, right: list[ArtifactRef] | None) -> list[ArtifactRef]:
    """Append new artifacts; a ref whose id is already known updates it in place (e.g. scores added later)."""
    merged = list(left or [])
    position = {ref["id"]: index for index, ref in enumerate(merged)}
    for ref in right or []:
        if ref["id"] in position:
            index = position[ref["id"]]
            merged[index] = {**merged[index], **ref}
        else:
            position[ref["id"]] = len(merged)
            merged.append(ref)
    return merged


def merge_dict(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    """Shallow-merge two dicts; keys on the right win (per-item maps updated by parallel nodes)."""
    return {**(left or {}), **(right or {})}


class RunState(TypedDict, total=False):
    """The base state of every workflow; a workflow's state subclasses it and adds its own fields."""

    messages: Annotated[list[Message], operator.add]
    artifacts: Annotated[list[ArtifactRef], merge_artifacts]
    plan: dict[str, Any] | None
    iteration: int
    budget: int
    critiques: Annotated[list[Critique], operator.add]
    scores: Annotated[list[RoundScores], operator.add]
    chosen: dict[str, str]  # item -> chosen artifact id


def artifacts_by_id(state: RunState) -> dict[str, ArtifactRef]:
    """Index the state's artifacts by id."""
    return {ref["id"]: ref for ref in state.get("artifacts") or []}


def lineage(state: RunState, artifact_id: str) -> list[ArtifactRef]:
    """The chain of artifacts from ``artifact_id`` back to its first ancestor (itself first)."""
    known = artifacts_by_id(state)
    chain: list[ArtifactRef] = []
    seen: set[str] = set()
    current: str | None = artifact_id
    while current and current in known and current not in seen:
        seen.add(current)
        chain.append(known[current])
        current = known[current].get("parent")
    return chain
