"""The official ``openai`` client against the OpenAI-compatible endpoints, on the tiny Mini-Gemini."""

from __future__ import annotations

import base64
import io
import json

import pytest
from openai import BadRequestError, NotFoundError, OpenAI
from PIL import Image

pytestmark = pytest.mark.timeout(300)


def _png_data_url(color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def openai_client(live_server):
    return OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0, timeout=240)


def _model(openai_client) -> str:
    models = [m.id for m in openai_client.models.list()]
    assert len(models) == 1
    return models[0]


def test_chat_with_an_image(openai_client):
    completion = openai_client.chat.completions.create(
        model=_model(openai_client), max_tokens=8, seed=1,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What color is this?"},
                                                {"type": "image_url", "image_url": {"url": _png_data_url()}}]}])
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens >= 1 and completion.usage.prompt_tokens > completion.usage.completion_tokens


def test_streaming_matches_the_openai_chunk_format(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model=_model(openai_client), max_tokens=6, seed=3, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Tell me a story."}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1
    # The streamed text is the same answer as a non-streamed request with the same seed.
    whole = openai_client.chat.completions.create(
        model=_model(openai_client), max_tokens=6, seed=3, messages=[{"role": "user", "content": "Tell me a story."}])
    assert text == whole.choices[0].message.content


def test_structured_output_follows_the_json_schema(openai_client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    completion = openai_client.chat.completions.create(
        model=_model(openai_client), max_tokens=40, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        messages=[{"role": "user", "content": "Name a color and a count."}])
    answer = json.loads(completion.choices[0].message.content)
    assert answer["color"] in ("red", "green", "blue") and 0 <= answer["count"] <= 9
    with pytest.raises(BadRequestError) as cut:  # too few tokens to close the JSON: an error, never cut JSON
        openai_client.chat.completions.create(
            model=_model(openai_client), max_tokens=3, seed=5,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
            messages=[{"role": "user", "content": "Name a color and a count."}])
    assert cut.value.code == "incomplete_output"


def test_bad_requests_are_clear_4xx(openai_client, live_server):
    model = _model(openai_client)
    with pytest.raises(NotFoundError):
        openai_client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    bad_images = {
        "data:image/png;base64,@@@not-base64@@@": "invalid_base64",
        "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode(): "invalid_image",
        "https://example.com/cat.png": "image_url_not_allowed",
        "file:///etc/passwd": "image_url_not_allowed",
    }
    for url, code in bad_images.items():
        with pytest.raises(BadRequestError) as caught:
            openai_client.chat.completions.create(model=model, messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
        assert caught.value.code == code, (url, caught.value.body)


def test_a_prompt_longer_than_the_context_is_a_400_naming_it(openai_client):
    """As OpenAI answers an over-long request: 400, code ``context_length_exceeded``, the limit in the message."""
    with pytest.raises(BadRequestError) as caught:
        openai_client.chat.completions.create(model=_model(openai_client), max_tokens=8,
                                              messages=[{"role": "user", "content": "word " * 3000}])
    assert caught.value.code == "context_length_exceeded" and "context is 2048 tokens" in caught.value.message


def test_generated_image_comes_back_as_markdown_and_artifact_ids(openai_client, live_server, monkeypatch):
    import httpx
    from testkit import script_mgm_answers

    # MGM draws when it writes an <h>…</h> prompt (generate_image "allow"); a random model would not.
    script_mgm_answers(monkeypatch, "A fox. <h>a red fox curled up in fresh snow</h>")
    completion = openai_client.chat.completions.create(
        model=_model(openai_client), max_tokens=24, seed=11, extra_body={"modalities": ["text", "image"]},
        messages=[{"role": "user", "content": "Draw a red fox in the snow."}])
    artifacts = completion.model_extra["artifacts"]
    assert len(artifacts) == 1
    content = completion.choices[0].message.content
    link = f"{live_server.url}/artifacts/{artifacts[0]}/content"
    assert content.startswith("A fox.") and f"![a red fox curled up in fresh snow]({link})" in content
    image = httpx.get(link, timeout=10)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(image.content)).size[0] > 0
    meta = httpx.get(f"{live_server.url}/artifacts/{artifacts[0]}", timeout=10).json()
    assert meta["metadata"]["parameters"]  # prompt, seed, model as A1111 parameters


def test_remote_image_urls_only_from_allow_listed_hosts(api_env):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from api_support import LiveServer, make_app

    png = base64.b64decode(_png_data_url().split(",", 1)[1])
    fetched = []

    class Images(BaseHTTPRequestHandler):
        def do_GET(self):
            fetched.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    images = HTTPServer(("127.0.0.1", 0), Images)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    try:
        with LiveServer(make_app(image_url_hosts=[f"http://127.0.0.1:{images.server_port}"])) as server:
            client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=240)
            url = f"http://127.0.0.1:{images.server_port}/fox.png"
            completion = client.chat.completions.create(model=_model(client), max_tokens=2, messages=[
                {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}])
            assert completion.choices[0].message.role == "assistant" and fetched == ["/fox.png"]
            with pytest.raises(BadRequestError):  # "localhost" is the same machine, but not on the list
                client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": f"http://localhost:{images.server_port}/x.png"}}]}])
            for elsewhere in (f"https://127.0.0.1:{images.server_port}/x.png", "http://127.0.0.1:1/x.png"):
                with pytest.raises(BadRequestError):  # the same host, another scheme or port: not on the list
                    client.chat.completions.create(model=_model(client), messages=[{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": elsewhere}}]}])
            assert fetched == ["/fox.png"]
    finally:
        images.shutdown()
