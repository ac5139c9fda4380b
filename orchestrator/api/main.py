"""The app factory. Nothing is built at import: ``create_app(settings)`` builds the services in its lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from mgmflow.orchestrator.api.deps import ApiContext
from mgmflow.orchestrator.api.errors import install_error_handlers
from mgmflow.orchestrator.api.headers import SecurityHeaders
from mgmflow.orchestrator.api.images import ImageIntake
from mgmflow.orchestrator.api.limits import BodyReadTimeout, BodySizeLimit, rate_limiter
from mgmflow.orchestrator.api.metrics import ApiMetrics, BrokerQueueDepths, MetricsMiddleware
from mgmflow.orchestrator.api.openapi import install_openapi
from mgmflow.orchestrator.api.origin import OpenModeGuard
from mgmflow.orchestrator.api.quotas import Quotas
from mgmflow.orchestrator.api.retention import sweep_forever
from mgmflow.orchestrator.api.routes import (
    artifacts, assistants, batches, docs, health, openai, outputs, playground, runs, threads,
)
from mgmflow.orchestrator.api.server import stop_with_supervisor
from mgmflow.orchestrator.api.settings import ApiSettings
from mgmflow.orchestrator.api.webhooks import WebhookSender

logger = logging.getLogger(__name__)


def _unique_id(route: APIRoute) -> str:
    # Clean operation ids for generated clients: "runs-create_run".
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def build_context(settings: ApiSettings) -> ApiContext:
    """Build the run service, task client and artifact store the handlers share."""
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.orchestrator.workflow import load_workflows
    from mgmflow.workers.artifacts import open_store
    from mgmflow.workers.settings import Settings

    # The run service gets the workers' own settings: the in-process driver looks itself up by them.
    runs = RunService(Settings(**settings.model_dump(include=set(Settings.model_fields))))
    return ApiContext(
        settings=settings,
        runs=runs,
        tasks=runs.orchestrator.client,  # the same transport the runs use (in-process when embedded)
        store=open_store(settings),
        workflows=load_workflows(),
        limiter=rate_limiter(settings.broker_url, settings.rate_limit_per_second, settings.rate_limit_burst),
        address_limiter=rate_limiter(settings.broker_url, settings.unauthenticated_per_second,
                                     settings.unauthenticated_burst),
        metrics=ApiMetrics(queue_depths=BrokerQueueDepths(settings.broker_url), broker_url=settings.broker_url),
        images=ImageIntake(settings),
        quotas=Quotas(settings, runs),
    )


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    """The mgmflow HTTP API for ``settings`` (default: from ``MGMFLOW_*`` environment variables)."""
    settings = settings or ApiSettings()
    stop_with_supervisor()
    context = build_context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info("mgmflow API up (%s mode, %s)", "embedded" if settings.embedded else "distributed",
                    "open, single-user" if settings.open_access else f"{len(settings.api_keys)} API keys")
        # Webhooks pending in the runs store, from this process or an earlier one, are delivered from here on.
        sender = WebhookSender(context) if settings.webhook_hosts else None
        loop_task = asyncio.create_task(sender.run()) if sender else None
        sweeper = asyncio.create_task(sweep_forever(
            context.runs, context.store, interval_s=settings.gc_interval_s, run_retention_s=settings.run_retention_s,
            grace_s=settings.gc_grace_s)) if settings.gc_interval_s else None
        yield
        if sweeper:
            sweeper.cancel()
        if sender:
            await sender.stop(loop_task)

    app = FastAPI(
        title="mgmflow",
        version="0.1.0",
        summary="Agentic any-to-any workflows around Mini-Gemini: runs, threads, batches, artifacts, OpenAI chat.",
        lifespan=lifespan,
        generate_unique_id_function=_unique_id,
        docs_url=None,  # routes.docs serves it from local files
        redoc_url=None,
    )
    app.state.context = context
    install_error_handlers(app)
    install_openapi(app, settings)
    for router in (health.router, assistants.router, threads.router, runs.thread_router, runs.router,
                   outputs.router, batches.router, artifacts.router, openai.router, playground.router, docs.router):
        app.include_router(router)
    app.mount("/playground", StaticFiles(directory=playground.STATIC_DIR), name="playground")
    app.mount(docs.ASSETS_URL, docs.ASSETS, name="docs-assets")
    # Outermost last: the body limit applies before anything reads the body; metrics see every response.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyReadTimeout, timeout_s=settings.body_timeout_s)
    if settings.open_access:
        app.add_middleware(OpenModeGuard, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=context.metrics)
    app.add_middleware(SecurityHeaders)
    return app
