"""One JSON shape for every error, and the map from our typed errors to HTTP statuses.

Agent-Server routes answer ``{"detail": message, "code": code}``; OpenAI routes (``/v1/...``) answer
``{"error": {"message", "type", "code", "param"}}`` as the ``openai`` client expects. Nothing a client sends may
produce a 500: anything unexpected is logged with its traceback and answered as a plain internal error.
"""

from __future__ import annotations

import logging
import re

import kombu.exceptions
import psycopg
import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from mgmflow.models.errors import InvalidInputError, MGMFlowError, ModelNotFoundError, ResourceExhaustedError
from mgmflow.orchestrator.records import RunNotFound
from mgmflow.workers.artifacts import ArtifactNotFound

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with its own status and code."""

    def __init__(self, status: int, message: str, *, code: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


def not_found(what: str) -> ApiError:
    """The one 404: unknown ids and ids owned by another key look the same."""
    return ApiError(404, f"{what} not found", code="not_found")


MAX_MESSAGE_CHARS = 300
BACKEND_RETRY_AFTER_S = 5
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")
_URL = re.compile(r"\b([a-zA-Z][\w+.-]*://)([^\s/@'\"<>]*@)?([^\s/?#'\"<>]*)([^\s'\"<>]*)")


def redact(text: str) -> str:
    """``text`` with every URL cut to its scheme and host (no user, password, path or query: they may hold
    secrets or tokens) and object reprs (``<_io.BytesIO object at 0x…>``) removed: fit for logs and clients."""
    text = _URL.sub(lambda match: f"{match[1]}{match[3]}", text)
    return _OBJECT_REPR.sub("the data", text)


def public_message(message: str) -> str:
    """What a client is told: one line (the first and, where there are more, the last: parsers put the reason
    there), redacted, at most ``MAX_MESSAGE_CHARS``. Internals (parser state, tracebacks) stay in the logs."""
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()] or ["error"]
    text = redact(lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}")
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 1] + "…"


def error_response(request: Request, status: int, message: str, code: str, *, headers=None, param=None):
    short = public_message(message)
    if short != message:
        logger.info("%s %s answered %d %s; in full: %s", request.method, request.url.path, status, code,
                    redact(str(message)))
    message = short
    if request.url.path.startswith("/v1/"):
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "code": code, "param": param}}
    else:
        body = {"detail": message, "code": code}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, str | None]:
    # Only loc/msg: the raw input may be bytes that are not UTF-8 and cannot be encoded back.
    parts, first_param = [], None
    for item in error.errors()[:5]:
        loc = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        first_param = first_param or loc or None
        parts.append(f"{loc}: {item.get('msg', 'invalid')}" if loc else str(item.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request", first_param


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] != Match.NONE:
            methods |= route.methods
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(request, error.status, error.message, error.code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        malformed = any(item.get("type") == "json_invalid" for item in error.errors())
        status, code = (400, "malformed_json") if malformed else (422, "invalid_request")
        return error_response(request, status, message, code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
                413: "body_too_large"}.get(error.status_code, "http_error")
        headers = error.headers
        if error.status_code == 405:  # Starlette names the methods of one route; the path may have several
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(request, error.status_code, str(error.detail), code, headers=headers)

    @app.exception_handler(ArtifactNotFound)
    @app.exception_handler(RunNotFound)
    async def _not_found(request: Request, error: InvalidInputError):
        return error_response(request, 404, str(error), "not_found")

    @app.exception_handler(InvalidInputError)
    async def _invalid_input(request: Request, error: InvalidInputError):
        return error_response(request, 400, str(error), error.code)

    @app.exception_handler(ResourceExhaustedError)
    async def _exhausted(request: Request, error: ResourceExhaustedError):
        return error_response(request, 503, str(error), error.code, headers={"Retry-After": "5"})

    @app.exception_handler(ModelNotFoundError)
    async def _model_missing(request: Request, error: ModelNotFoundError):
        return error_response(request, 503, str(error), error.code)

    @app.exception_handler(MGMFlowError)
    async def _mgmflow_error(request: Request, error: MGMFlowError):
        return error_response(request, 409, str(error), error.code)

    @app.exception_handler(redis.ConnectionError)
    @app.exception_handler(redis.TimeoutError)
    @app.exception_handler(kombu.exceptions.OperationalError)
    @app.exception_handler(psycopg.OperationalError)
    async def _backend_down(request: Request, error: Exception):
        # The broker or the database is down or unreachable: the client may retry; the operator reads the log.
        logger.error("%s %s: a backend is unavailable: %s: %s", request.method, request.url.path,
                     type(error).__name__, redact(str(error)))
        return error_response(request, 503, "a backend service is unavailable; retry later", "unavailable",
                              headers={"Retry-After": str(BACKEND_RETRY_AFTER_S)})

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(request, 500, "internal server error", "internal")
