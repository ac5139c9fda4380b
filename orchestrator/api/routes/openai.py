"""OpenAI-compatible chat on Mini-Gemini (``/v1/models``, ``/v1/chat/completions``), for the ``openai`` client.

Images come as ``image_url`` parts: data URLs, or https URLs of allow-listed hosts only (nothing else is ever
fetched). Each is validated by the one image decoder and stored; the ``vlm.chat`` step gets artifact ids. With
``"modalities": ["text", "image"]`` Mini-Gemini may write an image prompt (its ``<GEN>`` path): the image is drawn,
stored, and returned as a markdown image link, its id in the response's ``artifacts`` extension field.

Tool calling as OpenAI has it (``tools``, ``tool_choice`` auto / none / required / a named function, ``tool_calls``
in the reply, ``tool`` messages in the history, streamed as one tool-call delta): the reply is decoded under a
grammar built from the tools' schemas (``mgmflow.tools.chat_model.tools_schema``, the same as ``MGMChatModel.bind_tools``),
so a call always names an offered tool with arguments valid for its schema. Parameters Mini-Gemini cannot honour
(``stop``, ``logprobs``, penalties, …) are refused by name, never ignored.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import anyio
import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from mgmflow.models.diffusion.defaults import NEGATIVE_PROMPT
from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.api.allowlist import allowed
from mgmflow.orchestrator.api.deps import Context, CurrentScope
from mgmflow.orchestrator.api.errors import ApiError, public_message
from mgmflow.orchestrator.api.logs import current_run, current_task
from mgmflow.orchestrator.api.images import store_decoded
from mgmflow.orchestrator.api.openapi import errors
from mgmflow.orchestrator.api.quotas import policy_for
from mgmflow.tools.chat_model import (
    parse_tool_reply, tool_call_id, tool_call_text, tool_result_header, tools_prompt, tools_schema,
)

router = APIRouter(prefix="/v1", tags=["openai"])

CHAT_PRIORITY = 0  # interactive: ahead of every run and batch item
POLL_S = 0.05
DISCONNECT_POLL_S = 0.25
MAX_INLINE_MESSAGES_BYTES = 3000  # the step message must stay under 4 KB: longer histories go as an artifact
DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w=.+-]+)*),(?P<data>.*)$", re.S)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str = Field(max_length=64 * 1024 * 1024)
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


class FunctionCall(BaseModel):
    name: str = Field(max_length=64)
    arguments: str = Field(max_length=64 * 1024)  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    id: str = Field(max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=16)  # assistant: the calls it made
    tool_call_id: str | None = Field(None, max_length=128)  # tool: the call this is the result of


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls are always valid for their schema: decoded under it


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionSpec


class FunctionName(BaseModel):
    name: str = Field(max_length=64)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI parameters Mini-Gemini does not honour, with the values that ask for nothing (accepted as no-ops).
UNSUPPORTED = {
    "stop": (None, "", []), "logprobs": (None, False), "top_logprobs": (None, 0), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "logit_bias": (None, {}), "functions": (None, []), "function_call": (None,),
    "audio": (None,), "prediction": (None,), "reasoning_effort": (None,), "web_search_options": (None,),
    "service_tier": (None, "auto", "default"), "store": (None, False), "metadata": (None, {}), "verbosity": (None,),
}


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request Mini-Gemini supports; anything else is refused by name."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=8192)
    max_completion_tokens: int | None = Field(None, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text", "image"]] | None = None
    tools: list[ToolSpec] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # a reply holds at most one call, which either setting allows
    user: str | None = Field(None, max_length=256)  # an end-user id for the caller's records; not used here

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if name in data and data[name] not in neutral:
                    raise ValueError(f"the parameter {name!r} is not supported by this server")
                data = {key: value for key, value in data.items() if key != name}
        return data

    def tool_mode(self) -> str | None:
        """How the reply is decoded: None (text), or the ``tool_choice`` of ``tools_schema`` (auto, required,
        or the name of the one function to call)."""
        if not self.tools or self.tool_choice == "none":
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"


def _models(context) -> list[str]:
    return [context.settings.vlm_model]


@router.get("/models")
def list_models(context: Context, _: CurrentScope) -> dict[str, Any]:
    """The chat models served: the configured Mini-Gemini."""
    return {"object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mgmflow"} for name in _models(context)]}


# Request → vlm.chat payload -------------------------------------------------------------------------------------


async def _image_bytes(url: str, where: str, settings) -> bytes:
    """The bytes of an ``image_url``: a base64 data URL, or an https URL on an allow-listed host."""
    if url.startswith("data:"):
        match = DATA_URL.match(url)
        if match is None or ";base64" not in match["params"]:
            raise ApiError(400, f"{where}: a data URL must be data:<type>;base64,<data>", code="invalid_image_url")
        try:
            return base64.b64decode(match["data"], validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, f"{where}: invalid base64 in the data URL", code="invalid_base64") from None
    try:
        permitted = allowed(url, settings.image_url_hosts)
    except ValueError:
        permitted = False
    if not permitted:
        raise ApiError(400, f"{where}: only data URLs, or URLs on origins in MGMFLOW_IMAGE_URL_HOSTS, are accepted",
                       code="image_url_not_allowed")
    try:
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                response.raise_for_status()
                data = bytearray()
                async for chunk in response.aiter_bytes():
                    data += chunk
                    if len(data) > settings.max_body_bytes:
                        raise ApiError(413, f"{where}: the image is over {settings.max_body_bytes:,} bytes",
                                       code="image_too_large")
                return bytes(data)
    except httpx.HTTPError as error:
        raise ApiError(400, f"{where}: cannot fetch the image: {error}", code="image_fetch_failed") from None


async def _messages(context, body: ChatCompletionRequest, scope: str) -> list[dict[str, Any]]:
    """OpenAI messages as ``vlm.chat`` messages: text, and images stored as artifacts of the caller's scope.

    Every limit is checked before any image is decoded (text length, images across all messages, their sizes from
    the headers), and images are stored only once all of them have been decoded: a refused request stores nothing."""
    settings, total, converted, pending, calls = context.settings, 0, [], [], {}
    for index, message in enumerate(body.messages):
        texts, images = [], []
        if message.role == "tool":
            if message.tool_call_id not in calls:
                raise ApiError(400, f"messages[{index}].tool_call_id matches no tool call of an earlier assistant "
                                    "message", code="invalid_request")
            texts.append(tool_result_header(calls[message.tool_call_id]))
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for number, part in enumerate(parts or []):
            if isinstance(part, TextPart):
                texts.append(part.text)
            else:
                images.append(len(pending))
                pending.append((f"messages[{index}].content[{number}].image_url", part.image_url.url))
        for call in message.tool_calls or []:  # the assistant's earlier calls, as the model writes them
            try:
                arguments = json.loads(call.function.arguments)
            except json.JSONDecodeError:
                raise ApiError(400, f"messages[{index}]: the arguments of tool call {call.id[:40]!r} are not JSON",
                               code="invalid_request") from None
            calls[call.id] = call.function.name
            texts.append(tool_call_text(call.function.name, arguments))
        text = "\n".join(texts)
        total += len(text)
        if total > settings.max_prompt_chars:
            raise ApiError(413, f"the messages hold over {settings.max_prompt_chars:,} characters of text",
                           code="prompt_too_long")
        role = {"developer": "system", "tool": "user"}.get(message.role, message.role)  # results: user turns
        converted.append({"role": role, "text": text, "images": images})
    context.images.check_count(len(pending))
    fetched = [(where, await _image_bytes(url, where, settings)) for where, url in pending]
    decoded = await context.images.decode(fetched)
    ids = [(await run_in_threadpool(store_decoded, context.store, image, scope=scope, metadata={"source": "chat"})).id
           for image in decoded]
    for message in converted:
        message["images"] = [ids[position] for position in message["images"]]
    return converted


def _json_schema(response_format: ResponseFormat | None) -> dict | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None or not response_format.json_schema.schema_:
        raise ApiError(400, "response_format.json_schema.schema is required", code="invalid_request")
    return response_format.json_schema.schema_


async def _chat_payload(context, body: ChatCompletionRequest, scope: str) -> dict[str, Any]:
    if body.model not in _models(context):
        raise ApiError(404, f"model {body.model!r} is not served here; see GET /v1/models", code="model_not_found")
    messages = await _messages(context, body, scope)
    payload: dict[str, Any] = {
        "model": body.model, "max_new_tokens": body.max_completion_tokens or body.max_tokens or 512,
        "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed,
        "json_schema": _json_schema(body.response_format),
        # As the official MGM: asked for an image, the model draws only if it writes an <h>…</h> prompt.
        "generate_image": "allow" if "image" in (body.modalities or []) else None,
    }
    if body.tool_choice == "required" and not body.tools or isinstance(body.tool_choice, NamedToolChoice) and \
            body.tool_choice.function.name not in {tool.function.name for tool in body.tools or []}:
        raise ApiError(400, "tool_choice names no tool of 'tools'", code="invalid_request")
    mode = body.tool_mode()
    if mode is not None:
        if payload["json_schema"] is not None:
            raise ApiError(400, "response_format cannot be combined with tools", code="invalid_request")
        functions = [tool.function.model_dump(exclude_none=True) for tool in body.tools]
        messages.insert(0, {"role": "system", "text": tools_prompt(functions), "images": []})
        payload.update(json_schema=tools_schema(functions, mode), generate_image=False)
    if len(json.dumps(messages)) > MAX_INLINE_MESSAGES_BYTES:
        history = await run_in_threadpool(context.store.put, json.dumps(messages).encode(), scope=scope,
                                          media_type="application/json", metadata={"source": "chat-history"})
        payload["messages_artifact"] = history.id
    else:
        payload["messages"] = messages
    return payload


# Running the steps -----------------------------------------------------------------------------------------------


async def _finished(context, task_id: str) -> Any:
    while True:
        record = await run_in_threadpool(context.tasks.get, task_id)
        if record is not None and record.final:
            context.metrics.observe_task(record.kind, record.status, record.updated_at - record.created_at)
            return record
        await asyncio.sleep(POLL_S)


# Step error codes that are the caller's to fix: a 400, as OpenAI answers (an over-long prompt included).
_CALLER_ERRORS = frozenset({"invalid_input", "invalid_image", "artifact_not_found", "incomplete_output",
                            "context_length_exceeded"})


def _raise_for(record: Any) -> None:
    if record.status == "done":
        return
    error = record.error or {}
    code, message = error.get("code", record.status), error.get("message", f"the model step ended {record.status}")
    status = 400 if code in _CALLER_ERRORS else 503 if error.get("retryable") else 502
    raise ApiError(status, message, code=code)


async def _submit(context, kind: str, payload: dict, *, task_id: str, run_id: str, scope: str) -> None:
    # Interactive, so as urgent as the key may be (the operator sets how urgent: api.quotas).
    priority = max(CHAT_PRIORITY, policy_for(context.settings, scope).top_priority)
    await run_in_threadpool(context.tasks.submit, kind, payload, task_id=task_id, run_id=run_id, scope=scope,
                            priority=priority)


async def _draw(context, prompt: str, seed: int | None, *, run_id: str, scope: str, base_url: str):
    """Draw Mini-Gemini's image prompt; returns (markdown, artifact ids)."""
    payload = {"prompts": [prompt], "seeds": [seed if seed is not None else 0], "negative_prompt": NEGATIVE_PROMPT}
    task_id = f"{run_id}:draw"
    await _submit(context, "diffusion.text2img", payload, task_id=task_id, run_id=run_id, scope=scope)
    record = await _finished(context, task_id)
    _raise_for(record)
    ids = [image["artifact"] for image in record.result["images"]]
    links = "\n\n".join(f"![{prompt[:80]}]({base_url}artifacts/{artifact}/content)" for artifact in ids)
    return links, ids


