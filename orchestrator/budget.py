"""How much text a prompt may carry so that it fits the VLM's context, whatever the tokenizer.

A Mini-Gemini prompt is the chat template, the text, the visual tokens of each image and room for the answer,
all inside ``tokenizer_model_max_length`` tokens. Every tokenizer MGM uses (byte-level BPE, SentencePiece with
byte fallback) spends at most one token per UTF-8 byte, so a text of B bytes (as JSON, which is never shorter)
takes at most B tokens: budgets in bytes fit by construction, without a tokenizer in the orchestrator.

The geometry (context, visual tokens per image) comes from the configured model: a tiny preset's recipe, the
released checkpoints' published values, or a folder's ``config.json``. A run records its budget in its state
when it starts, so every process that drives it later builds the same prompts.

Texts are clipped to their share (:func:`fit`, :func:`fill`); a conversation keeps its most recent whole exchanges
(:func:`recent_history`); images that cannot share a prompt go in groups (:meth:`PromptBudget.images_per_prompt`).
An input that cannot fit even alone is a ``ContextLengthError`` (``context_length_exceeded``, a 400 over HTTP).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mgmflow.models.errors import ContextLengthError, InvalidInputError

# The chat template around the text (the longest default system prompt, role markers, BOS, the ``<image>``
# placeholders, the `` <GEN>`` suffix), in tokens; tests check it against every template.
TEMPLATE_TOKENS = 288
# What each message of a conversation adds beside it: its role markers and separators, and the ``Image k:`` label
# and line break of each of its images (tests check both against every template).
TURN_TOKENS = 16
IMAGE_LABEL_TOKENS = 12
RELEASED_TOKENS_PER_VIEW = 576  # CLIP ViT-L/14 at 336 px, every released Mini-Gemini
RELEASED_CONTEXT = {False: 2048, True: 4096}  # tokenizer_model_max_length: normal, HD


@dataclass(frozen=True)
class PromptBudget:
    """A model's context and the visual tokens one image takes in it."""

    context_tokens: int
    image_tokens: int

    def prompt_bytes(self, *, images: int = 0, answer_tokens: int, share: float = 0.5) -> int:
        """Bytes of text (as JSON) a prompt with ``images`` images may carry.

        The answer keeps ``answer_tokens`` of room, or what is left of it beside ``share`` of it for the prompt when
        it asks for more (the engine caps an answer at the context's end: a prompt is never squeezed below its share).
        """
        room = self._room(images)
        return room - min(answer_tokens, self.answer_room(images=images, share=share))

    def answer_room(self, *, images: int = 0, share: float = 0.5) -> int:
        """The most tokens an answer is sure to get beside a prompt sized by :meth:`prompt_bytes` (same ``share``)."""
        room = self._room(images)
        return room - int(room * share)

    def images_per_prompt(self, *, text_bytes: int, answer_tokens: int) -> int:
        """The most images one prompt may carry beside ``text_bytes`` of text and a whole answer of ``answer_tokens``
        (0: not even one)."""
        return max(0, (self.context_tokens - TEMPLATE_TOKENS - text_bytes - answer_tokens) // self.image_tokens)

    def message_tokens(self, message: dict[str, Any]) -> int:
        """The most tokens one message of a conversation (``{"role", "text", "images"}``) takes in a prompt (a
        conversation travels as an artifact, never inside a task message: its text counts its UTF-8 bytes)."""
        images = len(message.get("images") or [])
        return TURN_TOKENS + len(message["text"].encode()) + images * (self.image_tokens + IMAGE_LABEL_TOKENS)

    def _room(self, images: int) -> int:
        room = self.context_tokens - TEMPLATE_TOKENS - images * self.image_tokens
        if room < 2:
            raise ContextLengthError(
                f"{images} image(s) take {images * self.image_tokens} of this model's {self.context_tokens} "
                "context tokens: no room is left for the question and its answer; send fewer images")
        return room

    def to_state(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state(cls, value: dict[str, Any]) -> PromptBudget:
        return cls(int(value["context_tokens"]), int(value["image_tokens"]))


def budget_for(model: str) -> PromptBudget:
    """The budget of the VLM ``model`` (a preset name, a hub id or a checkpoint folder), read without loading it."""
    from mgmflow.models.mgm import presets

    name = presets.ALIASES.get(model.lower(), model.lower())
    if name in presets.TINY_PRESETS:
        spec = presets.TINY_PRESETS[name]
        views = 1 if spec.image_grid == 1 else spec.image_grid**2 + int(spec.image_global)
        per_view = (spec.clip["image_size"] // spec.clip["patch_size"]) ** 2
        return PromptBudget(spec.tokenizer_model_max_length, views * per_view)
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        grid, hd = int(raw.get("image_grid") or 1), bool(raw.get("image_global"))
        views = 1 if grid == 1 else grid**2 + int(hd)
        return PromptBudget(int(raw.get("tokenizer_model_max_length") or RELEASED_CONTEXT[False]),
                            views * RELEASED_TOKENS_PER_VIEW)
    hd = model.lower().rstrip("/").endswith("-hd")  # mgm-7b-hd, YanweiLi/MGM-7B-HD: 2x2 crops plus a global view
    return PromptBudget(RELEASED_CONTEXT[hd], (5 if hd else 1) * RELEASED_TOKENS_PER_VIEW)


def run_budget(state: dict[str, Any]) -> PromptBudget:
    """The run's budget: the one recorded in its state, else the configured VLM's (call from graph nodes)."""
    if state.get("prompt_budget"):
        return PromptBudget.from_state(state["prompt_budget"])
    return configured_budget()


def configured_budget() -> PromptBudget:
    """The configured VLM's budget (call from graph nodes); a run on a thread records it afresh, since the
    thread's state keeps the budget of its earlier runs."""
    from mgmflow.orchestrator.runtime import get_run_context

    settings = get_run_context().settings
    return budget_for(settings.vlm_model if settings is not None else "tiny")


@dataclass(frozen=True)
class History:
    """The part of a conversation one prompt carries."""

    messages: list[dict[str, Any]]
    dropped: int  # the oldest messages left out
    answer_tokens: int  # the room left for the answer


def recent_history(budget: PromptBudget, messages: list[dict[str, Any]], *, answer_tokens: int,
                   least_answer_tokens: int) -> History:
    """A leading system message and the newest exchange always, then as many whole earlier exchanges (a user
    message and the replies after it), newest first, as leave ``answer_tokens`` for the answer.

    A system message and newest exchange that alone leave less than ``least_answer_tokens`` are a
    ``ContextLengthError``: the caller's input, whatever came before it, cannot fit."""
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    exchanges = _exchanges(messages[len(head):])
    if not exchanges:
        raise InvalidInputError("a conversation needs a user message")
    room = budget.context_tokens - TEMPLATE_TOKENS
    used = sum(budget.message_tokens(message) for message in [*head, *exchanges[-1]])
    if room - used < least_answer_tokens:
        newest = exchanges[-1][0]
        raise ContextLengthError(
            f"the message takes up to {used} tokens ({len(newest['text'].encode())} bytes of text, "
            f"{len(newest.get('images') or [])} image(s) of {budget.image_tokens} tokens each); this model's context "
            f"is {budget.context_tokens} tokens, {TEMPLATE_TOKENS} of them for the chat template and at least "
            f"{least_answer_tokens} for the reply: shorten the message or send fewer images")
    kept = exchanges[-1]
    for exchange in reversed(exchanges[:-1]):
        cost = sum(budget.message_tokens(message) for message in exchange)
        if room - used - cost < answer_tokens:
            break  # the most recent exchanges only: the history keeps no gaps
        kept, used = [*exchange, *kept], used + cost
    return History([*head, *kept], len(messages) - len(head) - len(kept), min(answer_tokens, room - used))


def _exchanges(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``messages`` cut before each user message."""
    exchanges: list[list[dict[str, Any]]] = []
    for message in messages:
        if message["role"] == "user" or not exchanges:
            exchanges.append([message])
        else:
            exchanges[-1].append(message)
    return exchanges


def fit(texts: list[str], limit: int) -> list[str]:
    """``texts`` clipped so that their JSON forms add up to at most ``limit`` bytes, the longest first: each
    text keeps all of itself or an equal share of what the shorter ones leave (water-filling)."""
    sizes = [_size(text) for text in texts]
    if sum(sizes) <= limit:
        return list(texts)
    shares, left, open_ = {}, limit, sorted(range(len(texts)), key=lambda index: sizes[index])
    while open_:
        share = left // len(open_)
        if sizes[open_[0]] > share:
            break
        index = open_.pop(0)
        shares[index], left = sizes[index], left - sizes[index]
    share = left // max(1, len(open_))
    return [texts[index] if index in shares else clip(texts[index], share) for index in range(len(texts))]


def clip(text: str, limit: int) -> str:
    """``text`` cut so that its JSON form takes at most ``limit`` bytes (``…`` marks a cut)."""
    if _size(text) <= limit:
        return text
    low, high = 0, len(text)
    while low < high:  # the longest prefix that fits, plus an ellipsis
        middle = (low + high + 1) // 2
        if _size(text[:middle] + "…") <= limit:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "…" if _size("…") <= limit else ""


def fill(template: str, limit: int, texts: list[str]) -> str:
    """``template``'s ``{}`` fields filled with ``texts``, clipped as :func:`fit` does so that the whole takes at most
    ``limit`` bytes as JSON (the template's own words first)."""
    words = _size(template.format(*[""] * len(texts)))
    return template.format(*fit(texts, limit - words))


def _size(text: str) -> int:
    return len(json.dumps(text))
