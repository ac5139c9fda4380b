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

ALICE, BOB, CAROL, DAVE = "sec-key-alice", "sec-key-bob", "sec-key-carol", "sec-key-dave"


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
    """A live server with keys of this module only: counts of their scopes start at zero."""
    with LiveServer(make_app(api_keys=[ALICE, BOB, CAROL, DAVE])) as server:
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


# 2. Decompression bombs: limits before decoding, nothing stored for a refused request ----------------------------


def _sixteen_bit_bomb(side: int = 6324) -> bytes:
    """A ~80 KB greyscale 16-bit PNG of ``side``² zero pixels (under the 40-megapixel limit at 6324)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, row, body = zlib.compressobj(9), bytes(1 + 2 * side), []
    for _ in range(side):
        body.append(compressor.compress(row))
    body.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(body)) + chunk(b"IEND", b"")


def _data_url(data: bytes) -> str:
    import base64

    return "data:image/png;base64," + base64.b64encode(data).decode()


def _chat(server, key: str, images_per_message: list[list[bytes]]) -> httpx.Response:
    model = server.server.config.app.state.context.settings.vlm_model
    messages = [{"role": ("user", "assistant")[index % 2], "content": [{"type": "text", "text": "what?"}] +
                 [{"type": "image_url", "image_url": {"url": _data_url(data)}} for data in images]}
                for index, images in enumerate(images_per_message)]
    return _client(server, key).post("/v1/chat/completions", json={"model": model, "messages": messages})


def test_image_limits_apply_before_decoding_and_nothing_is_stored(keyed):
    import time

    small, bomb = _png((8, 8)), _sixteen_bit_bomb()
    assert len(bomb) < 200_000
    # 17 images over several messages: refused by count, none decoded or stored.
    response = _chat(keyed, CAROL, [[small] * 9, [], [small] * 8])
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_many_images", response.text
    # Four 16-bit 40-megapixel bombs: refused from their headers (about a gigabyte to decode), at once.
    started = time.monotonic()
    response = _chat(keyed, CAROL, [[bomb, bomb], [], [bomb, bomb]])
    assert response.status_code == 413 and response.json()["error"]["code"] == "images_too_large", response.text
    assert time.monotonic() - started < 2.0
    # A good image, then a corrupt one: refused, and the good one is not stored either.
    response = _chat(keyed, CAROL, [[small], [], [small[:40]]])
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_image", response.text
    assert not _artifacts_of(keyed.store, CAROL)
