"""Request and response bodies. Runs and threads follow the LangGraph Agent Server shapes (so ``langgraph-sdk``
works); our additions (queue position, progress, priority, errors) are extra fields next to theirs."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from mgmflow.orchestrator.api.bounds import Metadata
from mgmflow.orchestrator.runs import MAX_PREVIEWS

RunStatus = Literal["pending", "running", "interrupted", "success", "error", "timeout", "cancelled"]
ThreadStatus = Literal["idle", "busy", "interrupted", "error"]
# The Agent Server's stream modes (orchestrator.api.stream_modes makes them); none given: the run's own events.
StreamMode = Literal["values", "updates", "messages-tuple", "messages", "custom", "events", "debug", "tasks",
                     "checkpoints"]
ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
# Request bodies are strict (``ConfigDict(strict=True)``): ``"offset": false`` or ``"priority": "3"`` are refused
# (422) as their schema says, not coerced. Integers are JSON Schema's: 3.0 is one.
Integer = Annotated[int, BeforeValidator(lambda value: int(value) if isinstance(value, float) and value.is_integer()
                                         else value)]
MAX_OFFSET = 1_000_000_000  # pages past this are empty anyway; beyond 2**63 a database cannot even bind it


class AssistantSearch(BaseModel):
    model_config = ConfigDict(strict=True)

    graph_id: str | None = None
    metadata: dict[str, Any] | None = None
    limit: Integer = Field(10, ge=1, le=1000)
    offset: Integer = Field(0, ge=0, le=MAX_OFFSET)


class AssistantPublic(BaseModel):
    """A workflow seen as an Agent Server assistant: its id and graph id are the workflow's name."""

    assistant_id: str
    graph_id: str
    name: str
    description: str | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    context: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict)
    version: int = 1
    created_at: datetime  # when this server loaded the workflow
    updated_at: datetime


class AssistantSchemas(BaseModel):
    graph_id: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any] | None = None
    state_schema: dict[str, Any] | None = None
    config_schema: dict[str, Any] | None = None
    context_schema: dict[str, Any] | None = None


# Threads ------------------------------------------------------------------------------------------------------


class ThreadCreate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    thread_id: str | None = Field(None, pattern=ID_PATTERN)
    metadata: Metadata = Field(default_factory=dict)
    if_exists: Literal["raise", "do_nothing"] = "raise"


class ThreadUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    metadata: Metadata = Field(default_factory=dict)


class ThreadSearch(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    metadata: Metadata | None = None
    status: ThreadStatus | None = None
    limit: Integer = Field(10, ge=1, le=1000)
    offset: Integer = Field(0, ge=0, le=MAX_OFFSET)


class ThreadPublic(BaseModel):
    thread_id: str
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, Any]
    status: ThreadStatus
    values: dict[str, Any] | None = None
    interrupts: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)


class Checkpoint(BaseModel):
    thread_id: str | None = None
    checkpoint_ns: str = ""
    checkpoint_id: str | None = None


class ThreadStatePublic(BaseModel):
    values: dict[str, Any]
    next: list[str]
    checkpoint: Checkpoint
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: str | None = None
    parent_checkpoint: Checkpoint | None = None
    tasks: list[dict[str, Any]] = Field(default_factory=list)
    interrupts: list[dict[str, Any]] = Field(default_factory=list)


class ThreadStateRequest(BaseModel):
    """``POST /threads/{id}/state/checkpoint``: the state at a checkpoint (the latest without a ``checkpoint_id``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    checkpoint: Checkpoint
    subgraphs: bool = False


class ThreadHistoryRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    limit: Integer = Field(10, ge=1, le=1000)
    before: dict[str, Any] | str | None = None


# Runs ---------------------------------------------------------------------------------------------------------


class RunCommand(BaseModel):
    """Resume an interrupted run (a human approval): ``{"resume": {"approved": true, "prompt": "..."}}``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    resume: Any = None


class RunCreate(BaseModel):
    """The Agent Server run payload. ``assistant_id`` is a workflow name; ``input`` has the workflow's fields
    (the flags of ``mgmflow run <workflow>``). Fields of the SDK we do not use (config, durability, ...) are
    accepted and ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    assistant_id: str = Field(min_length=1, max_length=128)
    input: dict[str, Any] | None = None
    command: RunCommand | None = None
    metadata: Metadata = Field(default_factory=dict)
    stream_mode: StreamMode | list[StreamMode] | None = None
    stream_subgraphs: bool = False
    stream_resumable: bool = False
    webhook: str | None = Field(None, max_length=2048)
    multitask_strategy: Literal["reject", "interrupt", "rollback", "enqueue"] = "enqueue"
    if_not_exists: Literal["create", "reject"] = "reject"
    on_disconnect: Literal["cancel", "continue"] = "continue"
    # Our additions: 0 is the most urgent; interactive runs default ahead of batch items.
    priority: Integer = Field(3, ge=0, le=9)
    approve: bool = False
    # Diffusion steps of the run store a preview every N denoising steps; `task.step` events carry its id.
    previews: Integer = Field(0, ge=0, le=MAX_PREVIEWS)


class RunPublic(BaseModel):
    run_id: str
    thread_id: str | None
    assistant_id: str
    created_at: datetime
    updated_at: datetime
    status: RunStatus
    metadata: dict[str, Any] = Field(default_factory=dict)
    multitask_strategy: str = "enqueue"
    # Progress over plain HTTP: runs admitted before this one and not yet started, and the last progress event.
    position: int | None = None
    progress: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    # A successful run of a workflow that writes files: where to download them as one zip.
    output_url: str | None = None


class RunsCancel(BaseModel):
    # Which runs: at least one of the three, not null (the schema says so, for generated clients and fuzzers).
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"anyOf": [
        {"required": ["run_ids"], "properties": {"run_ids": {"type": "array", "minItems": 1}}},
        {"required": ["thread_id"], "properties": {"thread_id": {"type": "string"}}},
        {"required": ["status"], "properties": {"status": {"type": "string"}}},
    ]})

    thread_id: str | None = None
    run_ids: list[str] | None = Field(None, max_length=10_000)
    status: Literal["pending", "running", "all"] | None = None


# Artifacts ----------------------------------------------------------------------------------------------------


class ArtifactPublic(BaseModel):
    id: str
    sha256: str
    size: int
    media_type: str
    metadata: dict[str, Any]
    created_at: datetime | float | str


# Batches ------------------------------------------------------------------------------------------------------


class BatchCreate(BaseModel):
    """Many inputs of one workflow, run through the ``batch`` workflow with at most ``concurrency`` at once."""

    model_config = ConfigDict(extra="ignore", strict=True)

    assistant_id: str = Field(min_length=1, max_length=128)
    items: list[dict[str, Any]] = Field(min_length=1)
    concurrency: Integer = Field(4, ge=1, le=256)
    priority: Integer = Field(7, ge=0, le=9)
    metadata: Metadata = Field(default_factory=dict)


class BatchItemPublic(BaseModel):
    index: int
    run_id: str | None = None
    # waiting (not started), a run status, or "invalid" (the workflow refused the input)
    status: str
    error: dict[str, Any] | None = None


class BatchPublic(BaseModel):
    batch_id: str
    workflow: str
    total: int
    done: int
    counts: dict[str, int]
    run: RunPublic
    items: list[BatchItemPublic] | None = None
