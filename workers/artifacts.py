"""The artifact store: images and long texts that tasks exchange by reference, never through the broker.

Blobs are stored once per sha256 (identical bytes are deduplicated); each ``put`` creates a new artifact with a
random id, its scope and its metadata. Reading checks the scope: another scope's id is simply not found.
Two backends hold the bytes — a folder (the embedded default, or a volume shared by several machines) and an
S3-compatible bucket (through boto3) — behind the same small key/value interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mgmflow.models.errors import InvalidInputError
from mgmflow.workers.settings import Settings

# Ids are url-safe random tokens; anything else (a path, "..") is refused before it reaches a backend.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
# Unreferenced blobs younger than this survive a cleanup: a concurrent put may be about to reference them.
GC_GRACE_S = 3600.0


class ArtifactNotFound(InvalidInputError):
    """No artifact with this id in the caller's scope (it may exist in another scope: that is not said)."""

    code = "artifact_not_found"


@dataclass(frozen=True)
class Artifact:
    id: str
    sha256: str
    size: int
    media_type: str
    metadata: dict[str, Any]
    created_at: float
    scope: str = ""
    expires_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Backend:
    """Bytes by key: ``blobs/<sha256>`` and ``meta/<id>`` (JSON). Implementations: folder, S3."""

    def has_blob(self, sha256: str) -> bool: ...
    def put_blob(self, sha256: str, data: bytes) -> None: ...
    def get_blob(self, sha256: str) -> bytes | None: ...
    def delete_blob(self, sha256: str) -> None: ...
    def blobs(self) -> Iterator[tuple[str, float]]: ...  # (sha256, modified at)
    def put_meta(self, artifact_id: str, record: dict) -> None: ...
    def get_meta(self, artifact_id: str) -> dict | None: ...
    def delete_meta(self, artifact_id: str) -> None: ...
    def metas(self) -> Iterator[dict]: ...


class FolderBackend(_Backend):
    """A local folder, or a shared volume mounted at the same path on every machine. Writes are atomic."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        (self.root / "meta").mkdir(parents=True, exist_ok=True)

    def _blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256

    def _meta_path(self, artifact_id: str) -> Path:
        return self.root / "meta" / artifact_id[:2] / f"{artifact_id}.json"

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def has_blob(self, sha256):
        path = self._blob_path(sha256)
        if not path.exists():
            return False
        os.utime(path)  # a dedup hit refreshes the blob, so a concurrent cleanup's grace period covers it
        return True

    def put_blob(self, sha256, data):
        self._write(self._blob_path(sha256), data)

    def get_blob(self, sha256):
        try:
            return self._blob_path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def delete_blob(self, sha256):
        self._blob_path(sha256).unlink(missing_ok=True)

    def blobs(self):
        for path in (self.root / "blobs").glob("*/*"):
            if not path.name.startswith(".tmp-"):
                yield path.name, path.stat().st_mtime

    def put_meta(self, artifact_id, record):
        self._write(self._meta_path(artifact_id), json.dumps(record).encode())

    def get_meta(self, artifact_id):
        try:
            return json.loads(self._meta_path(artifact_id).read_bytes())
        except FileNotFoundError:
            return None

    def delete_meta(self, artifact_id):
        self._meta_path(artifact_id).unlink(missing_ok=True)

    def metas(self):
        for path in (self.root / "meta").glob("*/*.json"):
            try:
                yield json.loads(path.read_bytes())
            except FileNotFoundError:  # deleted meanwhile
                continue


class S3Backend(_Backend):
    """An S3-compatible bucket (AWS, MinIO, Ceph, ...) through boto3; credentials from the usual AWS sources."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, client=None):
        import boto3  # heavy; only deployments with a bucket pay for it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def _list(self, under: str) -> Iterator[dict]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(under) + "/"):
            yield from page.get("Contents", ())

    def has_blob(self, sha256):
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key("blobs", sha256))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def put_blob(self, sha256, data):
        self.client.put_object(Bucket=self.bucket, Key=self._key("blobs", sha256), Body=data)

    def get_blob(self, sha256):
        return self._get(self._key("blobs", sha256))

    def delete_blob(self, sha256):
        self.client.delete_object(Bucket=self.bucket, Key=self._key("blobs", sha256))

    def blobs(self):
        for item in self._list("blobs"):
            yield item["Key"].rsplit("/", 1)[-1], item["LastModified"].timestamp()

    def put_meta(self, artifact_id, record):
        body = json.dumps(record).encode()
        self.client.put_object(Bucket=self.bucket, Key=self._key("meta", f"{artifact_id}.json"), Body=body)

    def get_meta(self, artifact_id):
        data = self._get(self._key("meta", f"{artifact_id}.json"))
        return None if data is None else json.loads(data)

    def delete_meta(self, artifact_id):
        self.client.delete_object(Bucket=self.bucket, Key=self._key("meta", f"{artifact_id}.json"))

    def metas(self):
        for item in self._list("meta"):
            data = self._get(item["Key"])
            if data is not None:
                yield json.loads(data)


