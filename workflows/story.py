"""``story``: a premise (or a whole story) becomes an illustrated storyboard.

    stage_scene_requests → write_scenes → stage_sheet_request → write_sheet → make_pages
        → pages (the reason-then-generate loop over every page) → END

The VLM cuts the premise into one scene per page (``SceneList``) and writes a character and style sheet
(``CharacterSheet``); every page then goes through the shared refine loop at once: a prompt per page through
MGM's ``<GEN>`` path, drafts generated in parallel (one task per draft, one join for all pages), the VLM checks each
draft against its scene and the sheet (``Critique``), and outliers are re-prompted or edited within the budget.
``write_output`` turns the final state into the storyboard folder (see :mod:`mgmflow.workflows.storyboard`).

Reproducibility: every seed is ``derive_seed(seed, page index, round, draft)`` and every task step is named by
page, round and draft, so neither the number of workers nor a redelivery changes which image a page gets.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field, field_validator

from mgmflow.orchestrator.budget import PromptBudget, fit, run_budget
from mgmflow.orchestrator.loop import LoopItem, LoopState, build_refine_loop
from mgmflow.orchestrator.runtime import RunContext, VLMRequest, emit, vlm_json_many
from mgmflow.orchestrator.schemas import CharacterSheet, SceneList
from mgmflow.orchestrator.state import lineage
from mgmflow.orchestrator.workflow import Workflow
from mgmflow.workflows.inputs import clip, stage_messages
from mgmflow.workflows.storyboard import write_storyboard

MAX_PREMISE_BYTES = 8 * 1024
MAX_PAGES = 64
SCENES_PER_REQUEST = 4  # at most, per request: each constrained answer stays short (fewer when the context is small)
TOKENS_PER_SCENE = 768  # a Scene is at most ~1,000 characters of JSON
SHEET_TOKENS = 3072  # six characters and a style, filled to their bounds
SHEET_PROMPT_SHARE = 0.35  # of the context: the sheet's answer is the longest of the run
MIN_PREMISE_BYTES = 256  # a scene request always gets at least this much of the premise
SCENES_ASK_BYTES = 512  # the scene request's instructions, at most
SCAFFOLD_BYTES = 64  # a request's lines around its texts ("Here is the part of the story they tell:", newlines)
# Byte budgets (as JSON) of the texts every page's prompt and critique messages carry: the scene and the sheet.
SCENE_BYTES = 600
CONTEXT_BYTES = 900
SEED_LIMIT = 2**32


def fresh_seed() -> int:
    """A random run seed, drawn once when the input is validated and kept in the run's input from then on."""
    return secrets.randbelow(SEED_LIMIT)


class StoryInput(BaseModel):
    """The flags of ``mgmflow run story`` and the input of an HTTP story run."""

    premise: str = Field(description="a premise, or a whole story (up to 8 KB)")
    pages: int = Field(4, ge=1, le=MAX_PAGES, description="pages of the storyboard (1-64)")
    seed: int = Field(default_factory=fresh_seed, ge=0, lt=SEED_LIMIT,
                      description="makes the storyboard reproducible (random when not given)")
    rounds: int = Field(2, ge=1, le=8, description="budget: rounds of critique and refinement per page")
    drafts: int = Field(1, ge=1, le=8, description="images drafted per page per round; the critic keeps the best")
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="page width in pixels (model default)")
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8, description="page height in pixels (model default)")
    steps: int | None = Field(None, ge=1, le=150, description="denoising steps (model default)")

    @field_validator("premise")
    @classmethod
    def _premise_fits(cls, premise: str) -> str:
        premise = premise.strip()
        if not premise:
            raise ValueError("the premise is empty")
        size = len(premise.encode())
        if size > MAX_PREMISE_BYTES:
            raise ValueError(f"the premise is {size:,} bytes; the limit is {MAX_PREMISE_BYTES:,} (8 KB)")
        return premise


class StoryState(LoopState, total=False):
    # the input (same names as StoryInput)
    premise: str
    pages: int
    rounds: int
    width: int | None
    height: int | None
    steps: int | None
    # what the graph derives
    scene_requests: list[str]  # artifact ids of the stored scene requests, one per chunk of pages
    scenes: list[dict[str, Any]]  # orchestrator.schemas.Scene, one per page
    sheet_request: str  # artifact id of the stored sheet request
    sheet: dict[str, Any]  # orchestrator.schemas.CharacterSheet


# 1. Scenes: one per page, asked for in chunks of pages (one join for all chunks).
def stage_scene_requests(state: StoryState) -> dict[str, Any]:
    """Store each chunk's request in the artifact store (a premise of up to 8 KB exceeds a 4 KB task message), and
    the run's prompt budget: every prompt of the run is sized by it."""
    pages, budget = state["pages"], run_budget(state)
    return {"prompt_budget": budget.to_state(), "scene_requests": [
        stage_messages(scenes_prompt(state["premise"], first, last, pages, budget))
        for first, last in page_chunks(pages, scenes_per_request(budget))
    ]}


