"""What several workflows share: input images given as artifact ids, and long requests staged in the artifact store
(a task message is capped at 4 KB)."""

from __future__ import annotations

import json
from typing import Any

from mgmflow.orchestrator.budget import clip  # noqa: F401  (the workflows' one way to clip a text)
from mgmflow.orchestrator.runtime import get_run_context
from mgmflow.tools.tasks import check_image


def resolve_images(references: list[str]) -> list[str]:
    """The input's image artifact ids, each checked in the run's scope (``InvalidInputError`` naming the first
    missing one). Inputs hold ids only (``mgmflow.orchestrator.references.ArtifactId``): the CLI uploads local files before
    it submits, and nothing here reads a path."""
    context = get_run_context()
    return [check_image(context.store, context.scope, reference, argument=f"images[{index}]").id
            for index, reference in enumerate(references)]


def stage_messages(messages: list[dict[str, Any]] | str) -> str:
    """Store a request (a message list, or one user text) as a JSON artifact of the run; returns its id, for
    ``messages_artifact``. Call it in a node of its own, before the node that awaits the task."""
    if isinstance(messages, str):
        messages = [{"role": "user", "text": messages, "images": []}]
    context = get_run_context()
    artifact = context.store.put(json.dumps(messages).encode(), scope=context.scope, media_type="application/json",
                                 metadata={"run_id": context.run_id, "kind": "messages"})
    return artifact.id
