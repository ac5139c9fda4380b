"""Admitting a run: the workflow exists, its input is valid and within limits, the webhook is allowed, the key is
within its quota; then one call to the run service (idempotent per ``Idempotency-Key``)."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from orchestrator.api.allowlist import allowed, url_origin
from orchestrator.api.deps import ApiContext
from orchestrator.api.errors import ApiError, not_found
from orchestrator.api.schemas import RunCreate
from orchestrator.records import RunNotFound


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


def validate_run(context: ApiContext, body: RunCreate) -> dict[str, Any]:
    """The workflow's validated input (as JSON), or a 4xx naming what is wrong."""
    workflow = context.workflows.get(body.assistant_id)
    if workflow is None:
        known = ", ".join(sorted(context.workflows)) or "none"
        raise ApiError(404, f"unknown workflow {body.assistant_id!r}; known: {known}", code="unknown_workflow")
    check_limits(body.input or {}, context.settings)
    check_webhook(body.webhook, context.settings)
    return workflow.validate_input(body.input or {}).model_dump(mode="json")


def check_quota(context: ApiContext, scope: str) -> None:
    limit = context.settings.max_active_runs_per_key
    if limit and context.runs.pending_at_least(scope, limit):
        raise ApiError(429, f"this key already has {limit:,} runs waiting", code="quota_exceeded",
                       headers={"Retry-After": "10"})


def create_run(context: ApiContext, body: RunCreate, *, scope: str, thread_id: str | None,
               idempotency_key: str | None) -> Any:
    """Validate and create (or, for a repeated idempotency key, find) a run. Call from the thread pool."""
    run_input = validate_run(context, body)
    check_quota(context, scope)
    metadata = {**body.metadata, **({"webhook": body.webhook} if body.webhook else {})}
    return context.runs.create_run(
        body.assistant_id, run_input, thread_id=thread_id, scope=scope, approve=body.approve,
        idempotency_key=idempotency_key, priority=body.priority, metadata=metadata, previews=body.previews,
        webhook=body.webhook,
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
    def work():
        if thread_id is not None:
            thread_for_run(context, thread_id, scope, body.if_not_exists)
        return create_run(context, body, scope=scope, thread_id=thread_id, idempotency_key=idempotency_key)

    return await run_in_threadpool(work)
