"""Assistants = the registered workflows (read-only): what the ``langgraph-sdk`` client lists and validates against."""

from __future__ import annotations

from fastapi import APIRouter

from orchestrator.api.deps import Context, CurrentScope, PathId
from orchestrator.api.errors import not_found
from orchestrator.api.schemas import AssistantPublic, AssistantSchemas, AssistantSearch
from orchestrator.workflow import Workflow

router = APIRouter(prefix="/assistants", tags=["assistants"])


def _public(context, workflow: Workflow) -> AssistantPublic:
    return AssistantPublic(assistant_id=workflow.name, graph_id=workflow.name, name=workflow.name,
                           description=workflow.description or None, created_at=context.started_at,
                           updated_at=context.started_at)


def _get(context, assistant_id: str) -> Workflow:
    if assistant_id not in context.workflows:
        raise not_found(f"assistant {assistant_id!r}")
    return context.workflows[assistant_id]


@router.post("/search", response_model=list[AssistantPublic])
def search_assistants(body: AssistantSearch, context: Context, _: CurrentScope) -> list[AssistantPublic]:
    """List the workflows, optionally those of one graph id."""
    found = [_public(context, w) for name, w in sorted(context.workflows.items()) if body.graph_id in (None, name)]
    return found[body.offset: body.offset + body.limit]


@router.get("/{assistant_id}", response_model=AssistantPublic)
def read_assistant(assistant_id: PathId, context: Context, _: CurrentScope) -> AssistantPublic:
    """One workflow."""
    return _public(context, _get(context, assistant_id))


@router.get("/{assistant_id}/schemas", response_model=AssistantSchemas)
def read_assistant_schemas(assistant_id: PathId, context: Context, _: CurrentScope) -> AssistantSchemas:
    """The JSON schema of a workflow's input (its fields are the flags of ``mgmflow run <workflow>``)."""
    workflow = _get(context, assistant_id)
    return AssistantSchemas(graph_id=workflow.name, input_schema=workflow.input_model.model_json_schema())
