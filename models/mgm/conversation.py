"""Mini-Gemini conversation templates.

The strings reproduce what the released checkpoints were trained on (see mgm-official §6), quirks included:
ChatML without newlines after ``<|im_end|>`` and the LLaMA-3 assistant header that literally says "system".
A prompt is laid out as spans that keep template text apart from message text, so that only the template can
produce control tokens and image placeholders (tokenization: ``mgmflow.models.mgm.tokenizer``).
The template is chosen from the checkpoint's config (backbone and vocabulary), never from a folder name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from mgmflow.models.errors import InvalidInputError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Span:
    """A piece of a rendered prompt: template text, or the text of a message (``content``).

    Only template text may produce control tokens (``</s>``, ``<|eot_id|>``, ``<start_of_turn>``...) or image
    placeholders; a message's text is tokenized as plain text whatever it contains, so a tenant cannot forge
    turns and a stored answer that mentions ``<image>`` does not become one.
    """

    text: str
    content: bool = False


@dataclass(frozen=True)
class Turn:
    """One message as the template sees it: images become ``<image>`` placeholders at the start of the text."""

    role: Role
    text: str
    num_images: int = 0


def _user_spans(turn: Turn, first_number: int, numbered: bool) -> list[Span]:
    """The user-turn layout of §6.4: one ``<image>\\n`` per image, then the text. When the conversation holds two
    or more images, each is named ``Image k:`` with ``k`` counted over the whole conversation (the official CLI)."""
    spans = []
    for number in range(first_number, first_number + turn.num_images):
        spans.append(Span(f"Image {number}:{IMAGE_TOKEN}\n" if numbered else f"{IMAGE_TOKEN}\n"))
    return [*spans, Span(turn.text, content=True)]


@dataclass(frozen=True)
class ConversationTemplate:
    """How one checkpoint family lays out a conversation, and which strings end the assistant's turn.

    ``spans`` lays out the full prompt ending with the assistant's header, ready for generation; ``render`` is
    the same prompt as one string. A leading ``system`` message replaces the template's default system prompt.
    """

    name: str
    default_system: str
    stop_strings: tuple[str, ...] = field(default=())

    def spans(self, turns: Sequence[Turn]) -> list[Span]:
        system, dialogue = _split_system(turns, self.default_system)
        pairs = _pair_turns(dialogue)
        numbered = sum(user.num_images for user, _ in pairs) >= 2
        laid_out, number = [], 1
        for user, answer in pairs:
            laid_out.append((_user_spans(user, number, numbered), None if answer is None else Span(answer, True)))
            number += user.num_images
        return [span for span in _RENDERERS[self.name](Span(system, True), laid_out) if span.text]

    def render(self, turns: Sequence[Turn]) -> str:
        return "".join(span.text for span in self.spans(turns))


def _split_system(turns: Sequence[Turn], default: str) -> tuple[str, list[Turn]]:
    turns = list(turns)
    if turns and turns[0].role == "system":
        if turns[0].num_images:
            raise InvalidInputError("a system message cannot carry images")
        return turns[0].text, turns[1:]
    return default, turns


def _pair_turns(turns: list[Turn]) -> list[tuple[Turn, str | None]]:
    """Alternating user/assistant turns ending with a user turn -> [(user, answer or None for the last)]."""
    if not turns or turns[-1].role != "user":
        raise InvalidInputError("a conversation must end with a user message")
    pairs: list[tuple[Turn, str | None]] = []
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            raise InvalidInputError(
                f"message {index} has role {turn.role!r}; after an optional system message, "
                "roles must alternate user/assistant"
            )
        if turn.role == "assistant":
            if turn.num_images:
                raise InvalidInputError("an assistant message cannot carry images")
            pairs[-1] = (pairs[-1][0], turn.text)
        else:
            pairs.append((turn, None))
    return pairs


# Each renderer: (system, [(user spans, answer or None)]) -> spans. Template strings are plain ``Span``s.
Pairs = list[tuple[list[Span], Span | None]]


def _render_vicuna(system: Span, pairs: Pairs) -> list[Span]:
    # sep " " after the system and user turns, sep2 "</s>" after answers; the open turn ends "ASSISTANT:".
    spans = [system, Span(" ")]
    for user, answer in pairs:
        spans += [Span("USER: "), *user, Span(" ASSISTANT:")]
        if answer is not None:
            spans += [Span(" "), answer, Span("</s>")]
    return spans


def _render_mistral(system: Span, pairs: Pairs) -> list[Span]:
    # LLaMA-2 style; the released prompt has an empty system, which then adds nothing.
    spans = []
    for index, (user, answer) in enumerate(pairs):
        if index == 0 and system.text:
            user = [Span("<<SYS>>\n"), system, Span("\n<</SYS>>\n\n"), *user]
        spans += [Span("<s>" if index else ""), Span("[INST] "), *user, Span(" [/INST]")]
        if answer is not None:
            spans += [Span(" "), answer, Span(" </s>")]
    return spans


def _render_chatml(system: Span, pairs: Pairs) -> list[Span]:
    # MPT style: no newline after <|im_end|>, unlike standard ChatML.
    spans = [Span("<|im_start|>system\n"), system, Span("<|im_end|>")]
    for user, answer in pairs:
        spans += [Span("<|im_start|>user\n"), *user, Span("<|im_end|><|im_start|>assistant\n")]
        if answer is not None:
            spans += [answer, Span("<|im_end|>")]
    return spans


def _render_gemma(system: Span, pairs: Pairs) -> list[Span]:
    # Gemma has no system role: a system text, if any, opens the first user turn.
    spans = []
    for index, (user, answer) in enumerate(pairs):
        if index == 0 and system.text:
            user = [system, Span("\n\n"), *user]
        spans += [Span("<start_of_turn>user\n"), *user, Span("<end_of_turn>\n<start_of_turn>model\n")]
        if answer is not None:
            spans += [answer, Span("<end_of_turn>\n<eos>")]
    return spans


_LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
# Trained with this header for the assistant (a typo upstream, reproduced on purpose).
_LLAMA3_ASSISTANT = "<|start_header_id|>system<|end_header_id|>\n\n"


def _render_llama3(system: Span, pairs: Pairs) -> list[Span]:
    spans = [Span("<|start_header_id|>system<|end_header_id|>\n\n"), system, Span("<|eot_id|>")]
    for user, answer in pairs:
        spans += [Span(_LLAMA3_USER), *user, Span(f"<|eot_id|>{_LLAMA3_ASSISTANT}")]
        if answer is not None:
            spans += [answer, Span("<|eot_id|>")]
    return spans


_RENDERERS = {
    "vicuna_v1": _render_vicuna,
    "mistral_instruct": _render_mistral,
    "chatml_direct": _render_chatml,
    "gemma": _render_gemma,
    "llama_3": _render_llama3,
}

TEMPLATES: dict[str, ConversationTemplate] = {
    "vicuna_v1": ConversationTemplate(
        "vicuna_v1",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        stop_strings=("</s>",),
    ),
    "mistral_instruct": ConversationTemplate("mistral_instruct", "", stop_strings=("</s>",)),
    "chatml_direct": ConversationTemplate("chatml_direct", "Answer the questions.", stop_strings=("<|im_end|>",)),
    "gemma": ConversationTemplate("gemma", "", stop_strings=("<end_of_turn>",)),
    "llama_3": ConversationTemplate(
        "llama_3",
        "You are a helpful language and vision assistant. You are able to understand the visual content that the "
        "user provides, and assist the user with a variety of tasks using natural language.",
        stop_strings=("<|eot_id|>",),
    ),
}

# Config key a checkpoint (or a preset) may set to force a template.
TEMPLATE_CONFIG_KEY = "mgmflow_template"


def get_template(name: str) -> ConversationTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InvalidInputError(f"unknown conversation template {name!r}; known: {', '.join(TEMPLATES)}") from None


def template_for_config(config, override: str | None = None) -> ConversationTemplate:
    """The template the released checkpoint with this config was trained with.

    The backbone and the vocabulary tell the released models apart: Gemma -> MGM-2B, Mixtral -> 8x7B, a LLaMA
    with the 128k LLaMA-3 vocabulary -> 8B, the 64k Yi vocabulary -> 34B, any other LLaMA -> Vicuna 7B/13B.
    """
    name = override or _configured_template(config)
    if name:
        return get_template(name)
    backbone = getattr(config, "backbone", "llama")
    vocab_size = config.text_config.vocab_size
    if backbone == "gemma":
        return TEMPLATES["gemma"]
    if backbone in ("mixtral", "mistral"):
        return TEMPLATES["mistral_instruct"]
    if vocab_size >= 128_000:
        return TEMPLATES["llama_3"]
    if vocab_size == 64_000:
        return TEMPLATES["chatml_direct"]
    return TEMPLATES["vicuna_v1"]


def _configured_template(config) -> str | None:
    """The template a config forces, if any: kept among MGM's extra keys or on the backbone's config."""
    extra = getattr(config, "extra", None) or {}
    return extra.get(TEMPLATE_CONFIG_KEY) or getattr(config.text_config, TEMPLATE_CONFIG_KEY, None)

