"""Dependencies as ``Annotated`` aliases: the app's context, settings, services, and the caller's scope."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from mgmflow.orchestrator.api.errors import ApiError
from mgmflow.orchestrator.api.images import ImageIntake
from mgmflow.orchestrator.api.limits import RateLimiter, RedisRateLimiter
from mgmflow.orchestrator.api.metrics import ApiMetrics
from mgmflow.orchestrator.api.quotas import Quotas
from mgmflow.orchestrator.api.schemas import ID_PATTERN
from mgmflow.orchestrator.api.settings import ApiSettings
from mgmflow.orchestrator.records import scoped_thread_id

if TYPE_CHECKING:
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.orchestrator.workflow import Workflow
    from mgmflow.workers.client import TaskClient


@dataclass
class ApiContext:
    """Everything a request handler may use; built once per app in its lifespan (no import-time singletons)."""

    settings: ApiSettings
    runs: RunService
    tasks: TaskClient
    store: Any  # workers.artifacts.ArtifactStore
    workflows: dict[str, Workflow]
    limiter: RateLimiter | RedisRateLimiter
    address_limiter: RateLimiter | RedisRateLimiter  # requests without a valid key, per client address
    metrics: ApiMetrics
    images: ImageIntake  # budget checks and the decoding pool of uploaded images (api.images)
    quotas: Quotas  # per-key limits on priority, compute and unfinished work (api.quotas)
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
bearer_scheme = HTTPBearer(auto_error=False, scheme_name="bearer", description="A key of MGMFLOW_API_KEYS.")
header_scheme = APIKeyHeader(name="x-api-key", auto_error=False, scheme_name="apiKey",
                             description="The same key in x-api-key, as langgraph-sdk sends it.")


async def presented_key(bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
                        api_key: Annotated[str | None, Depends(header_scheme)]) -> str | None:
    """The key a request carries: ``Authorization: Bearer <key>``, or ``x-api-key`` (as ``langgraph-sdk`` sends)."""
    return bearer.credentials.strip() if bearer is not None else api_key


PresentedKey = Annotated[str | None, Depends(presented_key)]


async def unauthorized(request: Request, context: ApiContext) -> ApiError:
    """The 401 for a request without a valid key, once it has been counted against its client address's rate
    limit (a 429 past it): failed keys are no free lever on the server."""
    await context.address_limiter.check("address:" + (request.client.host if request.client else "unknown"))
    return ApiError(401, "missing or invalid API key", code="unauthorized", headers={"WWW-Authenticate": "Bearer"})


async def current_scope(request: Request, context: Context, key: PresentedKey) -> str:
    """The caller's scope from its key; every request that passes is also counted against the scope's rate
    limit, every one that does not against its address's."""
    scope = context.settings.scope_of(key)
    if scope is None:
        raise await unauthorized(request, context)
    await context.limiter.check(scope)
    return scope


async def scoped_thread(thread_id: Annotated[str, Path(pattern=ID_PATTERN)],
                        scope: Annotated[str, Depends(current_scope)]) -> str:
    """The stored id of the caller's thread ``thread_id`` (a path parameter): thread ids are per key."""
    return scoped_thread_id(scope, thread_id)


SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
# Every id in a path (thread, run, artifact, batch, assistant): checked before the handler runs, so that an id no
# record can have (Unicode, CR/LF, NUL, too long) creates nothing and never reaches a header or a query.
PathId = Annotated[str, Path(pattern=ID_PATTERN)]
Store = Annotated[Any, Depends(get_store)]
CurrentScope = Annotated[str, Depends(current_scope)]
ThreadId = Annotated[str, Depends(scoped_thread)]
