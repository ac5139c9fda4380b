"""The Agent Server's stream modes, made from a run's event stream.

A run stores one ordered stream of events: the driver's ``node`` (a task of the graph started, ended with its
``update``, failed) and ``checkpoint`` (the state after a step), the workers' ``task.*`` (tokens among them) and the
workflows' own (``progress``, ``artifact``, …). A client that names ``stream_mode`` gets those events in the shapes
LangGraph's clients expect (``langgraph-sdk``, ``RemoteGraph``):

    values           the state after each step                         event: values     data: {...}
    updates          each node's writes                                event: updates    data: {node: {...}}
    messages-tuple   the VLM's tokens as message chunks                event: messages   data: [chunk, metadata]
    messages         the same as partial / complete messages           event: messages/metadata|partial|complete
    custom           what workflows and workers emit                   event: custom     data: {type, data}
    events           LangChain ``astream_events`` (v2) records         event: events     data: {event, name, data, ...}
    debug            checkpoints and tasks                             event: debug      data: {type, step, payload}
    tasks            task starts and results                           event: tasks      data: {id, name, ...}
    checkpoints      checkpoints                                       event: checkpoints data: {config, values, ...}

Events of a subgraph are sent as ``<mode>|<namespace>`` (namespace parts ``node:task_id`` joined by ``|``) when the
run asks ``stream_subgraphs``, and left out otherwise (but for messages: tokens come from wherever the model ran). Every event keeps the id of the stored event it was made
from, so ``Last-Event-ID`` resumes a stream in any mode.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from langchain_core.messages import AIMessageChunk

Part = tuple[str, str, tuple[str, ...], Any]  # (mode it belongs to, SSE event name, namespace, data)


def parse_modes(stream_mode: str | list[str] | None) -> tuple[str, ...] | None:
    """The requested modes, once each, in order (validated by ``schemas.StreamMode`` in the request); None:
    the run's own event stream, as mgmflow's clients read it."""
    if stream_mode is None:
        return None
    return tuple(dict.fromkeys((stream_mode,) if isinstance(stream_mode, str) else stream_mode))


class ModeStream:
    """Turns a run's stored events, in order, into the SSE events of the requested modes."""

    def __init__(self, run: Any, modes: tuple[str, ...], subgraphs: bool) -> None:
        self.run_id, self.thread_id = run.run_id, run.thread_id
        self.modes, self.subgraphs = modes, subgraphs
        self.values: dict[tuple[str, ...], Any] = {}  # the latest state of each namespace
        self.steps: dict[tuple[str, ...], int] = {}
        self.node: tuple[str, tuple[str, ...]] = ("", ())  # the latest node to start or park: it awaits the tokens
        self.replies: dict[str, str] = {}  # text so far of each VLM task that streams tokens
        self.sent_values = False  # whether a root ``values`` event went out

    def translate(self, event: Any) -> list[tuple[str, Any]]:
        """``[(SSE event name, data)]`` for one stored event."""
        handler = {"node": self._node, "checkpoint": self._checkpoint, "task.token": self._token,
                   "run": self._run}.get(event.type, self._custom)
        parts = []
        for mode, name, ns, data in handler(event.type, event.data, _timestamp(event.id)):
            if mode not in self.modes:
                continue
            if ns and not self.subgraphs:
                if mode not in ("messages", "messages-tuple"):
                    continue
                ns = ()  # the model's tokens, wherever it was called, as LangGraph streams messages
            self.sent_values |= mode == "values" and not ns
            parts.append(("|".join((name, *ns)), data))
        return parts

    # One handler per stored event type; each yields every mode's part, ``translate`` keeps the requested.
    def _node(self, _type: str, data: dict, timestamp: str) -> Iterator[Part]:
        name, ns, phase = data["name"], tuple(data.get("ns", ())), data["phase"]
        task = {"id": data.get("task_id"), "name": name}
        step = self.steps.get(ns, -1) + 1
        record = {"name": name, "run_id": data.get("task_id"), "tags": [f"graph:step:{step}"],
                  "metadata": self._metadata(name, ns, step), "parent_ids": [self.run_id]}
        if phase in ("start", "parked"):
            self.node = (name, ns)
        if phase == "start":
            payload = {**task, "input": self.values.get(ns), "triggers": [f"branch:to:{name}"]}
            yield "tasks", "tasks", ns, payload
            yield "debug", "debug", ns, _debug("task", step, timestamp, payload)
            yield "events", "events", ns, {"event": "on_chain_start", **record,
                                           "data": {"input": self.values.get(ns)}}
        elif phase in ("end", "error"):
            payload = {**task, "error": data.get("error"), "result": data.get("update"), "interrupts": []}
            yield "tasks", "tasks", ns, payload
            yield "debug", "debug", ns, _debug("task_result", step, timestamp, payload)
            if phase == "end":
                yield "updates", "updates", ns, {name: data.get("update")}
                yield "events", "events", ns, {"event": "on_chain_end", **record,
                                               "data": {"output": data.get("update")}}

    def _checkpoint(self, _type: str, data: dict, timestamp: str) -> Iterator[Part]:
        ns, step = tuple(data.get("ns", ())), data["step"]
        self.values[ns], self.steps[ns] = data["values"], step
        namespace = "|".join(ns)

        def config(checkpoint_id: str | None) -> dict | None:
            return checkpoint_id and {"configurable": {"thread_id": self.thread_id, "checkpoint_ns": namespace,
                                                       "checkpoint_id": checkpoint_id}}

        payload = {"config": config(data["checkpoint_id"]), "parent_config": config(data["parent_checkpoint_id"]),
                   "values": data["values"], "metadata": {"source": "loop", "step": step, "run_id": self.run_id},
                   "next": data["next"], "tasks": [{"id": None, "name": name, "interrupts": [], "state": None}
                                                   for name in data["next"]]}
        yield "values", "values", ns, data["values"]
        yield "checkpoints", "checkpoints", ns, payload
        yield "debug", "debug", ns, _debug("checkpoint", step, timestamp, payload)

    def _token(self, _type: str, data: dict, _timestamp: str) -> Iterator[Part]:
        task_id, (node, ns) = data["task_id"], self.node
        message_id = f"run-{task_id}"
        metadata = {**self._metadata(node, ns, self.steps.get(ns, -1) + 1), "task_id": task_id}
        chunk = AIMessageChunk(content=data["text"], id=message_id).model_dump()
        yield "messages-tuple", "messages", ns, [chunk, metadata]
        yield "events", "events", ns, {"event": "on_chat_model_stream", "name": "mini-gemini", "run_id": task_id,
                                       "tags": [], "metadata": metadata, "parent_ids": [self.run_id],
                                       "data": {"chunk": chunk}}
        if task_id not in self.replies:
            self.replies[task_id] = ""
            yield "messages", "messages/metadata", ns, {message_id: {"metadata": metadata}}
        self.replies[task_id] += data["text"]
        yield "messages", "messages/partial", ns, [_message(message_id, self.replies[task_id])]

    def _run(self, _type: str, data: dict, _timestamp: str) -> Iterator[Part]:
        if data.get("status") == "interrupted":  # a human approval point, as LangGraph's interrupt() shows it
            interrupts = [{"value": value, "id": f"{self.run_id}:{index}"}
                          for index, value in enumerate(data.get("interrupt") or [])]
            yield "updates", "updates", (), {"__interrupt__": interrupts}
            yield "values", "values", (), {**self.values.get((), {}), "__interrupt__": interrupts}

    def _custom(self, type_: str, data: dict, _timestamp: str) -> Iterator[Part]:
        if type_ == "task.finished" and data.get("task_id") in self.replies:
            message_id = f"run-{data['task_id']}"
            yield "messages", "messages/complete", self.node[1], [_message(message_id,
                                                                           self.replies.pop(data["task_id"]))]
        yield "custom", "custom", (), {"type": type_, "data": data}
        yield "events", "events", (), {"event": "on_custom_event", "name": type_, "run_id": self.run_id,
                                       "tags": [], "metadata": {"run_id": self.run_id, "thread_id": self.thread_id},
                                       "parent_ids": [], "data": data}

    def _metadata(self, node: str, ns: tuple[str, ...], step: int) -> dict[str, Any]:
        return {"run_id": self.run_id, "thread_id": self.thread_id, "langgraph_node": node,
                "langgraph_step": step, "langgraph_checkpoint_ns": "|".join(ns)}


def _debug(kind: str, step: int, timestamp: str, payload: dict) -> dict[str, Any]:
    return {"type": kind, "timestamp": timestamp, "step": step, "payload": payload}


def _message(message_id: str, text: str) -> dict[str, Any]:
    return {"type": "ai", "id": message_id, "content": text, "tool_calls": [], "invalid_tool_calls": [],
            "additional_kwargs": {}, "response_metadata": {}, "name": None}


def _timestamp(event_id: str) -> str:
    """The time in an event id ("<ms>-<seq>")."""
    return datetime.fromtimestamp(int(event_id.split("-", 1)[0]) / 1000, tz=timezone.utc).isoformat()
