"""The artifact store on a folder and on an S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import time

import pytest

from mgmflow.workers.artifacts import ArtifactNotFound, ArtifactStore, FolderBackend, S3Backend, open_store
from mgmflow.workers.settings import Settings


class Clock:
    def __init__(self):
        self.now = time.time()  # blobs carry real modification times

    def __call__(self):
        return self.now


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(params=["folder", "s3"])
def backend(request, tmp_path, monkeypatch):
    if request.param == "folder":
        return FolderBackend(tmp_path / "artifacts")
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = request.getfixturevalue("s3_server")
    bucket = f"b{tmp_path.name.replace('_', '-').lower()[-40:]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return S3Backend(bucket, "mgmflow/artifacts", endpoint_url=endpoint)


def test_put_get_info_and_dedup(backend):
    store = ArtifactStore(backend)
    first = store.put(b"same bytes", scope="alice", media_type="text/plain", metadata={"seed": 1})
    second = store.put(b"same bytes", scope="alice", media_type="text/plain", metadata={"seed": 2})
    assert first.id != second.id and first.sha256 == second.sha256
    assert [sha for sha, _ in backend.blobs()] == [first.sha256]  # one blob for both
    assert store.get(second.id, scope="alice") == b"same bytes"
    info = store.info(first.id, scope="alice")
    assert (info.size, info.media_type, info.metadata) == (10, "text/plain", {"seed": 1})


def test_another_scope_or_a_bad_id_is_not_found(backend):
    store = ArtifactStore(backend)
    artifact = store.put(b"secret", scope="alice", media_type="text/plain", metadata={})
    for artifact_id, scope in [(artifact.id, "mallory"), ("../../etc/passwd", "alice"), ("A" * 22, "alice"),
                               (None, "alice")]:
        with pytest.raises(ArtifactNotFound):
            store.get(artifact_id, scope=scope)


def test_retention_and_cleanup_remove_expired_artifacts_and_unreferenced_blobs(backend):
    clock = Clock()
    store = ArtifactStore(backend, retention_s=60, clock=clock)
    short = store.put(b"short-lived", scope="s", media_type="text/plain", metadata={})
    kept = store.put(b"kept", scope="s", media_type="text/plain", metadata={}, retention_s=10_000)
    shared = store.put(b"kept", scope="s", media_type="text/plain", metadata={})  # same blob, short retention
    clock.now += 61
    with pytest.raises(ArtifactNotFound):
        store.get(short.id, scope="s")  # expired: gone before any cleanup
    assert store.cleanup(grace_s=0) == (2, 1)  # two expired artifacts; one blob nobody references any more
    assert store.get(kept.id, scope="s") == b"kept"
    with pytest.raises(ArtifactNotFound):
        store.info(shared.id, scope="s")
    store.delete(kept.id, scope="s")
    assert store.cleanup(grace_s=0) == (0, 1) and list(backend.blobs()) == []


def test_cleanup_spares_young_unreferenced_blobs(tmp_path):
    store = ArtifactStore(FolderBackend(tmp_path))
    artifact = store.put(b"x", scope="s", media_type="text/plain", metadata={})
    store.delete(artifact.id, scope="s")
    assert store.cleanup() == (0, 0)  # within the grace period a concurrent put may still reference it


def test_open_store_from_settings(tmp_path, s3_server, monkeypatch):
    assert isinstance(open_store(Settings(home=tmp_path)).backend, FolderBackend)
    s3 = open_store(Settings(home=tmp_path, store_url="s3://bucket/prefix", s3_endpoint_url=s3_server))
    assert (s3.backend.bucket, s3.backend.prefix) == ("bucket", "prefix")
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store(Settings(home=tmp_path, store_url="ftp://x"))
