"""Input fields that name a file hold an artifact id of the run's scope, nothing else.

No server process ever reads a path a client gave it: over HTTP an image is uploaded first (``POST /artifacts``) and
named by its id. Local paths stay a convenience of the CLI, which uploads the files and puts their ids in the input
before it submits (:func:`upload_local_files`). A workflow marks such a field ``ArtifactId`` (or ``list[ArtifactId]``);
the mark is visible in its JSON schema (``format``), which is how the CLI and the API find the fields.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, WithJsonSchema

from mgmflow.models.images import load_image

ARTIFACT_ID_FORMAT = "mgmflow-artifact-id"
_ARTIFACT_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


def _artifact_id(value: str) -> str:
    # The same answer for every string that is not an id: nothing here says whether a file of that name exists.
    if not _ARTIFACT_ID.match(value):
        raise ValueError("not an artifact id: upload the file first (POST /artifacts), or give a local path to the "
                         "mgmflow CLI, which uploads it")
    return value


ArtifactId = Annotated[str, AfterValidator(_artifact_id),
                       WithJsonSchema({"type": "string", "pattern": _ARTIFACT_ID.pattern, "format": ARTIFACT_ID_FORMAT})]


def artifact_fields(schema: dict[str, Any]) -> dict[str, bool]:
    """The top-level fields of an input model's JSON schema that hold artifact ids: name → holds a list."""
    fields = {}
    for name, prop in (schema.get("properties") or {}).items():
        for variant in [prop, *prop.get("anyOf", ())]:
            if variant.get("format") == ARTIFACT_ID_FORMAT:
                fields[name] = False
            elif (variant.get("items") or {}).get("format") == ARTIFACT_ID_FORMAT:
                fields[name] = True
    return fields


def artifact_values(data: dict[str, Any], schema: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(where, value)`` of every artifact-id field in ``data`` (an input of the model ``schema`` describes)."""
    for name, is_list in artifact_fields(schema).items():
        value = data.get(name)
        if value is None:
            continue
        values = value if is_list and isinstance(value, list) else [value]
        for index, item in enumerate(values):
            if isinstance(item, str):
                yield (f"{name}[{index}]" if is_list else name), item


def upload_local_files(data: dict[str, Any], schema: dict[str, Any], upload: Callable[[Path], str]) -> dict[str, Any]:
    """``data`` with each artifact-id field that names a readable local file replaced by ``upload(path)`` (an id).
    For clients only (the CLI): a server never calls it."""
    data = dict(data)
    for name, is_list in artifact_fields(schema).items():
        value = data.get(name)
        if value is None:
            continue
        values = [_uploaded(item, upload) for item in (value if is_list else [value])]
        data[name] = values if is_list else values[0]
    return data


def _uploaded(value: Any, upload: Callable[[Path], str]) -> Any:
    if not isinstance(value, (str, Path)):
        return value
    path = Path(value).expanduser()
    return upload(path) if path.is_file() else str(value)


def store_file(store: Any, path: Path, *, scope: str) -> str:
    """Upload a local image into ``store`` (validated by the one decoder first); returns its artifact id."""
    data = path.read_bytes()
    image = load_image(data)
    from PIL import Image

    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    metadata = {"source": path.name, "width": image.width, "height": image.height}
    return store.put(data, scope=scope, media_type=f"image/{kind}", metadata=metadata).id