def write_scenes(state: StoryState) -> dict[str, Any]:
    """Cut the premise into exactly ``pages`` scenes."""
    chunks = page_chunks(state["pages"], scenes_per_request(run_budget(state)))
    answers = vlm_json_many([
        VLMRequest(f"scenes:{first}-{last}", [], SceneList, list_sizes={"scenes": last - first + 1},
                   seed=state["seed"], max_new_tokens=TOKENS_PER_SCENE * (last - first + 1),
                   messages_artifact=request)
        for (first, last), request in zip(chunks, state["scene_requests"], strict=True)
    ])
    scenes = [scene.model_dump() for answer in answers for scene in answer.scenes]
    emit("progress", {"stage": "scenes", "done": len(scenes), "total": state["pages"]})
    return {"scenes": scenes}


# 2. One sheet every page is checked against.
def stage_sheet_request(state: StoryState) -> dict[str, Any]:
    """Store the sheet's request (the premise and the cast of the scenes) in the artifact store."""
    return {"sheet_request": stage_messages(sheet_prompt(state["premise"], state["scenes"], run_budget(state)))}


def write_sheet(state: StoryState) -> dict[str, Any]:
    """Describe the characters and the visual style shared by every page."""
    (sheet,) = vlm_json_many([
        VLMRequest("sheet", [], CharacterSheet, seed=state["seed"],
                   max_new_tokens=min(SHEET_TOKENS, run_budget(state).answer_room(share=SHEET_PROMPT_SHARE)),
                   messages_artifact=state["sheet_request"])
    ])
    return {"sheet": sheet.model_dump()}


# 3. The pages become the refine loop's items.
def make_pages(state: StoryState) -> dict[str, Any]:
    """One loop item per page, with the run's budget, drafts and generation parameters."""
    context = sheet_context(state["sheet"])
    items: list[LoopItem] = [
        {"key": page_key(number), "index": number - 1, "request": scene_request(scene), "context": context}
        for number, scene in enumerate(state["scenes"], start=1)
    ]
    generation = {name: state[name] for name in ("width", "height", "steps") if state.get(name) is not None}
    # Each page is drawn alone (never merged into a dynamic batch with whatever else arrived), so its bytes depend
    # only on its prompt and seed, whatever the execution mode, the number of workers or a redelivery.
    generation["exclusive"] = True
    return {"items": items, "budget": state["rounds"], "generation": generation}


def build_graph() -> StateGraph:
    """The story graph, uncompiled (the runtime compiles it with its checkpointer)."""
    graph = StateGraph(StoryState)
    graph.add_node("stage_scene_requests", stage_scene_requests)
    graph.add_node("write_scenes", write_scenes)
    graph.add_node("stage_sheet_request", stage_sheet_request)
    graph.add_node("write_sheet", write_sheet)
    graph.add_node("make_pages", make_pages)
    # A story has no separate plan step: the scene is each page's plan.
    graph.add_node("pages", build_refine_loop(name="pages", drafts=1, plan=False).compile())
    graph.add_edge(START, "stage_scene_requests")
    graph.add_edge("stage_scene_requests", "write_scenes")
    graph.add_edge("write_scenes", "stage_sheet_request")
    graph.add_edge("stage_sheet_request", "write_sheet")
    graph.add_edge("write_sheet", "make_pages")
    graph.add_edge("make_pages", "pages")
    graph.add_edge("pages", END)
    return graph


# 4. The storyboard folder.
def write_output(values: dict[str, Any], out_dir: Path, context: RunContext) -> dict[str, Any]:
    """Write the storyboard of a finished run into ``out_dir``; returns the manifest."""
    pages = storyboard_pages(values)
    header = {
        "workflow": "story", "run_id": context.run_id, "title": (values.get("scenes") or [{}])[0].get("title"),
        "premise": values["premise"], "seed": values["seed"], "pages_requested": values["pages"],
        "rounds": values["rounds"], "drafts": values.get("drafts", 1), "sheet": values.get("sheet"),
    }
    path = write_storyboard(out_dir, pages=pages, header=header,
                            read_png=lambda artifact_id: context.store.get(artifact_id, scope=context.scope))
    return json.loads(path.read_text())


