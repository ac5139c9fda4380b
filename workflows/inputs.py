"""What several workflows share: input images given as artifact ids or local paths, and long requests staged in
the artifact store (a task message is capped at 4 KB)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator

from models.errors import InvalidInputError
from models.images import load_image
from orchestrator.budget import clip  # noqa: F401  (the workflows' one way to clip a text)
from orchestrator.runtime import get_run_context
from tools.tasks import check_image

_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _image_reference(value: str) -> str:
    """An artifact id, or the path of an existing file (read when the run starts)."""
    if _ARTIFACT_ID.match(value) and not Path(value).exists():
        return value
    if not Path(value).expanduser().is_file():
        raise ValueError(f"image not found: {value!r} is neither an artifact id nor a readable file")
    return str(Path(value).expanduser().resolve())


ImageReference = Annotated[str, AfterValidator(_image_reference)]


def resolve_images(references: list[str]) -> list[str]:
    """Artifact ids for ``references``: ids are checked in the run's scope, files are validated and stored.

    Files are read by the process that drives the run: the same machine in the embedded mode; with remote
    orchestration workers, upload images first and pass their ids.
    """
    context = get_run_context()
    resolved = []
    for index, reference in enumerate(references):
        if _ARTIFACT_ID.match(reference) and not Path(reference).exists():
            resolved.append(check_image(context.store, context.scope, reference, argument=f"images[{index}]").id)
            continue
        path = Path(reference)
        if not path.is_file():
            raise InvalidInputError(f"images[{index}]: file {reference!r} is not readable from the orchestrator")
        data = path.read_bytes()
        load_image(data)  # a clear error for a corrupt or oversized file
        resolved.append(context.store.put(data, scope=context.scope, media_type="image/" + _kind(data),
                                          metadata={"source": path.name, "run_id": context.run_id}).id)
    return resolved


def _kind(data: bytes) -> str:
    from PIL import Image

    return (Image.open(io.BytesIO(data)).format or "png").lower()


def stage_messages(messages: list[dict[str, Any]] | str) -> str:
    """Store a request (a message list, or one user text) as a JSON artifact of the run; returns its id, for
    ``messages_artifact``. Call it in a node of its own, before the node that awaits the task."""
    if isinstance(messages, str):
        messages = [{"role": "user", "text": messages, "images": []}]
    context = get_run_context()
    artifact = context.store.put(json.dumps(messages).encode(), scope=context.scope, media_type="application/json",
                                 metadata={"run_id": context.run_id, "kind": "messages"})
    return artifact.id