@dataclass
class ArtifactStore:
    backend: _Backend
    retention_s: float | None = None  # default lifetime of new artifacts; None keeps them until deleted
    clock: Any = field(default=time.time, repr=False)

    def put(self, data: bytes, *, scope: str, media_type: str, metadata: dict | None = None,
            retention_s: float | None = None) -> Artifact:
        """Store ``data`` under a new id in ``scope``; identical bytes share one blob."""
        data = bytes(data)
        sha256 = hashlib.sha256(data).hexdigest()
        now = self.clock()
        lifetime = retention_s if retention_s is not None else self.retention_s
        artifact = Artifact(
            id=secrets.token_urlsafe(16), sha256=sha256, size=len(data), media_type=media_type,
            metadata=dict(metadata or {}), created_at=now, scope=scope,
            expires_at=None if lifetime is None else now + lifetime,
        )
        if not self.backend.has_blob(sha256):
            self.backend.put_blob(sha256, data)
        self.backend.put_meta(artifact.id, artifact.to_dict())
        return artifact

    def info(self, artifact_id: str, *, scope: str) -> Artifact:
        """The artifact's metadata, if it exists in ``scope`` and has not expired."""
        if not isinstance(artifact_id, str) or not _ID_PATTERN.match(artifact_id):
            raise ArtifactNotFound(f"artifact not found: {str(artifact_id)[:80]!r}")
        record = self.backend.get_meta(artifact_id)
        if record is None or record.get("scope") != scope or self._expired(record, self.clock()):
            raise ArtifactNotFound(f"artifact not found: {artifact_id!r}")
        return Artifact(**record)

    def get(self, artifact_id: str, *, scope: str) -> bytes:
        artifact = self.info(artifact_id, scope=scope)
        data = self.backend.get_blob(artifact.sha256)
        if data is None:
            raise ArtifactNotFound(f"artifact {artifact_id!r} has lost its content")
        return data

    def delete(self, artifact_id: str, *, scope: str) -> None:
        """Forget the artifact; its blob goes at the next cleanup if nothing else references it."""
        self.info(artifact_id, scope=scope)
        self.backend.delete_meta(artifact_id)

    def delete_made_by(self, scope: str, run_ids: set[str]) -> int:
        """Forget every artifact of ``scope`` that one of ``run_ids`` made (``metadata.run_id``); returns how many."""
        deleted = 0
        for record in self.backend.metas():
            if record.get("scope") == scope and (record.get("metadata") or {}).get("run_id") in run_ids:
                self.backend.delete_meta(record["id"])
                deleted += 1
        return deleted

    def cleanup(self, *, grace_s: float = GC_GRACE_S) -> tuple[int, int]:
        """Delete expired artifacts, then blobs no artifact references. Returns (artifacts, blobs) removed."""
        now = self.clock()
        candidates = dict(self.backend.blobs())  # listed first: blobs created after this are not candidates
        referenced, expired = set(), 0
        for record in self.backend.metas():
            if self._expired(record, now):
                self.backend.delete_meta(record["id"])
                expired += 1
            else:
                referenced.add(record["sha256"])
        removed = 0
        for sha256, modified_at in candidates.items():
            if sha256 not in referenced and now - modified_at >= grace_s:
                self.backend.delete_blob(sha256)
                removed += 1
        return expired, removed

    @staticmethod
    def _expired(record: dict, now: float) -> bool:
        return record.get("expires_at") is not None and record["expires_at"] <= now


def open_store(settings: Settings) -> ArtifactStore:
    """The store ``settings.artifacts_url`` names: ``file:///path`` (a folder, a shared volume) or
    ``s3://bucket/prefix``."""
    url = urlparse(settings.artifacts_url)
    if url.scheme == "file":
        backend: _Backend = FolderBackend(Path(url.path))
    elif url.scheme == "s3":
        backend = S3Backend(url.netloc, url.path, endpoint_url=settings.s3_endpoint_url)
    else:
        raise InvalidInputError(f"unsupported store URL {settings.artifacts_url!r}: use file:///path or s3://bucket")
    return ArtifactStore(backend, retention_s=settings.artifact_retention_s)
