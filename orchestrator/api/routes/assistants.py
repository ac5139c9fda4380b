"""Assistants = the registered workflows (read-only): what the ``langgraph-sdk`` client lists and validates against,
with their graphs (``/graph``) and schemas (``/schemas``, ``/subgraphs``) as the Agent Server gives them."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from pydantic import PydanticUserError

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId
from mgmflow.orchestrator.api.errors import not_found
from mgmflow.orchestrator.api.schemas import AssistantPublic, AssistantSchemas, AssistantSearch
from mgmflow.orchestrator.workflow import Workflow

logger = logging.getLogger(__name__)
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
    """The JSON schema of a workflow's input (its fields are the flags of ``mgmflow run <workflow>``), and of its
    output and state where the state's types give one."""
    workflow = _get(context, assistant_id)
    graph = context.runs.orchestrator.graph(workflow.name)
    output = _json_schema(graph.get_output_jsonschema, workflow.name)
    return AssistantSchemas(graph_id=workflow.name, input_schema=workflow.input_model.model_json_schema(),
                            output_schema=output, state_schema=output)


@router.get("/{assistant_id}/graph")
def read_assistant_graph(assistant_id: PathId, context: Context, _: CurrentScope,
                         xray: int | bool = False) -> dict[str, Any]:
    """The workflow's graph as LangGraph draws it (``nodes``, ``edges``); ``xray`` opens subgraphs (an integer:
    to that depth)."""
    workflow = _get(context, assistant_id)
    return context.runs.orchestrator.graph(workflow.name).get_graph(xray=xray).to_json()


@router.get("/{assistant_id}/subgraphs")
@router.get("/{assistant_id}/subgraphs/{namespace}")
def read_assistant_subgraphs(assistant_id: PathId, context: Context, _: CurrentScope, namespace: str | None = None,
                             recurse: bool = False) -> dict[str, dict[str, Any]]:
    """The workflow's subgraphs by namespace, each with its input and output schemas."""
    workflow = _get(context, assistant_id)
    graph = context.runs.orchestrator.graph(workflow.name)
    return {name: {"graph_id": workflow.name,
                   "input_schema": _json_schema(subgraph.get_input_jsonschema, name),
                   "output_schema": _json_schema(subgraph.get_output_jsonschema, name)}
            for name, subgraph in graph.get_subgraphs(namespace=namespace, recurse=recurse)}


def _json_schema(make: Any, name: str) -> dict[str, Any] | None:
    """A graph's schema, or None where its state types have none (``typing.TypedDict`` on Python < 3.12)."""
    try:
        return make()
    except PydanticUserError as error:
        logger.debug("no JSON schema for %s: %s", name, error)
        return None
