"""Artifacts: upload input images, download results by id with their metadata. Ids are scoped to the caller."""

from __future__ import annotations

from fastapi import APIRouter, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId, Store
from mgmflow.orchestrator.api.images import store_decoded
from mgmflow.orchestrator.api.schemas import ArtifactPublic

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


@router.post("", response_model=ArtifactPublic, status_code=201)
async def create_artifact(file: UploadFile, context: Context, scope: CurrentScope) -> ArtifactPublic:
    """Upload an input image (multipart field ``file``); truncated, corrupt or oversized images get a 400.

    It is stored re-encoded as PNG: EXIF (location, camera) is stripped after applying its rotation."""
    data = await file.read()
    (image,) = await context.images.decode([("file", data)])
    metadata = {"source": "upload", "filename": (file.filename or "")[:200]}
    artifact = await run_in_threadpool(store_decoded, context.store, image, scope=scope, metadata=metadata)
    return ArtifactPublic.model_validate(artifact.to_dict())


@router.get("/{artifact_id}", response_model=ArtifactPublic)
def read_artifact(artifact_id: PathId, store: Store, scope: CurrentScope) -> ArtifactPublic:
    """An artifact's metadata (media type, size, sha256, prompt, seed, model, run...)."""
    return ArtifactPublic.model_validate(store.info(artifact_id, scope=scope).to_dict())


@router.get("/{artifact_id}/content", response_class=Response,
            responses={200: {"content": {"image/png": {}, "application/octet-stream": {}}}})
def read_artifact_content(artifact_id: PathId, store: Store, scope: CurrentScope) -> Response:
    """An artifact's bytes."""
    artifact = store.info(artifact_id, scope=scope)
    return Response(store.get(artifact_id, scope=scope), media_type=artifact.media_type,
                    headers={"ETag": f'"{artifact.sha256}"', "Cache-Control": "private, max-age=31536000, immutable"})


@router.delete("/{artifact_id}", status_code=204)
def delete_artifact(artifact_id: PathId, store: Store, scope: CurrentScope) -> Response:
    """Forget an artifact."""
    store.delete(artifact_id, scope=scope)
    return Response(status_code=204)
