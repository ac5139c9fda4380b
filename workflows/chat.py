"""``chat``: any-to-any multi-turn chat over a thread: text and images in, text and images out.

    receive ─┬─ edit  (the turn refers to an earlier image) → edit ──────────────────┐
             └─ reply → stage_turn → respond ─┬─ MGM wrote an <h>…</h> prompt → draw ─┴→ say → END
                                              └──────────────────────────────────────────┘

Each turn is one run on the thread; the thread's checkpointed state (``messages``, ``artifacts``) carries the
conversation, so a later turn can refer to an earlier picture: "make the dog in the last picture red" becomes
``edit.instruct`` on that artifact. Which earlier image a turn means is resolved by :func:`referenced_image`, a
pure function over the text and the thread's images (deterministic with any model); a request to draw (or
``generate=True``) asks MGM through its ``<GEN>`` path, and the prompt it writes is drawn by the diffusion worker.

However long the thread, the VLM's prompt fits the model's context by construction (``orchestrator.budget``): it
carries the newest message and as many of the most recent whole exchanges as fit (a picture counts its visual
tokens); how many of the oldest messages were left out is ``history_dropped``. A message that cannot fit even alone
is refused at admission (``ContextLengthError``, a 400 over HTTP).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from langgraph.graph import END, START, StateGraph
from pydantic import BaseModel, Field

from mgmflow.orchestrator.budget import PromptBudget, configured_budget, recent_history, run_budget
from mgmflow.orchestrator.references import ArtifactId
from mgmflow.orchestrator.runtime import RunContext, TaskSpec, await_tasks, emit, get_run_context
from mgmflow.orchestrator.state import RunState
from mgmflow.orchestrator.workflow import Workflow
from mgmflow.workflows.inputs import clip, resolve_images, stage_messages

REPLY_TOKENS = 256  # the reply's room when the history leaves it, else what is left
LEAST_REPLY_TOKENS = 64  # a message must leave this much on its own
INSTRUCTION_BYTES = 1500  # of an edit instruction, as JSON (task messages are capped at 4 KB)

_ORDINALS = {"first": 0, "second": 1, "third": 2, "fourth": 3, "fifth": 4}
_REFERENCE = re.compile(
    r"\b(?:the\s+)?(?P<which>last|latest|previous|earlier|that|this|same|first|second|third|fourth|fifth|"
    r"(?:image|picture|photo)\s*#?\s*(?P<number>\d+))\b",
    re.IGNORECASE)
# A picture noun right after the reference, or within two words ("the last dog picture").
_NOUN = re.compile(r"^\W*(?:\w+\W+){0,2}?(?:image|picture|photo|drawing|pic|one)s?\b", re.IGNORECASE)
_DRAW = re.compile(r"\b(draw|paint|sketch|generate|illustrate|render|create an? (?:image|picture)|"
                   r"(?:image|picture|photo) of|show me)\b", re.IGNORECASE)


class ChatInput(BaseModel):
    """The flags of ``mgmflow run chat`` and the input of an HTTP chat turn (use the same thread for a dialogue)."""

    message: str = Field(min_length=1, max_length=8000, description="the user's turn")
    images: list[ArtifactId] = Field(default_factory=list, max_length=4,
                                         description="images sent with the turn: artifact ids (the CLI uploads files given by path)")
    generate: bool = Field(False, description="ask for an image even if the text does not say so")
    seed: int = Field(0, ge=0, lt=2**32, description="seed of the drawing and of the VLM's sampling")
    width: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    height: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    steps: int | None = Field(None, ge=1, le=150)


class ChatState(RunState, total=False):
    # this turn's input (overwritten by each run on the thread)
    message: str
    images: list[str]
    generate: bool
    seed: int
    width: int | None
    height: int | None
    steps: int | None
    # this turn's working values
    target: str | None  # the earlier image this turn edits
    request: str  # artifact id of the staged message history
    history_dropped: int  # the thread's oldest messages left out of this turn's prompt (they did not fit)
    reply_tokens: int
    reply: str
    image_prompt: str | None
    reply_images: list[str]


def referenced_image(text: str, thread_images: list[str]) -> str | None:
    """The earlier image ``text`` refers to ("the last picture", "the first image", "image 2"), if any."""
    if not thread_images:
        return None
    for match in _REFERENCE.finditer(text):
        which = match.group("which").lower()
        if match.group("number"):
            number = int(match.group("number"))
            return thread_images[number - 1] if 1 <= number <= len(thread_images) else None
        if not _NOUN.search(text[match.end("which"):]):
            continue  # "the first time", "that is": not about a picture
        if which in _ORDINALS:
            index = _ORDINALS[which]
            return thread_images[index] if index < len(thread_images) else None
        return thread_images[-1]  # last, latest, previous, earlier, that, this, same
    return None


def thread_images(state: ChatState) -> list[str]:
    """Every image of the conversation so far, oldest first (sent or made)."""
    return [image for message in state.get("messages") or [] for image in message.get("images") or []]


def receive(state: ChatState) -> dict[str, Any]:
    """Store the turn's images, find the earlier image it refers to, and add the turn to the conversation."""
    images = resolve_images(state.get("images") or [])
    target = None if images else referenced_image(state["message"], thread_images(state))
    return {"images": images, "target": target, "reply": "", "image_prompt": None, "reply_images": [],
            "history_dropped": 0, "prompt_budget": configured_budget().to_state(),
            "messages": [{"role": "user", "text": state["message"], "images": images}]}


def route(state: ChatState) -> Literal["edit", "stage_turn"]:
    return "edit" if state.get("target") else "stage_turn"


