"""Liveness, readiness and Prometheus metrics. None of them touches a model: they answer while models run."""

from __future__ import annotations

import hmac
import logging
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import Context, bearer_scheme, header_scheme, presented_key, unauthorized
from mgmflow.orchestrator.api.errors import redact
from mgmflow.workers.artifacts import ArtifactNotFound

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def read_health() -> dict[str, str]:
    """The process is up and its event loop is free (inference never runs on it)."""
    return {"status": "ok"}


class Readiness(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Literal["ok", "unreachable"]]  # broker, store, checkpointer


@router.get("/readyz", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "A backend is unreachable (which one: in checks)"}})
async def read_readiness(context: Context) -> JSONResponse:
    """The broker, the artifact store and the checkpointer are reachable (503 naming what is not; why is logged)."""
    checks = {
        "broker": lambda: _ping_broker(context.settings.broker_url),
        "store": lambda: _ping_store(context.store),
        "checkpointer": lambda: context.runs.list_runs(limit=1),  # run records live next to the checkpoints
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            await run_in_threadpool(check)
            results[name] = "ok"
        except Exception as error:  # each failure is reported, not raised
            # The reason goes to the log only: error texts name hosts, ports, even passwords of connection URLs.
            logger.warning("readiness check %s failed: %s: %s", name, type(error).__name__, redact(str(error)))
            results[name] = "unreachable"
    ready = all(value == "ok" for value in results.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": results},
                        status_code=200 if ready else 503)


def _ping_broker(url: str | None) -> None:
    if url is None:
        return  # embedded: the in-process transport is always there
    import redis

    redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()


def _ping_store(store) -> None:
    """A read of an id that cannot exist: "not found" proves the store answers."""
    try:
        store.info("readiness-probe-0000", scope="readyz")
    except ArtifactNotFound:
        return


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
async def read_metrics(request: Request, context: Context) -> Response:
    """Prometheus metrics: queue depth, run and task latency, HTTP traffic, errors (``MGMFLOW_METRICS_KEY``: only
    for a scraper that sends it as its bearer key)."""
    expected = context.settings.metrics_key
    if expected is not None:  # read here, not as a dependency: the document declares no key when none is needed
        key = await presented_key(await bearer_scheme(request), await header_scheme(request))
        if not hmac.compare_digest((key or "").encode(), expected.encode()):
            raise await unauthorized(request, context)
    body = await run_in_threadpool(context.metrics.scrape, context.runs)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
