"""The OpenAPI document tells the truth: the error model every error is answered with, every status each
operation can answer, and how to authenticate.

Statuses come from what an operation has (the same middleware and dependencies answer them everywhere): a body
(400 malformed or invalid content, 408 body too slow, 413 too large), parameters or a body (422), ids in its path
(404), a key (401, 429 rate limit or quota, 503 broker or database down). What only some operations answer (409,
502, …) each declares with :func:`errors`. A server without keys documents no security and no 401.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from mgmflow.orchestrator.api.settings import ApiSettings

DESCRIPTIONS = {
    400: "Malformed JSON, or content the schema cannot judge: an undecodable image, input the workflow refuses",
    401: "Missing or unknown API key",
    404: "No such id for this key (ids of other keys look the same)",
    408: "The request body did not arrive in time",
    409: "Conflicts with the current state (e.g. a thread id in use, a run not waiting for approval)",
    413: "Body, prompt or batch over its limit",
    422: "A field is missing, of the wrong type or out of range",
    429: "Rate limit or quota of this key reached; retry after Retry-After seconds",
    502: "The model step failed",
    503: "A backend (broker, database, model) is unavailable; retry after Retry-After seconds",
}


class ErrorBody(BaseModel):
    """Every error of the Agent-Server routes."""

    detail: str  # one line, for people
    code: str  # stable, for programs: not_found, invalid_request, prompt_too_long, …


class OpenAIError(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class OpenAIErrorBody(BaseModel):
    """Every error of the OpenAI-compatible routes (``/v1/...``), as the ``openai`` client reads it."""

    error: OpenAIError


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route that answers these statuses besides the ones every such route answers."""
    return {status: {"description": DESCRIPTIONS[status]} for status in statuses}


def install_openapi(app: FastAPI, settings: ApiSettings) -> None:
    """Make ``app.openapi()`` (``/openapi.json``, ``/docs``) declare errors, statuses and security."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(generate(), open_access=settings.open_access)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _complete(schema: dict[str, Any], *, open_access: bool) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    models = components.setdefault("schemas", {})
    for model in (ErrorBody, OpenAIErrorBody):
        body = model.model_json_schema(ref_template="#/components/schemas/{model}")
        models.update(body.pop("$defs", {}))
        models[model.__name__] = body
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: never what we answer
        models.pop(name, None)
    if open_access:
        components.pop("securitySchemes", None)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            _declare_errors(path, operation, open_access=open_access)
    return schema


def _declare_errors(path: str, operation: dict[str, Any], *, open_access: bool) -> None:
    parameters = operation.get("parameters", [])
    has_body = "requestBody" in operation
    statuses = set()
    if has_body:
        statuses |= {400, 408, 413}
    if has_body or parameters:
        statuses.add(422)
    if any(parameter["in"] == "path" for parameter in parameters):
        statuses.add(404)
    if "security" in operation:
        statuses |= {429, 503} if open_access else {401, 429, 503}
        if open_access:
            del operation["security"]
    responses = operation.setdefault("responses", {})
    if open_access:
        responses.pop("401", None)
    model = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"
    for status in sorted(statuses | {int(code) for code in responses if code.isdigit() and int(code) >= 400}):
        response = responses.get(str(status), {})
        if "content" not in response or status == 422:  # ours, not FastAPI's validation error
            response = {"description": DESCRIPTIONS.get(status, response.get("description", "Error")),
                        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}
        if status in (429, 503):
            response["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
        if status == 401:
            response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        responses[str(status)] = response