def _usage(result: dict) -> dict[str, int]:
    prompt, completion = result.get("prompt_tokens", 0), result.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/chat/completions", response_class=JSONResponse,
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}, **errors(404, 502)})
async def create_chat_completion(body: ChatCompletionRequest, request: Request, context: Context,
                                 scope: CurrentScope):
    """One Mini-Gemini chat turn; ``stream: true`` answers with ``chat.completion.chunk`` SSE events."""
    chats = await context.quotas.chats.count(scope)  # a completion counts against the key's quota as a run does
    await run_in_threadpool(context.quotas.check_active, scope, adding=1, chats=chats)
    payload = await _chat_payload(context, body, scope)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    task_id = f"{completion_id}:chat"
    current_run.set(completion_id)
    current_task.set(task_id)
    await _submit(context, "vlm.chat", payload, task_id=task_id, run_id=completion_id, scope=scope)
    base = {"id": completion_id, "created": int(time.time()), "model": body.model}
    base_url = str(request.base_url)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(context, base, task_id, body.seed, scope, base_url, include_usage,
                         tools=body.tool_mode() is not None)
        return EventSourceResponse(_cancelled_when_closed(context, completion_id, events), ping=15, sep="\n")
    async with context.quotas.chats.holding(scope), _cancelled_if_abandoned(context, request, completion_id):
        return await _answer(context, base, task_id, body, scope, base_url)


