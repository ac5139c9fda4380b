"""Mini-Gemini conversation templates and the chunk-wise tokenization around ``<image>``.

The strings reproduce what the released checkpoints were trained on (see mgm-official §6), quirks included:
ChatML without newlines after ``<|im_end|>`` and the LLaMA-3 assistant header that literally says "system".
The template is chosen from the checkpoint's config (backbone and vocabulary), never from a folder name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from models.errors import InvalidInputError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class Turn:
    """One message as the template sees it: images become ``<image>`` placeholders at the start of the text."""

    role: Role
    text: str
    num_images: int = 0


def user_text_with_images(text: str, num_images: int) -> str:
    """The user-turn layout of §6.4: one ``<image>\\n`` per image; with two or more, each is named ``Image k:``."""
    if num_images == 1:
        return f"{IMAGE_TOKEN}\n{text}"
    return "".join(f"Image {k}:{IMAGE_TOKEN}\n" for k in range(1, num_images + 1)) + text


@dataclass(frozen=True)
class ConversationTemplate:
    """How one checkpoint family lays out a conversation, and which strings end the assistant's turn.

    ``render`` returns the full prompt ending with the assistant's header, ready for generation. A leading
    ``system`` message replaces the template's default system prompt.
    """

    name: str
    default_system: str
    stop_strings: tuple[str, ...] = field(default=())

    def render(self, turns: Sequence[Turn]) -> str:
        system, dialogue = _split_system(turns, self.default_system)
        pairs = _pair_turns(dialogue)
        pairs = [(user_text_with_images(u.text, u.num_images) if u.num_images else u.text, a) for u, a in pairs]
        return _RENDERERS[self.name](system, pairs)


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


# Each renderer: (system text, [(user text with placeholders, answer or None)]) -> prompt string.


def _render_vicuna(system: str, pairs: list[tuple[str, str | None]]) -> str:
    # sep " " after the system and user turns, sep2 "</s>" after answers; the open turn ends "ASSISTANT:".
    prompt = system + " "
    for user, answer in pairs:
        prompt += f"USER: {user} ASSISTANT:"
        if answer is not None:
            prompt += f" {answer}</s>"
    return prompt


def _render_mistral(system: str, pairs: list[tuple[str, str | None]]) -> str:
    # LLaMA-2 style; the released prompt has an empty system, which then adds nothing.
    prompt = ""
    for index, (user, answer) in enumerate(pairs):
        if index == 0 and system:
            user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
        prompt += ("<s>" if index else "") + f"[INST] {user} [/INST]"
        if answer is not None:
            prompt += f" {answer} </s>"
    return prompt


def _render_chatml(system: str, pairs: list[tuple[str, str | None]]) -> str:
    # MPT style: no newline after <|im_end|>, unlike standard ChatML.
    prompt = f"<|im_start|>system\n{system}<|im_end|>"
    for user, answer in pairs:
        prompt += f"<|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n"
        if answer is not None:
            prompt += f"{answer}<|im_end|>"
    return prompt


def _render_gemma(system: str, pairs: list[tuple[str, str | None]]) -> str:
    # Gemma has no system role: a system text, if any, opens the first user turn.
    prompt = ""
    for index, (user, answer) in enumerate(pairs):
        if index == 0 and system:
            user = f"{system}\n\n{user}"
        prompt += f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n"
        if answer is not None:
            prompt += f"{answer}<end_of_turn>\n<eos>"
    return prompt


_LLAMA3_USER = "<|start_header_id|>user<|end_header_id|>\n\n"
# Trained with this header for the assistant (a typo upstream, reproduced on purpose).
_LLAMA3_ASSISTANT = "<|start_header_id|>system<|end_header_id|>\n\n"


def _render_llama3(system: str, pairs: list[tuple[str, str | None]]) -> str:
    prompt = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>"
    for user, answer in pairs:
        prompt += f"{_LLAMA3_USER}{user}<|eot_id|>{_LLAMA3_ASSISTANT}"
        if answer is not None:
            prompt += f"{answer}<|eot_id|>"
    return prompt


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


def tokenize_with_images(prompt: str, tokenizer) -> list[int]:
    """Token ids of ``prompt`` with ``IMAGE_TOKEN_INDEX`` (-200) for each ``<image>`` (mgm-official §6.2).

    Each chunk between placeholders is tokenized on its own, as in training; when the tokenizer adds a BOS,
    only the first chunk keeps it. Tokenizing the whole string would differ after an image.
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(IMAGE_TOKEN)]
    bos = tokenizer.bos_token_id
    offset = 1 if bos is not None and chunks[0][:1] == [bos] else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
        ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(chunk[offset:])
    return ids