def storyboard_pages(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Per page, in page order: the chosen image, its prompt and seed, the best score of each round, lineage."""
    chosen = values.get("chosen") or {}
    critiques = {critique["artifact"]: critique for critique in values.get("critiques") or []}
    pages = []
    for number, scene in enumerate(values.get("scenes") or [], start=1):
        key = page_key(number)
        if key not in chosen:
            continue  # a page a human rejected at the approval point has no image
        chain = lineage(values, chosen[key])
        root = chain[-1]  # the text-to-image draft every edit descends from
        rounds = [entry for entry in values.get("scores") or [] if entry["item"] == key]
        pages.append({
            "page": number,
            "artifact_id": chosen[key],
            "scene": scene_request(scene),
            "prompt": root.get("prompt") or "",
            "seed": chain[0].get("seed"),
            "scores": [max(entry["scores"].values()) for entry in sorted(rounds, key=lambda e: e["round"])],
            "lineage": [
                {**ref, "critique": {name: critiques[ref["id"]].get(name) for name in ("score", "verdict", "feedback")}
                 if ref["id"] in critiques else None}
                for ref in chain
            ],
        })
    return pages


# Prompts: formatted here from raw state (the state keeps raw data), each within the run's prompt budget.
def scenes_per_request(budget: PromptBudget) -> int:
    """Scenes one request asks for: as many as leave the premise its room (a 2,048-token context: one)."""
    fits = [n for n in range(1, SCENES_PER_REQUEST + 1)
            if budget.prompt_bytes(answer_tokens=n * TOKENS_PER_SCENE) >= MIN_PREMISE_BYTES + SCENES_ASK_BYTES
            and n * TOKENS_PER_SCENE <= budget.answer_room()]
    return max(fits, default=1)


def page_chunks(pages: int, per_request: int = SCENES_PER_REQUEST) -> list[tuple[int, int]]:
    """Pages 1..pages cut into runs of at most ``per_request``, fixed by page number."""
    return [(first, min(first + per_request - 1, pages)) for first in range(1, pages + 1, per_request)]


def scenes_prompt(premise: str, first: int, last: int, pages: int, budget: PromptBudget) -> str:
    whole = (first, last) == (1, pages)
    part = "the whole story" if whole else f"pages {first} to {last} of the {pages}"
    ask = (f"It is told as an illustrated storyboard of {pages} pages. Write the scenes of {part}: "
           f"{last - first + 1} scenes in reading order, each with a short title, a visual description of what the "
           "page shows, and the characters who appear. Answer in JSON.")
    limit = budget.prompt_bytes(answer_tokens=(last - first + 1) * TOKENS_PER_SCENE) - len(ask) - SCAFFOLD_BYTES
    text = premise_part(premise, (first - 1) / pages, last / pages, limit)
    intro = "Here is a story premise (or a full story)" if text == premise else "Here is the part of the story they tell"
    return f"{intro}:\n{text}\n\n{ask}"


def premise_part(premise: str, start: float, end: float, limit: int) -> str:
    """The premise when it fits ``limit`` bytes; else the stretch of it that pages ``start``-``end`` (fractions of
    the story) tell, widened evenly on both sides to fill ``limit``: a long story is read in page-sized chunks."""
    if len(json.dumps(premise)) <= limit:
        return premise
    low, high = int(start * len(premise)), max(int(end * len(premise)), int(start * len(premise)) + 1)

    def span(widen: int) -> tuple[int, int]:
        return max(0, low - widen), min(len(premise), high + widen)

    narrow, wide = 0, len(premise)  # the widest span that fits, by bisection (its size grows with the widening)
    while narrow < wide:
        middle = (narrow + wide + 1) // 2
        first, last = span(middle)
        if len(json.dumps(premise[first:last])) <= limit - 8:
            narrow = middle
        else:
            wide = middle - 1
    low, high = span(narrow)
    return clip(("…" if low else "") + premise[low:high] + ("…" if high < len(premise) else ""), limit)


def sheet_prompt(premise: str, scenes: list[dict[str, Any]], budget: PromptBudget) -> str:
    """The premise and the cast, by how many pages each character appears on (the most present first), cut to the
    budget: a 64-page story's full outline would not fit a 2,048-token context."""
    counts: dict[str, int] = {}
    for scene in scenes:
        for name in dict.fromkeys(character.strip() for character in scene["characters"] if character.strip()):
            counts[name] = counts.get(name, 0) + 1
    cast = "; ".join(f"{name} ({count} of {len(scenes)} pages)"
                     for name, count in sorted(counts.items(), key=lambda entry: (-entry[1], entry[0])))
    ask = ("Write a character sheet so that every page draws the characters the same way: each main character's "
           "name and a precise visual description (age, build, hair, clothes, colours), and one visual style for "
           "the whole storyboard. Answer in JSON.")
    limit = budget.prompt_bytes(answer_tokens=SHEET_TOKENS, share=SHEET_PROMPT_SHARE) - len(ask) - SCAFFOLD_BYTES
    premise, cast = fit([premise, cast], limit)
    return f"Story premise:\n{premise}\n\nCharacters:\n{cast or 'none named'}\n\n{ask}"


def scene_request(scene: dict[str, Any]) -> str:
    """What a page must show, clipped to fit the page's task messages."""
    return clip(f"{scene['title']}: {scene['description']}".strip(": "), SCENE_BYTES)


def sheet_context(sheet: dict[str, Any]) -> str:
    """What every page must respect, clipped to fit the page's task messages."""
    characters = "; ".join(f"{character['name']}: {character['description']}" for character in sheet["characters"])
    return clip(f"Characters: {characters}. Style: {sheet['style']}" if characters else f"Style: {sheet['style']}",
                CONTEXT_BYTES)



def page_key(number: int) -> str:
    return f"page-{number:02d}"


workflow = Workflow(
    name="story",
    input_model=StoryInput,
    build_graph=build_graph,
    write_output=write_output,
    description="a premise or a story → scenes → character sheet → one checked illustration per page → storyboard",
)
