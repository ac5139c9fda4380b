"""Dependencies as ``Annotated`` aliases: the app's context, settings, services, and the caller's scope."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.api.errors import ApiError
from orchestrator.api.limits import RateLimiter, RedisRateLimiter
from orchestrator.api.metrics import ApiMetrics
from orchestrator.api.schemas import ID_PATTERN
from orchestrator.api.settings import ApiSettings

if TYPE_CHECKING:
    from orchestrator.runs import RunService
    from orchestrator.workflow import Workflow
    from workers.client import TaskClient


@dataclass
class ApiContext:
    """Everything a request handler may use; built once per app in its lifespan (no import-time singletons)."""

    settings: ApiSettings
    runs: RunService
    tasks: TaskClient
    store: Any  # workers.artifacts.ArtifactStore
    workflows: dict[str, Workflow]
    limiter: RateLimiter | RedisRateLimiter
    metrics: ApiMetrics
    background: set[asyncio.Task] = field(default_factory=set)  # webhook attempts in flight (api.webhooks)
    started_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))  # when workflows were loaded


# The dependencies are ``async def``: they do no blocking work (the shared rate limit is an asyncio Redis call), and
# FastAPI runs a plain ``def`` dependency in the thread pool, a hand-off to a thread and back on every request.
async def get_context(request: Request) -> ApiContext:
    return request.app.state.context


Context = Annotated[ApiContext, Depends(get_context)]


async def get_settings(context: Context) -> ApiSettings:
    return context.settings


async def get_store(context: Context) -> Any:
    return context.store


# The two ways to send a key, declared as the OpenAPI document's security schemes (either one will do).
bearer_key = HTTPBearer(auto_error=False, scheme_name="bearer", description="A key of MGMFLOW_API_KEYS.")
header_key = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="apiKey",
                          description="The same key in x-api-key, as langgraph-sdk sends it.")


async def current_scope(context: Context,
                        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_key)],
                        api_key: Annotated[str | None, Depends(header_key)]) -> str:
    """The caller's scope from ``Authorization: Bearer <key>`` (or ``x-api-key``, as ``langgraph-sdk`` sends);
    every request that passes is also counted against the scope's rate limit."""
    key = bearer.credentials.strip() if bearer is not None else api_key
    scope = context.settings.scope_of(key)
    if scope is None:
        raise ApiError(401, "missing or invalid API key", code="unauthorized", headers={"WWW-Authenticate": "Bearer"})
    await context.limiter.check(scope)
    return scope


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
# Every id in a path (thread, run, artifact, batch, assistant): checked before the handler runs, so that an id no
# record can have (Unicode, CR/LF, NUL, too long) creates nothing and never reaches a header or a query.
PathId = Annotated[str, Path(pattern=ID_PATTERN)]
Store = Annotated[Any, Depends(get_store)]
CurrentScope = Annotated[str, Depends(current_scope)]
