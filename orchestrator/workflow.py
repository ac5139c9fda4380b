"""The workflow registry: workflows are found through the ``mgmflow.workflows`` entry-point group, never imported.

A user's package registers a new workflow in its own ``pyproject.toml``::

    [project.entry-points."mgmflow.workflows"]
    story = "mgmflow.workflows.story:workflow"

where ``workflow`` is a :class:`Workflow`. Its ``input_model`` fields are the flags of ``mgmflow run <name>`` and
the input of an HTTP run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel, ValidationError

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.budget import PromptBudget

if TYPE_CHECKING:
    from langgraph.graph import StateGraph

    from mgmflow.orchestrator.runtime import RunContext

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mgmflow.workflows"


@dataclass(frozen=True)
class Workflow:
    """A named graph, the input it accepts, and how its final state becomes files.

    ``build_graph()`` returns an *uncompiled* ``StateGraph``: the runtime compiles it with its checkpointer.
    ``write_output(values, out_dir, context)`` writes the final state into ``out_dir`` and returns a summary
    (e.g. the manifest); ``None`` means the workflow has no file output. ``describe_output(summary, out_dir)``
    is what ``mgmflow run`` prints of it (e.g. the answer and where its images are); by default the folder.
    ``check_budget(input, budget)`` refuses, at admission, an input that no prompt on the configured VLM can carry
    (``ContextLengthError``): a message or an image too big for the model's context.
    """

    name: str
    input_model: type[BaseModel]
    build_graph: Callable[[], StateGraph]
    write_output: Callable[[dict[str, Any], Path, RunContext], dict[str, Any]] | None = None
    description: str = ""
    describe_output: Callable[[dict[str, Any], Path], str] | None = None
    check_budget: Callable[[BaseModel, PromptBudget], None] | None = None

    def validate_input(self, data: dict[str, Any], budget: PromptBudget | None = None) -> BaseModel:
        """Validate a run's input, and with the configured VLM's ``budget`` check that it fits the model; a bad
        field raises :class:`InvalidInputError` naming it."""
        try:
            validated = self.input_model.model_validate(data)
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in issue['loc']) or 'input'}: {issue['msg']}"
                for issue in error.errors()
            )
            raise InvalidInputError(f"invalid input for workflow {self.name!r}: {problems}") from None
        if budget is not None and self.check_budget is not None:
            self.check_budget(validated, budget)
        return validated


# Workflows registered in-process (tests, notebooks); they shadow entry points of the same name.
_registered: dict[str, Workflow] = {}


def register(workflow: Workflow) -> Workflow:
    """Register a workflow in this process without an entry point (tests, notebooks)."""
    _registered[workflow.name] = workflow
    return workflow


def unregister(name: str) -> None:
    _registered.pop(name, None)


# The entry-point workflows of the last scan: a scan reads every installed distribution's metadata (tens of ms),
# too slow for each run submitted, so get_workflow reads this and rescans only for a name it does not know.
_discovered: dict[str, Workflow] | None = None


def load_workflows() -> dict[str, Workflow]:
    """Every workflow of the entry-point group (plus in-process registrations), by name: a fresh scan, which
    also refreshes what :func:`get_workflow` looks names up in."""
    global _discovered
    found: dict[str, Workflow] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            workflow = point.load()
        except Exception:  # a broken third-party plugin must not take the others down
            logger.exception("cannot load workflow entry point %s = %s", point.name, point.value)
            continue
        if not isinstance(workflow, Workflow):
            logger.error("entry point %s = %s is not an orchestrator.workflow.Workflow", point.name, point.value)
            continue
        found[point.name] = workflow
    _discovered = found
    return {**found, **_registered}


def get_workflow(name: str) -> Workflow:
    """The workflow called ``name``; an unknown name raises :class:`InvalidInputError` listing the known ones.

    Looks in the in-process registrations, then in the last entry-point scan; a name found in neither gets one
    fresh scan (a package installed since) before it is called unknown."""
    workflow = _registered.get(name) or (_discovered or {}).get(name)
    if workflow is not None:
        return workflow
    workflows = load_workflows()
    if name not in workflows:
        known = ", ".join(sorted(workflows)) or "none installed"
        raise InvalidInputError(f"unknown workflow {name!r}; known workflows: {known}")
    return workflows[name]
