"""Mini-Gemini steps: ``vlm.chat``, ``vlm.describe``, ``vlm.write_prompt`` (``<GEN>``), ``vlm.critique``.

Images, long histories and big JSON schemas (an agent's tool schemas) arrive as artifact ids. Concurrent requests
for the same model run as one batched ``MGMEngine.chat`` call; a chat turn with a ``thread_id`` reuses that thread's
KV prefix on this worker.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mgmflow.models.errors import IncompleteOutputError, InvalidInputError
from mgmflow.workers.batching import BatchItem
from mgmflow.workers.steps import StepContext, get_runtime, step

MAX_TEXT = 16_000  # characters of one inline message; longer histories travel as an artifact


class _ChatParams(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str
    max_new_tokens: int = Field(default=256, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0, le=5)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None


class MessageInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    text: str = Field(max_length=MAX_TEXT)
    images: list[str] = Field(default_factory=list, max_length=16)  # artifact ids


class ChatInput(_ChatParams):
    messages: list[MessageInput] | None = None
    messages_artifact: str | None = None  # a JSON list of messages, for histories too long for a message
    thread_id: str | None = Field(default=None, max_length=200)
    json_schema: dict | None = None
    json_schema_artifact: str | None = None  # the schema as a JSON artifact, for schemas too big for a message
    # "allow": MGM may answer with an <h>…</h> image prompt (the official behaviour); "require": it must.
    generate_image: Literal["allow", "require"] | None = None

    @field_validator("generate_image", mode="before")
    @classmethod
    def _former_boolean(cls, value):
        """``true`` / ``false``, the field's former type, keep their meaning: a required prompt / none."""
        return {True: "require", False: None}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _one_history(self):
        if (self.messages is None) == (self.messages_artifact is None):
            raise ValueError("give exactly one of messages and messages_artifact")
        if self.json_schema is not None and self.json_schema_artifact is not None:
            raise ValueError("give at most one of json_schema and json_schema_artifact")
        return self


class DescribeInput(_ChatParams):
    image: str
    prompt: str = Field(default="Describe this image in detail.", max_length=MAX_TEXT)


class WritePromptInput(_ChatParams):
    request: str = Field(min_length=1, max_length=MAX_TEXT)
    images: list[str] = Field(default_factory=list, max_length=16)


class CritiqueInput(_ChatParams):
    image: str
    intent: str = Field(min_length=1, max_length=MAX_TEXT)
    max_new_tokens: int = Field(default=320, ge=64, le=8192)


class Critique(BaseModel):
    """The VLM's verdict on an image against the intent behind it."""

    score: int = Field(ge=0, le=10)
    verdict: Literal["accept", "refine", "edit"]
    feedback: str = Field(max_length=300)


CRITIQUE_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "verdict": {"enum": ["accept", "refine", "edit"]},
        "feedback": {"type": "string", "maxLength": 200},
    },
    "required": ["score", "verdict", "feedback"],
    "additionalProperties": False,
}
CRITIQUE_PROMPT = (
    "The image was made for this intent: {intent}\n"
    "Rate from 0 to 10 how well it matches. Answer accept if it does, refine if the prompt should be rewritten, "
    "edit if a local change would fix it, with short feedback. Answer in JSON."
)


def _messages(ctx: StepContext, messages: list[MessageInput]):
    from mgmflow.models.mgm.engine import Message

    return [Message(m.role, m.text, [ctx.read_artifact(image) for image in m.images]) for m in messages]