async def _answer(context, base: dict, task_id: str, body: ChatCompletionRequest, scope: str, base_url: str):
    """The whole completion once the step (and the drawing it asks for) has finished."""
    completion_id = base["id"]
    record = await _finished(context, task_id)
    _raise_for(record)
    result = record.result
    if body.tool_mode() is not None:
        message, finish_reason = _tool_reply(result)
        return {**base, "object": "chat.completion", "usage": _usage(result), "artifacts": [],
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}]}
    content, artifacts = result["text"], []
    if result.get("image_prompt"):
        links, artifacts = await _draw(context, result["image_prompt"], body.seed, run_id=completion_id,
                                       scope=scope, base_url=base_url)
        content = f"{content}\n\n{links}".strip()
    return {**base, "object": "chat.completion", "usage": _usage(result), "artifacts": artifacts,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": result["finish_reason"], "logprobs": None}]}


def _tool_reply(result: dict) -> tuple[dict[str, Any], str]:
    """The assistant message of a tools-bound reply (a tool call, or a text answer) and its finish reason."""
    try:
        name, value = parse_tool_reply(result["text"], result["finish_reason"])
    except InvalidInputError as error:
        raise ApiError(400, str(error), code="max_tokens_too_small") from None
    if name is None:
        return {"role": "assistant", "content": value}, result["finish_reason"]
    call = {"id": tool_call_id(), "type": "function", "function": {"name": name, "arguments": json.dumps(value)}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"


@asynccontextmanager
async def _cancelled_if_abandoned(context, request: Request, run_id: str) -> AsyncIterator[None]:
    """Wait for the answer while watching the connection: a client that hangs up (its timeout, a closed tab)
    gets its model steps cancelled, so that no GPU keeps generating for nobody."""
    waiting = asyncio.current_task()

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        waiting.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        await _cancel_steps(context, run_id)
        raise
    finally:
        watcher.cancel()


async def _cancelled_when_closed(context, run_id: str, events: AsyncIterator[ServerSentEvent]):
    """``events``; a client that closes the stream first (sse-starlette then cancels this generator) gets its
    model steps cancelled too."""
    try:
        async for event in events:
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        await _cancel_steps(context, run_id)
        raise


async def _cancel_steps(context, run_id: str) -> None:
    # Shielded: it runs while this request is being cancelled, where any other await would be cancelled too.
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(context.tasks.cancel, run_id)


def _chunk(base: dict, delta: dict, finish_reason: str | None = None, **extra: Any) -> ServerSentEvent:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
    return ServerSentEvent(data=json.dumps(body))


async def _stream(context, base: dict, task_id: str, seed: int | None, scope: str, base_url: str,
                  include_usage: bool, *, tools: bool = False) -> AsyncIterator[ServerSentEvent]:
    """Token deltas as they are generated, then the image link (if any), the finish chunk, usage, ``[DONE]``.
    A tools-bound reply is JSON under the tools' grammar: it is sent whole once decoded, as one tool-call (or
    content) delta."""
    async with context.quotas.chats.holding(scope):
        async for event in _stream_events(context, base, task_id, seed, scope, base_url, include_usage, tools):
            yield event


async def _stream_events(context, base: dict, task_id: str, seed: int | None, scope: str, base_url: str,
                         include_usage: bool, tools: bool) -> AsyncIterator[ServerSentEvent]:
    run_id = base["id"]
    yield _chunk(base, {"role": "assistant", "content": ""})
    after, record = None, None
    while record is None:
        record = await run_in_threadpool(context.tasks.get, task_id)
        record = record if record is not None and record.final else None
        # Read after the status: every token of a finished step is in this read.
        for event in await run_in_threadpool(context.tasks.events, run_id, after):
            after = event.id
            if event.type == "task.token" and event.data.get("task_id") == task_id and not tools:
                yield _chunk(base, {"content": event.data["text"]})
        if record is None:
            await asyncio.sleep(POLL_S)
    if record.status != "done":
        error = record.error or {}
        yield _error_event(public_message(error.get("message", f"the model step ended {record.status}")),
                           "server_error", error.get("code", record.status))
        return
    result, artifacts, finish_reason = record.result, [], record.result["finish_reason"]
    if tools:
        try:
            message, finish_reason = _tool_reply(result)
        except ApiError as error:
            yield _error_event(error.message, "invalid_request_error", error.code)
            return
        calls = message.get("tool_calls")
        yield _chunk(base, {"tool_calls": [{"index": 0, **calls[0]}]} if calls else {"content": message["content"]})
    elif result.get("image_prompt"):
        links, artifacts = await _draw(context, result["image_prompt"], seed, run_id=run_id, scope=scope,
                                       base_url=base_url)
        yield _chunk(base, {"content": f"\n\n{links}"})
    yield _chunk(base, {}, finish_reason, artifacts=artifacts)
    if include_usage:
        yield ServerSentEvent(data=json.dumps({**base, "object": "chat.completion.chunk", "choices": [],
                                               "usage": _usage(result)}))
    yield ServerSentEvent(data="[DONE]")


def _error_event(message: str, kind: str, code: str) -> ServerSentEvent:
    return ServerSentEvent(data=json.dumps({"error": {"message": message, "type": kind, "code": code}}))
