"""The client side of ``mgmflow submit``: send a batch file to a server, follow it, download its results."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from mgmflow.models.errors import InvalidInputError, MGMFlowError
from mgmflow.orchestrator.api.schemas import ID_PATTERN
from mgmflow.orchestrator.api.server import ServiceUnreachable

FINISHED = ("success", "error", "timeout", "cancelled")
DOWNLOAD_ITEM = re.compile(r"item-\d{5,}")
OUTPUT_URL = re.compile(rf"/threads/{ID_PATTERN.strip('^$')}/runs/{ID_PATTERN.strip('^$')}/output")


class ServerError(MGMFlowError):
    """The server refused a request; its message says why."""

    code = "server_error"


class ApiClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 30.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ServiceUnreachable(f"cannot reach the mgmflow server at {self.url} ({error}); "
                                     "is `mgmflow serve` running there?") from None
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ServerError(f"{method} {path}: {response.status_code} {detail}")
        return response

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request whose answer is JSON; anything else is a :class:`ServerError`, never a crash."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:  # not JSON, or not even text
            raise ServerError(f"the server answered {method} {path[:80]} with something that is not JSON") from None

    def upload_batch(self, path: Path, workflow: str, concurrency: int, priority: int,
                     idempotency_key: str | None) -> dict[str, Any]:
        """Send the batch file; image paths in its items are uploaded first and replaced by their artifact ids (the
        server reads no path)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        content = self._with_uploads(path, workflow)
        return self.call("POST", "/batches/upload", headers=headers, files={"file": (path.name, content)},
                         data={"assistant_id": workflow, "concurrency": str(concurrency), "priority": str(priority)})

    def upload_image(self, path: Path) -> str:
        with path.open("rb") as file:
            return self.call("POST", "/artifacts", files={"file": (path.name, file)})["id"]

    def _with_uploads(self, path: Path, workflow: str) -> bytes:
        """The batch file's content; as JSON Lines with artifact ids when items name local files."""
        from mgmflow.orchestrator.api.errors import ApiError
        from mgmflow.orchestrator.api.routes.batches import parse_items
        from mgmflow.orchestrator.references import artifact_fields, upload_local_files

        content = path.read_bytes()
        try:
            schema = self.call("GET", f"/assistants/{workflow}/schemas")["input_schema"]
            items = parse_items(content, path.name) if artifact_fields(schema) else None
        except (ServerError, ApiError):  # an unknown workflow, a bad file: the upload's answer names it
            return content
        if items is None:
            return content
        base = path.parent
        uploaded = [upload_local_files({**item, **{name: _relative_to(item.get(name), base)
                                                   for name in artifact_fields(schema) if name in item}},
                                       schema, self.upload_image) for item in items]
        return "".join(json.dumps(item) + "\n" for item in uploaded).encode()

    def follow(self, batch_id: str, on_progress: Callable[[dict[str, Any]], None], poll_s: float = 1.0):
        """Poll the batch until it ends; ``on_progress`` gets each status."""
        while True:
            batch = self.call("GET", f"/batches/{batch_id}")
            on_progress(batch)
            if batch["run"]["status"] in FINISHED:
                return batch
            time.sleep(poll_s)

    def download(self, batch_id: str, out_dir: Path) -> dict[str, Any]:
        """Write ``results.jsonl`` and each successful item's files into ``out_dir/item-NNNNN``: the folder its run
        writes (a story's storyboard: manifest, pages, ``index.html``, contact sheet), else its image artifacts.

        Everything goes into a temporary folder first, renamed into place at the end: no partial output. File
        names come from the server's ids: each is checked to be a plain id first (a hostile server names no path)."""
        check_out_dir(out_dir)
        rows = self.call("GET", f"/batches/{server_id(batch_id, 'batch id')}/results")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
        try:
            files = 0
            for row in rows:
                if not isinstance(row.get("index"), int) or isinstance(row["index"], bool) or row["index"] < 0:
                    raise ServerError(f"the server sent {str(row.get('index'))[:40]!r}: not a valid item index")
                folder = staging / f"item-{row['index']:05d}"
                if row.get("output_url"):
                    if not OUTPUT_URL.fullmatch(str(row["output_url"])):
                        raise ServerError(f"the server sent {str(row['output_url'])[:80]!r}: not a run's output URL")
                    files += _extract(self.request("GET", row["output_url"]).content, folder)
                    continue
                for artifact_id in _image_ids(row.get("output") or {}):
                    server_id(artifact_id, "artifact id")
                    folder.mkdir(exist_ok=True)
                    data = self.request("GET", f"/artifacts/{artifact_id}/content").content
                    (folder / f"{artifact_id}.png").write_bytes(data)
                    files += 1
            (staging / "results.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
            if out_dir.exists():
                check_out_dir(out_dir)  # again: it may have been filled while the batch ran
                shutil.rmtree(out_dir)
            os.replace(staging, out_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return {"items": len(rows), "files": files}


def _extract(archive: bytes, folder: Path) -> int:
    """Unpack a run's output zip into ``folder``; every name must stay inside it (a hostile server's zip names no
    path outside). Returns the number of files."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as files:
            for entry in files.infolist():
                parts = PurePosixPath(entry.filename).parts
                if entry.filename.startswith("/") or "\\" in entry.filename or not parts or ".." in parts:
                    raise ServerError(f"the server's zip names {entry.filename[:80]!r}: not a file inside its folder")
                if entry.is_dir():
                    continue
                target = folder.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(files.read(entry))
            return sum(not entry.is_dir() for entry in files.infolist())
    except zipfile.BadZipFile as error:
        raise ServerError(f"the server's output is not a zip: {error}") from None


def _relative_to(value: Any, base: Path) -> Any:
    """Relative paths in a batch file are relative to the file's folder."""
    if isinstance(value, list):
        return [_relative_to(item, base) for item in value]
    if isinstance(value, str) and not Path(value).expanduser().is_absolute() and (base / value).is_file():
        return str(base / value)
    return value


def _image_ids(values: dict[str, Any]) -> list[str]:
    """The chosen images of a run's final state (or all its image artifacts when nothing was chosen)."""
    chosen = values.get("chosen") or {}
    if chosen:
        return [chosen[key] for key in sorted(chosen, key=lambda k: (len(k), k))]
    return [ref["id"] for ref in values.get("artifacts") or [] if ref.get("kind", "image") == "image"]


def server_id(value: Any, what: str) -> str:
    """``value`` if it is a plain id (what the server issues), else a :class:`ServerError`."""
    if not isinstance(value, str) or not re.fullmatch(ID_PATTERN, value) or value.strip(".") == "":
        raise ServerError(f"the server sent {str(value)[:40]!r}: not a valid {what}")
    return value


def check_out_dir(out_dir: Path) -> None:
    """``out_dir`` may be replaced: missing, empty, or an earlier download (``results.jsonl`` and ``item-NNNNN``
    folders only). Anything else is someone's folder: refused, never deleted."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise InvalidInputError(f"--out {out_dir} exists and is not a folder")
    foreign = [entry.name for entry in out_dir.iterdir()
               if not (entry.name == "results.jsonl" and entry.is_file()
                       or DOWNLOAD_ITEM.fullmatch(entry.name) and entry.is_dir())]
    if foreign:
        raise InvalidInputError(f"--out {out_dir} is not empty and not an earlier download (it has "
                                f"{foreign[0]!r}): choose another folder")


def check_batch_file(path: Path) -> None:
    """Fail before any request for a file that cannot be a batch."""
    if not path.is_file():
        raise InvalidInputError(f"batch file not found: {path}")
    if path.stat().st_size == 0:
        raise InvalidInputError(f"batch file is empty: {path}")
