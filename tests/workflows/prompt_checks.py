"""Measuring the prompts a scripted run submitted: a bound that holds for every template and tokenizer (released
geometries), and the real engine's own length check (a built checkpoint)."""

from __future__ import annotations

import io
import json
from functools import cache

from PIL import Image

from mgmflow.models.mgm.conversation import TEMPLATES, Turn
from mgmflow.models.mgm.gen_protocol import GEN_SUFFIX
from mgmflow.workers.tasks.vlm import MessageInput, template_turns

WORKER_DEFAULT_TOKENS = 256  # a VLM payload without max_new_tokens gets the worker's default


@cache
def controls() -> list[str]:
    """The template strings that are one token each (longest first)."""
    from mgmflow.models.mgm.tokenizer import load_tiny_tokenizer

    return sorted([*load_tiny_tokenizer().get_added_vocab(), "<image>"], key=len, reverse=True)


def vlm_requests(client, store, scope: str = "test") -> list[tuple[str, list[dict], dict]]:
    """(step, messages, payload) of every ``vlm.chat`` task the run submitted, a staged history read back."""
    requests = []
    for task_id, kind, payload in client.submitted:
        if kind == "vlm.chat":
            messages = (json.loads(store.get(payload["messages_artifact"], scope=scope))
                        if "messages_artifact" in payload else payload["messages"])
            requests.append((task_id.split(":", 1)[1], messages, payload))
    return requests


def upper_bound(messages: list[dict], image_tokens: int, *, generate: bool = False) -> int:
    """The most tokens the prompt of ``messages`` takes with any template, as the worker lays it out: a control
    string is one token, an image ``image_tokens``, any other byte at most one; plus BOS and the answer's first."""
    turns = [Turn(m.role, m.text, len(m.images)) for m in template_turns([MessageInput(**m) for m in messages])]
    if generate:
        turns[-1] = Turn(turns[-1].role, turns[-1].text + GEN_SUFFIX, turns[-1].num_images)
    images = sum(turn.num_images for turn in turns)
    worst = 0
    for template in TEMPLATES.values():
        rendered = template.render(turns)
        for control in controls():
            rendered = rendered.replace(control, "\0")
        worst = max(worst, len(rendered.encode()) + 2 + images * (image_tokens - 1))
    return worst


def engine_length(engine, messages: list[dict], payload: dict, store, scope: str = "test") -> int:
    """The prompt's length by the engine's own check (which refuses one that overflows), as the worker asks."""
    from mgmflow.models.mgm.engine import ChatRequest, Message

    turns = template_turns([MessageInput(**m) for m in messages])
    request = ChatRequest(
        [Message(t.role, t.text, [Image.open(io.BytesIO(store.get(i, scope=scope))) for i in t.images]) for t in turns],
        max_new_tokens=payload.get("max_new_tokens", WORKER_DEFAULT_TOKENS),
        generate_image=payload.get("generate_image"))
    engine.validate(request)
    return sum(engine._prepare(request).item_lengths(engine.model.num_visual_tokens))