def _chat(ctx: StepContext, params: _ChatParams, messages: list[MessageInput], **options) -> dict:
    """One chat request through this model's batcher; the result as JSON."""
    from mgmflow.models.mgm.engine import ChatRequest

    runtime = get_runtime()
    request = ChatRequest(_messages(ctx, messages), max_new_tokens=params.max_new_tokens,
                          temperature=params.temperature, top_p=params.top_p, seed=params.seed, **options)

    def run(items: list[BatchItem], check) -> list:
        engine = runtime.models.get("vlm", params.model)

        def on_token(index: int, text: str) -> None:
            if not items[index].stopped:
                items[index].on_progress(text)

        with runtime.models.guard():
            results = engine.chat([item.request for item in items], on_token=on_token, check=check)
        return [(result, len(items)) for result in results]

    # Any chat requests can share a call: their key (the number of images) only says which share it best. A call
    # decodes for seconds: one that is not full waits up to 5% of the last one's time for the requests still coming.
    batcher = runtime.batcher(("chat", params.model), run, max_size=runtime.settings.vlm_batch_size, mix_keys=True,
                              wait_share=0.05)
    engine = runtime.models.get("vlm", params.model)
    engine.validate(request)  # here, in the step's thread: one bad request must not fail the batch it would join
    result, batch_size = batcher(BatchItem(request, engine.compatibility_key(request), check=ctx.check,
                                           on_progress=ctx.on_token))
    if result.finish_reason == "length" and (request.json_schema is not None or request.regex is not None):
        raise IncompleteOutputError(f"the structured answer reached max_new_tokens ({params.max_new_tokens}) before "
                                    "it was complete; raise max_new_tokens")
    return {"text": result.text, "image_prompt": result.image_prompt, "finish_reason": result.finish_reason,
            "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "model": params.model, "batch_size": batch_size}


def template_turns(messages: list[MessageInput]) -> list[MessageInput]:
    """A chat-model conversation in the shape the templates were trained on: after an optional system message,
    user and assistant turns alternating, from a user turn to a user turn, images in user turns only.

    Clients (LangChain, OpenAI, the chat workflow) may send consecutive messages of one role (several tool results,
    an agent's notes), may end on the assistant's own message (``response_format`` asks for a new reply to it) and
    may hand back the pictures the assistant drew: runs of one role become one turn, a conversation that opens or
    ends on an assistant turn gets an empty user turn there (the reply is a new assistant turn), and an assistant
    turn's images open the user turn after it."""
    head = messages[:1] if messages and messages[0].role == "system" else []
    turns: list[MessageInput] = []
    for message in messages[len(head):]:
        if turns and turns[-1].role == message.role:
            last = turns[-1]
            turns[-1] = _turn(last.role, f"{last.text}\n\n{message.text}".strip(), [*last.images, *message.images])
        else:
            turns.append(message)
    if turns and turns[0].role == "assistant":
        turns.insert(0, _turn("user", ""))
    if not turns or turns[-1].role == "assistant":
        turns.append(_turn("user", ""))
    drawn: list[str] = []
    for index, current in enumerate(turns):
        if current.role == "assistant" and current.images:
            drawn, turns[index] = current.images, _turn("assistant", current.text)
        elif current.role == "user" and drawn:
            turns[index], drawn = _turn("user", current.text, [*drawn, *current.images]), []
    return [*head, *turns]


def _turn(role: str, text: str, images: list[str] | None = None) -> MessageInput:
    """A turn made here: the size limits are on what a client sends, not on runs of its messages merged."""
    return MessageInput.model_construct(role=role, text=text, images=images or [])


def _json_artifact(ctx: StepContext, name: str, artifact_id: str):
    try:
        return json.loads(ctx.read_artifact(artifact_id))
    except ValueError as error:
        raise InvalidInputError(f"{name} is not JSON: {error}") from error


@step("vlm.chat", ChatInput)
def chat(ctx: StepContext, data: ChatInput) -> dict:
    messages = data.messages
    if messages is None:
        try:
            messages = [MessageInput.model_validate(m)
                        for m in _json_artifact(ctx, "messages_artifact", data.messages_artifact)]
        except (TypeError, ValidationError) as error:
            raise InvalidInputError(f"messages_artifact is not a JSON list of messages: {error}") from error
    json_schema = data.json_schema
    if data.json_schema_artifact is not None:
        json_schema = _json_artifact(ctx, "json_schema_artifact", data.json_schema_artifact)
        if not isinstance(json_schema, dict):
            raise InvalidInputError("json_schema_artifact is not a JSON object")
    result = _chat(ctx, data, template_turns(messages), json_schema=json_schema,
                   generate_image=data.generate_image, cache_key=data.thread_id)
    if data.thread_id is not None:
        get_runtime().affinity.remember(data.thread_id, f"vlm.{data.model}")
    return result


@step("vlm.describe", DescribeInput)
def describe(ctx: StepContext, data: DescribeInput) -> dict:
    return _chat(ctx, data, [MessageInput(role="user", text=data.prompt, images=[data.image])])


@step("vlm.write_prompt", WritePromptInput)
def write_prompt(ctx: StepContext, data: WritePromptInput) -> dict:
    return _chat(ctx, data, [MessageInput(role="user", text=data.request, images=data.images)],
                 generate_image="require")


@step("vlm.critique", CritiqueInput)
def critique(ctx: StepContext, data: CritiqueInput) -> dict:
    message = MessageInput(role="user", text=CRITIQUE_PROMPT.format(intent=data.intent), images=[data.image])
    answer = _chat(ctx, data, [message], json_schema=CRITIQUE_SCHEMA)  # complete, or IncompleteOutputError
    verdict = Critique.model_validate_json(answer["text"])
    return {**verdict.model_dump(), "model": data.model, "batch_size": answer["batch_size"]}
