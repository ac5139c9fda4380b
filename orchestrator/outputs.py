"""A finished run's files as one zip: what ``mgmflow run --out`` writes, for clients of the HTTP API.

The archive is made from the run's final state by its workflow's ``write_output``, the same function the CLI
calls, so a story run over HTTP gives the very storyboard the CLI gives (manifest, PNGs, ``index.html``, contact
sheet). Entries are sorted and carry a fixed date: the same run always gives the same bytes.
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.workflow import get_workflow

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the zip format's earliest date: no build time in the bytes
_STORED = (".png", ".jpg", ".jpeg", ".webp", ".zip")  # compressed already


class NoOutput(InvalidInputError):
    """The run has no files (yet): it has not succeeded, or its workflow writes none."""

    code = "no_output"


def has_files(workflow_name: str) -> bool:
    """Whether runs of this workflow write files (False for a workflow no longer installed)."""
    try:
        return get_workflow(workflow_name).write_output is not None
    except InvalidInputError:
        return False


def output_archive(service: Any, run: Any) -> bytes:
    """The zip of ``run``'s output folder. ``service`` is the :class:`~orchestrator.runs.RunService`."""
    workflow = get_workflow(run.workflow)
    if workflow.write_output is None:
        raise NoOutput(f"workflow {run.workflow!r} writes no files")
    if run.status != "success":
        raise NoOutput(f"run {run.run_id} is {run.status}: only a successful run has files")
    with tempfile.TemporaryDirectory(prefix="mgmflow-output-") as folder:
        workflow.write_output(service.output_values(run), Path(folder), service.context(run))
        return zip_folder(Path(folder))


def zip_folder(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            entry = zipfile.ZipInfo(path.relative_to(folder).as_posix(), date_time=_FIXED_DATE)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_STORED if path.suffix.lower() in _STORED else zipfile.ZIP_DEFLATED
            archive.writestr(entry, path.read_bytes())
    return buffer.getvalue()