def edit(state: ChatState) -> dict[str, Any]:
    """Edit the referenced image by the turn's instruction."""
    instruction = clip(state["message"], INSTRUCTION_BYTES)
    # An edit keeps the image's size: only the steps carry over.
    payload = {"image": state["target"], "prompts": [instruction], "seeds": [state["seed"]],
               **({"steps": state["steps"]} if state.get("steps") else {})}
    (result,) = await_tasks([TaskSpec("edit", "edit.instruct", payload)])
    return _made(state, result, "edit.instruct", parent=state["target"], prompt=state["message"],
                 reply="Here is the edited picture.")


def stage_turn(state: ChatState) -> dict[str, Any]:
    """Store the most recent conversation that fits the model's context for the VLM (long histories exceed a task
    message)."""
    history = recent_history(run_budget(state), [_message(m) for m in state["messages"]],
                             answer_tokens=REPLY_TOKENS, least_answer_tokens=LEAST_REPLY_TOKENS)
    return {"request": stage_messages(history.messages), "history_dropped": history.dropped,
            "reply_tokens": history.answer_tokens}


def check_budget(turn: ChatInput, budget: PromptBudget) -> None:
    """At admission: the turn's message and images fit the model's context on their own."""
    recent_history(budget, [{"role": "user", "text": turn.message, "images": turn.images}],
                   answer_tokens=REPLY_TOKENS, least_answer_tokens=LEAST_REPLY_TOKENS)


def _message(message: dict[str, Any]) -> dict[str, Any]:
    """A thread message as ``vlm.chat`` takes it (its payload refuses other fields)."""
    return {"role": message["role"], "text": message["text"], "images": list(message.get("images") or [])}


def respond(state: ChatState) -> dict[str, Any]:
    """Mini-Gemini answers; asked to draw, it may also write an image prompt (<GEN> → <h>…</h>), as officially."""
    wants_image = state.get("generate") or bool(_DRAW.search(state["message"]))
    (result,) = await_tasks([TaskSpec("respond", "vlm.chat", {
        "messages_artifact": state["request"], "generate_image": "allow" if wants_image else None,
        "max_new_tokens": state["reply_tokens"], "seed": state["seed"]})])
    return {"reply": result["text"], "image_prompt": (result.get("image_prompt") or "").strip() or None}


def after_respond(state: ChatState) -> Literal["draw", "say"]:
    return "draw" if state.get("image_prompt") else "say"


def draw(state: ChatState) -> dict[str, Any]:
    """Draw the prompt MGM wrote."""
    payload = {"prompts": [state["image_prompt"]], "seeds": [state["seed"]], **_generation(state)}
    (result,) = await_tasks([TaskSpec("draw", "diffusion.text2img", payload)])
    return _made(state, result, "diffusion.text2img", parent=None, prompt=state["image_prompt"],
                 reply=state["reply"])


def say(state: ChatState) -> dict[str, Any]:
    """Add the assistant's turn (text and any image) to the conversation."""
    return {"messages": [{"role": "assistant", "text": state["reply"], "images": state.get("reply_images") or []}]}


def _made(state: ChatState, result: dict[str, Any], tool: str, *, parent: str | None, prompt: str,
          reply: str) -> dict[str, Any]:
    image = result["images"][0]
    ref = {"id": image["artifact"], "kind": "image", "parent": parent, "prompt": prompt, "seed": image["seed"],
           "model": result.get("model"), "tool": tool, "step": tool, "item": "main", "round": 0}
    emit("artifact", {**ref})
    return {"artifacts": [ref], "reply_images": [image["artifact"]], "reply": reply,
            "chosen": {"main": image["artifact"]}}


def _generation(state: ChatState) -> dict[str, Any]:
    return {name: state[name] for name in ("width", "height", "steps") if state.get(name) is not None}


def build_graph() -> StateGraph:
    graph = StateGraph(ChatState)
    for name, node in (("receive", receive), ("edit", edit), ("stage_turn", stage_turn), ("respond", respond),
                       ("draw", draw), ("say", say)):
        graph.add_node(name, node)
    graph.add_edge(START, "receive")
    graph.add_conditional_edges("receive", route)
    graph.add_edge("edit", "say")
    graph.add_edge("stage_turn", "respond")
    graph.add_conditional_edges("respond", after_respond)
    graph.add_edge("draw", "say")
    graph.add_edge("say", END)
    return graph


def write_output(values: dict[str, Any], out_dir: Path, context: RunContext) -> dict[str, Any]:
    """``reply.json`` (the reply, its images and the conversation) and the reply's images as PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for index, image in enumerate(values.get("reply_images") or [], start=1):
        files.append(f"reply-{index}.png")
        (out_dir / files[-1]).write_bytes(context.store.get(image, scope=context.scope))
    report = {"reply": values.get("reply", ""), "images": values.get("reply_images") or [], "files": files,
              "image_prompt": values.get("image_prompt"), "messages": values.get("messages") or [],
              "history_dropped": values.get("history_dropped") or 0}
    (out_dir / "reply.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    return report


def describe_output(report: dict[str, Any], out_dir: Path) -> str:
    """The reply, then where its images are, for the terminal."""
    lines = [report["reply"]]
    lines += [f"  image: {out_dir / name}" for name in report["files"]]
    if report.get("image_prompt"):
        lines.append(f"  drawn from: {report['image_prompt']}")
    if report.get("history_dropped"):
        lines.append(f"  (the thread's {report['history_dropped']} oldest messages no longer fit the model's context: "
                     "this reply did not see them)")
    return "\n".join(lines)


workflow = Workflow(
    name="chat",
    input_model=ChatInput,
    build_graph=build_graph,
    write_output=write_output,
    describe_output=describe_output,
    check_budget=check_budget,
    description="multi-turn chat with Mini-Gemini: text and images in, text and images out, edits by reference",
)
