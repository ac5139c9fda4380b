"""A run whose input cannot fit the model's context is refused at admission with a typed 400 naming the limit
(``context_length_exceeded``, OpenAI's code), never accepted to fail later in the engine: a chat message too long
for the tiny model's 2,048 tokens, an image too big for a model's context on its own."""

from __future__ import annotations

import io
import json

import pytest
from api_support import make_app
from fastapi.testclient import TestClient
from PIL import Image

pytestmark = pytest.mark.timeout(120)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _refused(response) -> str:
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "context_length_exceeded", body
    return body["detail"]


def test_a_chat_message_longer_than_the_context_is_a_400(client):
    message = {"assistant_id": "chat", "input": {"message": "word " * 600}}  # 3,000 bytes: 3,000 tokens at worst
    assert "context is 2048 tokens" in _refused(client.post("/runs", json=message))
    thread = client.post("/threads", json={}).json()["thread_id"]
    _refused(client.post(f"/threads/{thread}/runs", json=message))
    assert client.get(f"/threads/{thread}/runs").json() == []  # nothing was started
    assert client.post("/runs", json={"assistant_id": "chat", "input": {"message": "word " * 200}}).status_code == 200


@pytest.fixture(scope="module")
def hd_in_2048_client(api_env, tmp_path_factory):
    """An app configured with a checkpoint whose image (a 2x2 grid and a global view, 2,880 tokens) cannot fit its
    2,048-token context: admission reads the geometry from its config.json, without loading it."""
    folder = tmp_path_factory.mktemp("hd-2048")
    (folder / "config.json").write_text(json.dumps({"tokenizer_model_max_length": 2048, "image_grid": 2,
                                                    "image_global": True}))
    with TestClient(make_app(vlm_model=str(folder))) as test_client:
        yield test_client


def test_an_image_that_cannot_fit_the_context_alone_is_a_400(hd_in_2048_client):
    created = hd_in_2048_client.post("/artifacts", files={"file": ("photo.png", _png(), "image/png")})
    assert created.status_code == 201, created.text
    image = created.json()["id"]
    question = {"assistant_id": "visual_reasoning", "input": {"question": "What is it?", "images": [image]}}
    assert "2048 context tokens" in _refused(hd_in_2048_client.post("/runs", json=question))
    chat = {"assistant_id": "chat", "input": {"message": "What is it?", "images": [image]}}
    _refused(hd_in_2048_client.post("/runs", json=chat))
