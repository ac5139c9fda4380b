"""Admitting a run: the workflow exists, its input is valid and within limits, the webhook is allowed, the key is
within its quotas (``api.quotas``); then one call to the run service (idempotent per ``Idempotency-Key``)."""

from __future__ import annotations

from functools import cache
from typing import Any

from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.allowlist import allowed, url_origin
from mgmflow.orchestrator.api.bounds import MAX_JSON_DEPTH, json_depth
from mgmflow.orchestrator.api.deps import ApiContext
from mgmflow.orchestrator.api.errors import ApiError, not_found
from mgmflow.orchestrator.api.schemas import RunCreate
from mgmflow.orchestrator.api.stream_modes import parse_modes
from mgmflow.orchestrator.records import RunNotFound
from mgmflow.orchestrator.references import artifact_values
from mgmflow.workers.artifacts import ArtifactNotFound


def check_limits(value: Any, settings, where: str = "input") -> None:
    """Prompt length on every string, and the page limit, anywhere in ``value``."""
    if isinstance(value, str):
        if len(value) > settings.max_prompt_chars:
            raise ApiError(413, f"{where} is {len(value):,} characters; the limit is {settings.max_prompt_chars:,}",
                           code="prompt_too_long")
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "pages" and isinstance(item, int) and item > settings.max_pages:
                raise ApiError(422, f"{where}.pages is {item}; the limit is {settings.max_pages}", code="too_many_pages")
            check_limits(item, settings, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            check_limits(item, settings, f"{where}[{index}]")


def check_webhook(url: str | None, settings) -> None:
    """At admission (and before each attempt): a well-formed http(s) URL on an allowed origin (scheme, host, port)."""
    if url is None:
        return
    try:
        scheme, host, port = url_origin(url)
    except ValueError as error:
        raise ApiError(400, f"webhook: {error}", code="invalid_webhook") from None
    if not allowed(url, settings.webhook_hosts):
        raise ApiError(400, f"webhook origin {scheme}://{host}:{port} is not allowed (MGMFLOW_WEBHOOK_HOSTS)",
                       code="webhook_not_allowed")


@cache
def input_schema(input_model: type) -> dict[str, Any]:
    return input_model.model_json_schema()


def check_artifacts(context: ApiContext, workflow: Any, run_input: dict[str, Any], scope: str,
                    where: str = "input") -> None:
    """Every artifact id of ``run_input`` names an artifact of ``scope`` (the same answer for an id that does not
    exist and one of another key)."""
    for field, artifact_id in artifact_values(run_input, input_schema(workflow.input_model)):
        try:
            context.store.info(artifact_id, scope=scope)
        except ArtifactNotFound:
            raise ApiError(400, f"{where}.{field}: no artifact {artifact_id!r} for this key (upload it first: "
                                "POST /artifacts)", code="artifact_not_found") from None


def validate_run(context: ApiContext, body: RunCreate, scope: str) -> dict[str, Any]:
    """The workflow's validated input (as JSON), or a 4xx naming what is wrong."""
    workflow = context.workflows.get(body.assistant_id)
    if workflow is None:
        known = ", ".join(sorted(context.workflows)) or "none"
        raise ApiError(404, f"unknown workflow {body.assistant_id!r}; known: {known}", code="unknown_workflow")
    if json_depth(body.input) > MAX_JSON_DEPTH:  # before the walk below, which recurses
        raise ApiError(422, f"input nests over {MAX_JSON_DEPTH} levels deep", code="invalid_request")
    check_limits(body.input or {}, context.settings)
    check_webhook(body.webhook, context.settings)
    run_input = workflow.validate_input(body.input or {}).model_dump(mode="json")
    check_artifacts(context, workflow, run_input, scope)
    return run_input


def check_quotas(context: ApiContext, body: RunCreate, run_input: dict[str, Any], scope: str, chats: int) -> None:
    """The key's priority, compute and unfinished-work limits (``api.quotas``). A fan-out (a batch) takes a slot for
    itself and one for each child it may run at once."""
    context.quotas.check_priority(scope, body.priority)
    context.quotas.check_compute(scope, run_input)
    items = run_input.get("items")
    children = min(int(run_input.get("concurrency") or 1), len(items)) if isinstance(items, list) else 0
    context.quotas.check_active(scope, adding=1 + children, chats=chats)


def create_run(context: ApiContext, body: RunCreate, *, scope: str, thread_id: str | None,
               idempotency_key: str | None, chats: int = 0) -> Any:
    """Validate and create (or, for a repeated idempotency key, find) a run. Call from the thread pool."""
    run_input = validate_run(context, body, scope)
    check_quotas(context, body, run_input, scope, chats)
    metadata = {**body.metadata, **({"webhook": body.webhook} if body.webhook else {})}
    modes = parse_modes(body.stream_mode)
    return context.runs.create_run(
        body.assistant_id, run_input, thread_id=thread_id, scope=scope, approve=body.approve,
        idempotency_key=idempotency_key, priority=body.priority, metadata=metadata, previews=body.previews,
        webhook=body.webhook, stream_mode=list(modes) if modes else None,
        stream_subgraphs=body.stream_subgraphs,
    )


def thread_for_run(context: ApiContext, thread_id: str, scope: str, if_not_exists: str) -> None:
    """The run's thread must be the caller's; ``if_not_exists="create"`` creates a missing one."""
    try:
        context.runs.get_thread(thread_id, scope=scope)
    except RunNotFound:
        if if_not_exists != "create":
            raise not_found(f"thread {thread_id!r}") from None
        context.runs.create_thread(scope=scope, thread_id=thread_id)


async def admit(context: ApiContext, body: RunCreate, *, scope: str, thread_id: str | None,
                idempotency_key: str | None) -> Any:
    """Everything above, off the event loop."""
    chats = await context.quotas.chats.count(scope)

    def work():
        if thread_id is not None:
            thread_for_run(context, thread_id, scope, body.if_not_exists)
        return create_run(context, body, scope=scope, thread_id=thread_id, idempotency_key=idempotency_key,
                          chats=chats)

    return await run_in_threadpool(work)
