"""Mini-Gemini as a LangChain chat model: multimodal in, text and images out, streaming, structured output.

    model = MGMChatModel(client=TaskClient(settings), generate_images=True)
    model.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                        {"type": "image", "base64": b64, "mime_type": "image/png"}])])

Image content blocks may carry base64 data, a data URL (``image_url`` blocks too) or an artifact id
(``file_id``); data is validated by :func:`mgmflow.models.images.load_image` and stored as an artifact, since task messages
carry references only. With ``generate_images``, a reply whose ``<h>…</h>`` prompt MGM wrote is drawn by the
diffusion worker and comes back as an image content block (``file_id`` = artifact id, plus base64 PNG).
Streaming follows the worker's token events for the request's task. Tool calling (``bind_tools``, so the model
works in LangChain/LangGraph agents) is constrained decoding too: the answer is JSON that either calls one of the
bound tools with arguments under its schema, or (unless a tool is required) answers in text.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import load_image
from mgmflow.tools.tasks import ToolTaskError, check_image

ROLES = {"system": "system", "human": "user", "ai": "assistant", "tool": "user"}
INLINE_LIMIT = 3000  # bytes of a payload; its biggest parts travel as artifacts until it fits (task messages ≤ 4 KB)
ANSWER_CHARS = 2000  # a text answer when tools are bound


class MGMChatModel(BaseChatModel):
    """Mini-Gemini behind the workers, as a LangChain ``BaseChatModel``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Any = Field(exclude=True)  # workers.client.TaskClient
    scope: str = "default"
    run_id: str | None = None  # the run whose event stream carries the tokens; a fresh one per call when unset
    model: str | None = None  # a VLM preset or path; the worker's default when unset
    max_new_tokens: int = Field(256, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0, le=5)
    seed: int | None = None
    generate_images: bool = False  # MGM's <GEN> path: draw the <h>…</h> prompt it writes
    image_size: int | None = Field(None, ge=64, le=2048, multiple_of=8)
    image_steps: int | None = Field(None, ge=1, le=150)
    inline_images: bool = True  # put generated PNGs into the reply as base64, beside their artifact ids
    timeout: float = 600.0

    @property
    def _llm_type(self) -> str:
        return "mgmflow-mini-gemini"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model": self.model, "max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "generate_images": self.generate_images}

    # 1. Messages → a vlm.chat payload with artifact references.
    def to_payload(self, messages: list[BaseMessage], json_schema: dict | None = None,
                   tools: list[dict[str, Any]] | None = None, tool_choice: Any = None) -> dict[str, Any]:
        converted = [self._message(message) for message in messages]
        if tools and tool_choice != "none":
            converted.insert(0, {"role": "system", "text": tools_prompt(tools), "images": []})
            json_schema = tools_schema(tools, tool_choice)
        payload: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                   "seed": self.seed, "generate_image": self.generate_images and not json_schema}
        if self.model:
            payload["model"] = self.model
        if json_schema is not None:
            payload["json_schema"] = json_schema
        return self._by_reference({**payload, "messages": converted})

    def _by_reference(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Store the biggest parts of the payload (the history, the JSON schema: an agent's tool schemas) as
        artifacts, biggest first, until the task message fits; the worker reads them back from the store."""
        for name in sorted(("messages", "json_schema"), key=lambda name: -len(json.dumps(payload.get(name)))):
            if len(json.dumps(payload)) <= INLINE_LIMIT or name not in payload:
                continue
            stored = self.client.store.put(json.dumps(payload.pop(name)).encode(), scope=self.scope,
                                           media_type="application/json", metadata={"kind": name})
            payload[f"{name}_artifact"] = stored.id
        return payload

    def _message(self, message: BaseMessage) -> dict[str, Any]:
        role = ROLES.get(message.type)
        if role is None:
            raise InvalidInputError(f"unsupported message type {message.type!r}")
        blocks = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else message.content
        texts, images = [], []
        if message.type == "tool":
            texts.append(tool_result_header(getattr(message, "name", None)))
        for block in blocks:
            if isinstance(block, str):
                texts.append(block)
            elif block.get("type") == "text":
                texts.append(block["text"])
            elif block.get("type") in ("image", "image_url"):
                images.append(self._image(block))
            else:
                raise InvalidInputError(f"unsupported content block type {block.get('type')!r}")
        for call in getattr(message, "tool_calls", None) or []:  # an agent's earlier calls, as the model wrote them
            texts.append(tool_call_text(call["name"], call["args"]))
        return {"role": role, "text": "\n".join(texts), "images": images}

    def _image(self, block: dict[str, Any]) -> str:
        """An image block → an artifact id (stored after validation when it carries data)."""
        if block.get("file_id"):
            return check_image(self.client.store, self.scope, block["file_id"], argument="file_id").id
        if block.get("base64"):
            data = _b64(block["base64"])
        else:
            url = block.get("url") or (block.get("image_url") or {}).get("url") or ""
            if not url.startswith("data:") or "," not in url:
                raise InvalidInputError("image blocks take base64 data, a data: URL or an artifact id (file_id); "
                                        "remote URLs are not fetched")
            data = _b64(url.split(",", 1)[1])
        load_image(data)  # refuses corrupt, truncated and oversized images with a clear error
        return self.client.store.put(data, scope=self.scope, media_type=block.get("mime_type") or "image/png",
                                     metadata={"source": "chat_model"}).id

    # 2. One request: submit, wait, draw the image MGM asked for.
    def _submit(self, payload: dict[str, Any], run_id: str) -> str:
        task_id = f"{run_id}:chat:{uuid.uuid4().hex}"
        self.client.submit("vlm.chat", payload, task_id=task_id, run_id=run_id, scope=self.scope)
        return task_id

    def _finish(self, task_id: str, run_id: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        """The reply's text, its image blocks, and the result's metadata."""
        record = self.client.wait(task_id, self.timeout)
        if record.status != "done":
            raise ToolTaskError("vlm.chat", record.status, record.error)
        result = record.result
        images = []
        if self.generate_images and result.get("image_prompt"):
            images = self._draw(result["image_prompt"], run_id)
        metadata = {name: result.get(name) for name in
                    ("finish_reason", "prompt_tokens", "completion_tokens", "model", "image_prompt")}
        return result["text"], images, metadata

    def _draw(self, prompt: str, run_id: str) -> list[dict[str, Any]]:
        payload: dict[str, Any] = {"prompts": [prompt]}
        if self.seed is not None:
            payload["seeds"] = [self.seed]
        if self.image_size:
            payload["width"] = payload["height"] = self.image_size
        if self.image_steps:
            payload["steps"] = self.image_steps
        task_id = f"{run_id}:draw:{uuid.uuid4().hex}"
        self.client.submit("diffusion.text2img", payload, task_id=task_id, run_id=run_id, scope=self.scope)
        record = self.client.wait(task_id, self.timeout)
        if record.status != "done":
            raise ToolTaskError("diffusion.text2img", record.status, record.error)
        blocks = []
        for image in record.result["images"]:
            block: dict[str, Any] = {"type": "image", "file_id": image["artifact"], "mime_type": "image/png"}
            if self.inline_images:
                block["base64"] = base64.b64encode(self.client.store.get(image["artifact"], scope=self.scope)).decode()
            blocks.append(block)
        return blocks

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        run_id = self.run_id or f"chat-{uuid.uuid4().hex}"
        payload = self.to_payload(messages, kwargs.get("json_schema"), kwargs.get("tools"), kwargs.get("tool_choice"))
        text, images, metadata = self._finish(self._submit(payload, run_id), run_id)
        if calls_tools(kwargs):
            message = tool_message(text, metadata)
        else:
            content: str | list = [{"type": "text", "text": text}, *images] if images else text
            message = AIMessage(content=content, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        if calls_tools(kwargs):  # a tool call is only usable whole: one chunk
            message = self._generate(messages, stop, run_manager, **kwargs).generations[0].message
            yield ChatGenerationChunk(message=AIMessageChunk(
                content=message.content, response_metadata=message.response_metadata,
                tool_call_chunks=[{"name": call["name"], "args": json.dumps(call["args"]), "id": call["id"],
                                   "index": index} for index, call in enumerate(message.tool_calls)]))
            return
        run_id = self.run_id or f"chat-{uuid.uuid4().hex}"
        after = self._last_event(run_id)
        task_id = self._submit(self.to_payload(messages, kwargs.get("json_schema")), run_id)
        deadline = time.monotonic() + self.timeout
        while True:
            record = self.client.get(task_id)
            done = record is not None and record.final
            for event in self.client.events(run_id, after=after, block_ms=0 if done else 200):
                after = event.id
                if event.type == "task.token" and event.data.get("task_id") == task_id:
                    chunk = ChatGenerationChunk(message=AIMessageChunk(content=event.data["text"]))
                    if run_manager:
                        run_manager.on_llm_new_token(event.data["text"], chunk=chunk)
                    yield chunk
            if done:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"vlm.chat {task_id} did not finish within {self.timeout:g} s")
        _text, images, metadata = self._finish(task_id, run_id)
        yield ChatGenerationChunk(message=AIMessageChunk(content=images or "", response_metadata=metadata))

    def _last_event(self, run_id: str) -> str | None:
        events = self.client.events(run_id)
        return events[-1].id if events else None

    # 3. Tools and structured output: the worker decodes under a JSON schema; the result is parsed and validated.
    def bind_tools(self, tools: list, *, tool_choice: Any = None, **kwargs: Any) -> Runnable:
        """Bind LangChain tools (or functions, pydantic models, OpenAI tool dicts). ``tool_choice``: None/"auto"
        (call a tool or answer), "any"/"required" (call one), a tool's name (call that one), or "none" (answer in
        text without calling one)."""
        specs = [convert_to_openai_tool(tool)["function"] for tool in tools]
        if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}
            tool_choice = tool_choice.get("function", {}).get("name")
        names = {spec["name"] for spec in specs}
        if tool_choice not in (None, "auto", "any", "required", "none", *names):
            raise ValueError(f"tool_choice {tool_choice!r} is none of auto, any, required, none, "
                             f"{', '.join(sorted(names))}")
        return self.bind(tools=specs, tool_choice=tool_choice, **kwargs)

    def with_structured_output(self, schema: dict | type, *, include_raw: bool = False,
                               **kwargs: Any) -> Runnable:
        """Answers constrained to ``schema`` (a pydantic class or a JSON schema dict); ``method`` is always
        ``json_schema`` (constrained decoding in the worker)."""
        if kwargs.get("method", "json_schema") != "json_schema":
            raise ValueError("MGMChatModel supports method='json_schema' only")
        pydantic = isinstance(schema, type) and issubclass(schema, BaseModel)
        json_schema = schema.model_json_schema() if pydantic else schema
        parser = PydanticOutputParser(pydantic_object=schema) if pydantic else JsonOutputParser()
        bound = self.bind(json_schema=json_schema)
        if not include_raw:
            return bound | parser

        def parse(raw: AIMessage) -> dict[str, Any]:
            try:
                return {"raw": raw, "parsed": parser.invoke(raw), "parsing_error": None}
            except Exception as error:  # returned, not raised: that is what include_raw asks for
                return {"raw": raw, "parsed": None, "parsing_error": error}

        return bound | RunnableLambda(parse)


def calls_tools(kwargs: dict[str, Any]) -> bool:
    """Whether a request's reply is decoded as a tool call or an answer (tools bound, and not ``"none"``)."""
    return bool(kwargs.get("tools")) and kwargs.get("tool_choice") != "none"


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    listed = "\n".join(f"- {tool['name']}: {tool.get('description', '')}" for tool in tools)
    return (f"You can call these tools:\n{listed}\nTo call one, answer {{\"tool\": name, \"arguments\": {{...}}}}; "
            "otherwise answer {\"answer\": text}.")


def tools_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any]:
    """The JSON schema of a reply: a call of an allowed tool, or (unless a call is required) a text answer."""
    free = tool_choice in (None, "auto", "any", "required")
    allowed = [tool for tool in tools if free or tool["name"] == tool_choice]
    options = [{"type": "object", "properties": {"tool": {"const": tool["name"]}, "arguments": closed(tool)},
                "required": ["tool", "arguments"], "additionalProperties": False} for tool in allowed]
    if tool_choice in (None, "auto"):
        options.append({"type": "object", "properties": {"answer": {"type": "string", "maxLength": ANSWER_CHARS}},
                        "required": ["answer"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def closed(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's argument schema without room for arguments it does not declare (a weak model would add some)."""
    parameters = tool.get("parameters") or {"type": "object", "properties": {}}
    return {**parameters, "additionalProperties": parameters.get("additionalProperties", False)}


def tool_call_text(name: str, arguments: Any) -> str:
    """An earlier tool call in a conversation, written as the model writes calls (see ``tools_prompt``)."""
    return json.dumps({"tool": name, "arguments": arguments})


def tool_result_header(name: str | None) -> str:
    """The line before a tool's result in a conversation (results reach the model as user turns)."""
    return f"Result of the tool {name or 'call'}:"


def parse_tool_reply(text: str, finish_reason: str | None) -> tuple[str | None, Any]:
    """A reply decoded under ``tools_schema``: ``(tool name, arguments)`` for a call, ``(None, answer)`` else."""
    try:
        reply = json.loads(text)
    except json.JSONDecodeError as error:  # only when the answer hit max_new_tokens before closing the JSON
        raise InvalidInputError(f"the model's reply was cut off ({finish_reason}); raise max_new_tokens: "
                                f"{error}") from None
    return (reply["tool"], reply["arguments"]) if "tool" in reply else (None, reply["answer"])


def tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_message(text: str, metadata: dict[str, Any]) -> AIMessage:
    """The reply to a tools-bound request as an AIMessage: its tool call, or its answer."""
    name, value = parse_tool_reply(text, metadata.get("finish_reason"))
    if name is not None:
        call = {"name": name, "args": value, "id": tool_call_id(), "type": "tool_call"}
        return AIMessage(content="", tool_calls=[call], response_metadata=metadata)
    return AIMessage(content=value, response_metadata=metadata)


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidInputError(f"image data is not valid base64: {error}") from None
