"""OpenAI-compatible chat on Mini-Gemini (``/v1/models``, ``/v1/chat/completions``), for the ``openai`` client.

Images come as ``image_url`` parts: data URLs, or https URLs of allow-listed hosts only (nothing else is ever
fetched). Each is validated by the one image decoder and stored; the ``vlm.chat`` step gets artifact ids. With
``"modalities": ["text", "image"]`` Mini-Gemini may write an image prompt (its ``<GEN>`` path): the image is drawn,
stored, and returned as a markdown image link, its id in the response's ``artifacts`` extension field.
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
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from models.diffusion.defaults import NEGATIVE_PROMPT
from orchestrator.api.deps import Context, CurrentScope
from orchestrator.api.errors import ApiError
from orchestrator.api.logs import current_run, current_task
from orchestrator.api.images import store_decoded
from orchestrator.api.quotas import policy_for

router = APIRouter(prefix="/v1", tags=["openai"])

CHAT_PRIORITY = 0  # interactive: ahead of every run and batch item
POLL_S = 0.05
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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


class JsonSchemaFormat(BaseModel):
    name: str = Field("response", max_length=64)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat request Mini-Gemini supports; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

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
    host = httpx.URL(url).host if url.startswith(("http://", "https://")) else None
    if host is None or host not in settings.image_url_hosts:
        raise ApiError(400, f"{where}: only data URLs, or URLs on hosts in MGMFLOW_IMAGE_URL_HOSTS, are accepted",
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
    settings, total, converted, pending = context.settings, 0, [], []
    for index, message in enumerate(body.messages):
        texts, images = [], []
        parts = [TextPart(type="text", text=message.content)] if isinstance(message.content, str) else message.content
        for number, part in enumerate(parts or []):
            if isinstance(part, TextPart):
                texts.append(part.text)
            else:
                images.append(len(pending))
                pending.append((f"messages[{index}].content[{number}].image_url", part.image_url.url))
        text = "\n".join(texts)
        total += len(text)
        if total > settings.max_prompt_chars:
            raise ApiError(413, f"the messages hold over {settings.max_prompt_chars:,} characters of text",
                           code="prompt_too_long")
        role = "system" if message.role == "developer" else message.role
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
        "json_schema": _json_schema(body.response_format), "generate_image": "image" in (body.modalities or []),
    }
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


def _raise_for(record: Any) -> None:
    if record.status == "done":
        return
    error = record.error or {}
    code, message = error.get("code", record.status), error.get("message", f"the model step ended {record.status}")
    status = 400 if code in ("invalid_input", "invalid_image", "artifact_not_found") else \
        503 if error.get("retryable") else 502
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
             responses={200: {"content": {"application/json": {}, "text/event-stream": {}}}})
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
        return EventSourceResponse(_stream(context, base, task_id, body.seed, scope, base_url, include_usage),
                                   ping=15, sep="\n")
    async with context.quotas.chats.holding(scope):
        return await _answer(context, base, task_id, body, scope, base_url)


async def _answer(context, base: dict, task_id: str, body: ChatCompletionRequest, scope: str, base_url: str):
    """The whole completion once the step (and the drawing it asks for) has finished."""
    completion_id = base["id"]
    record = await _finished(context, task_id)
    _raise_for(record)
    result = record.result
    content, artifacts = result["text"], []
    if result.get("image_prompt"):
        links, artifacts = await _draw(context, result["image_prompt"], body.seed, run_id=completion_id,
                                       scope=scope, base_url=base_url)
        content = f"{content}\n\n{links}".strip()
    return {**base, "object": "chat.completion", "usage": _usage(result), "artifacts": artifacts,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": result["finish_reason"], "logprobs": None}]}


def _chunk(base: dict, delta: dict, finish_reason: str | None = None, **extra: Any) -> ServerSentEvent:
    body = {**base, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
    return ServerSentEvent(data=json.dumps(body))


async def _stream(context, base: dict, task_id: str, seed: int | None, scope: str, base_url: str,
                  include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    """Token deltas as they are generated, then the image link (if any), the finish chunk, usage, ``[DONE]``."""
    async with context.quotas.chats.holding(scope):
        async for event in _stream_events(context, base, task_id, seed, scope, base_url, include_usage):
            yield event


async def _stream_events(context, base: dict, task_id: str, seed: int | None, scope: str, base_url: str,
                         include_usage: bool) -> AsyncIterator[ServerSentEvent]:
    run_id = base["id"]
    yield _chunk(base, {"role": "assistant", "content": ""})
    after, record = None, None
    while record is None:
        record = await run_in_threadpool(context.tasks.get, task_id)
        record = record if record is not None and record.final else None
        # Read after the status: every token of a finished step is in this read.
        for event in await run_in_threadpool(context.tasks.events, run_id, after):
            after = event.id
            if event.type == "task.token" and event.data.get("task_id") == task_id:
                yield _chunk(base, {"content": event.data["text"]})
        if record is None:
            await asyncio.sleep(POLL_S)
    if record.status != "done":
        error = record.error or {}
        yield ServerSentEvent(data=json.dumps({"error": {
            "message": error.get("message", f"the model step ended {record.status}"), "type": "server_error",
            "code": error.get("code", record.status)}}))
        return
    result, artifacts = record.result, []
    if result.get("image_prompt"):
        links, artifacts = await _draw(context, result["image_prompt"], seed, run_id=run_id, scope=scope,
                                       base_url=base_url)
        yield _chunk(base, {"content": f"\n\n{links}"})
    yield _chunk(base, {}, result["finish_reason"], artifacts=artifacts)
    if include_usage:
        yield ServerSentEvent(data=json.dumps({**base, "object": "chat.completion.chunk", "choices": [],
                                               "usage": _usage(result)}))
    yield ServerSentEvent(data="[DONE]")
