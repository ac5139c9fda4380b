"""Artifacts: upload input images, download results by id with their metadata. Ids are scoped to the caller."""

from __future__ import annotations

import io

from fastapi import APIRouter, UploadFile
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from models.images import load_image
from orchestrator.api.deps import CurrentScope, PathId, SettingsDep, Store
from orchestrator.api.schemas import ArtifactPublic

router = APIRouter(prefix="/artifacts", tags=["artifacts"])


def store_image(store, data: bytes, *, scope: str, max_pixels: int, metadata: dict) -> ArtifactPublic:
    """Validate ``data`` as an image (the one decoder, with its pixel limit) and store it as PNG.

    Re-encoding strips EXIF (location, camera) after applying its rotation, and gives workers one format."""
    image = load_image(data, max_pixels=max_pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    metadata = {**metadata, "width": image.width, "height": image.height}
    artifact = store.put(buffer.getvalue(), scope=scope, media_type="image/png", metadata=metadata)
    return ArtifactPublic.model_validate(artifact.to_dict())


@router.post("", response_model=ArtifactPublic, status_code=201)
async def create_artifact(file: UploadFile, store: Store, settings: SettingsDep, scope: CurrentScope) -> ArtifactPublic:
    """Upload an input image (multipart field ``file``); truncated, corrupt or oversized images get a 400."""
    data = await file.read()
    metadata = {"source": "upload", "filename": (file.filename or "")[:200]}
    return await run_in_threadpool(store_image, store, data, scope=scope, max_pixels=settings.max_image_pixels,
                                   metadata=metadata)


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
