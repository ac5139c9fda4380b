"""Hostile requests over HTTP against a live server (uvicorn on a port): each is refused, and nothing is created or
stored for it (issue 12, "High" and "Medium")."""

from __future__ import annotations

import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from api_support import LiveServer, auth, make_app

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = "sec-key-alice", "sec-key-bob"


def _png(size=(16, 16), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _scope(key: str) -> str:
    from orchestrator.api.settings import ApiSettings

    return ApiSettings(api_keys=[key]).scope_of(key)


def _artifacts_of(store, key: str) -> list[dict]:
    return [record for record in store.backend.metas() if record["scope"] == _scope(key)]


@pytest.fixture(scope="module")
def keyed(api_env):
    """A live server with two keys (and the module's own, so that counts of its scopes start at zero)."""
    with LiveServer(make_app(api_keys=[ALICE, BOB])) as server:
        server.store = server.server.config.app.state.context.store
        server.runs = server.server.config.app.state.context.runs
        yield server


def _client(server, key: str | None = None, **headers) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={**(auth(key) if key else {}), **headers}, timeout=30)


# 1. Run inputs never name a server file ---------------------------------------------------------------------------


def test_run_inputs_cannot_read_server_files(keyed, tmp_path):
    alice, bob = _client(keyed, ALICE), _client(keyed, BOB)
    uploaded = alice.post("/artifacts", files={"file": ("a.png", _png(), "image/png")}).json()
    blob = keyed.store.backend._blob_path(uploaded["sha256"])
    readable = tmp_path / "readable.png"
    readable.write_bytes(_png())
    refusals = []
    for reference in (str(blob), str(readable), "/etc/passwd", "/no/such/file.png", "~/.ssh/id_rsa",
                      uploaded["id"]):  # Alice's id is not Bob's
        for workflow, extra in (("visual_reasoning", {"question": "what?"}), ("chat", {"message": "hi"})):
            response = bob.post("/runs", json={"assistant_id": workflow, "input": {**extra, "images": [reference]}})
            assert response.status_code in (400, 422), response.text
            refusals.append(response.json()["detail"].replace(reference, "REF"))
        batch = bob.post("/batches", json={"assistant_id": "visual_reasoning",
                                           "items": [{"question": "what?", "images": [reference]}]})
        assert batch.status_code == 400, batch.text
        refusals.append(batch.json()["detail"].replace(reference, "REF"))
    # The error does not tell an existing file from a missing one: the same text for every path.
    paths = refusals[:-3]
    assert len(set(paths)) == 3, paths
    assert bob.get("/runs").json() == []  # nothing was created
    assert not _artifacts_of(keyed.store, BOB)
    # Her own id is what Alice uses; it is admitted.
    own = alice.post("/runs", json={"assistant_id": "chat", "input": {"message": "hi", "images": [uploaded["id"]]}})
    assert own.status_code == 200, own.text
    alice.post("/runs/cancel", json={"run_ids": [own.json()["run_id"]]})
