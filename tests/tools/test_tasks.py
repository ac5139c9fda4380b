"""The task tools: input checked before anything is dispatched; real round trips through the tiny workers."""

from __future__ import annotations

import pytest
from tool_helpers import png

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import load_image
from mgmflow.tools.tasks import make_tools

SCOPE = "tools-test"


@pytest.fixture
def tools(client):
    return {tool.name: tool for tool in make_tools(client, scope=SCOPE, run_id="tools-test", timeout=240)}


class Recorder:
    """Wraps the client and records submissions, to show that bad input never reaches the workers."""

    def __init__(self, client):
        self.client, self.store, self.submitted = client, client.store, []

    def submit(self, *args, **kwargs):
        self.submitted.append(args)
        return self.client.submit(*args, **kwargs)


@pytest.mark.parametrize(
    ("name", "arguments", "message"),
    [
        ("ask_image", {"image": "no-such-artifact-id", "question": "what?"}, "no artifact"),
        ("ask_image", {"image": "IMAGE", "question": ""}, "question"),
        ("zoom_image", {"image": "IMAGE", "question": "q", "box": {"x0": 0.5, "y0": 0, "x1": 0.2, "y1": 1}},
         "box is empty"),
        ("zoom_image", {"image": "IMAGE", "question": "q", "box": {"x0": 0, "y0": 0, "x1": 1.5, "y1": 1}}, "x1"),
        ("generate_image", {"prompt": "a fox", "width": 100}, "width"),
        ("generate_image", {"prompt": "x" * 2001}, "prompt"),
        ("img2img", {"image": "IMAGE", "prompt": "p", "strength": 0}, "strength"),
        ("inpaint", {"image": "IMAGE", "mask": "MASK", "prompt": "p"}, "differs from the image"),
        ("critique_image", {"image": "TEXT", "intent": "a fox"}, "not an image"),
        ("write_image_prompt", {"request": "r", "images": ["no-such-artifact-id"]}, r"images\[0\]"),
    ],
)
def test_bad_input_is_refused_before_dispatch(client, image_id, name, arguments, message):
    ids = {"IMAGE": image_id,
           "MASK": client.store.put(png((16, 16), "white"), scope=SCOPE, media_type="image/png", metadata={}).id,
           "TEXT": client.store.put(b"{}", scope=SCOPE, media_type="application/json", metadata={}).id}
    arguments = {key: ids.get(value, value) if isinstance(value, str) else value for key, value in arguments.items()}
    recorder = Recorder(client)
    (tool,) = [tool for tool in make_tools(recorder, scope=SCOPE, handle_errors=False)
               if tool.name == name]
    with pytest.raises((InvalidInputError, ValueError), match=message):
        tool.invoke(arguments)
    assert recorder.submitted == []


def test_an_other_scopes_image_is_not_found(client, image_id):
    (tool,) = [tool for tool in make_tools(client, scope="someone-else", handle_errors=False)
               if tool.name == "describe_image"]
    with pytest.raises(InvalidInputError, match="no artifact"):
        tool.invoke({"image": image_id})


@pytest.mark.timeout(300)
def test_tools_round_trip_through_the_workers(tools, client, image_id):
    drawn = tools["generate_image"].invoke({"prompt": "a red fox", "seed": 5, "count": 2, "width": 64,
                                            "height": 64, "steps": 2})
    assert drawn["seeds"] == [5, 6] and len(set(drawn["images"])) == 2
    first = drawn["images"][0]
    assert load_image(client.store.get(first, scope=SCOPE)).size == (64, 64)

    verdict = tools["critique_image"].invoke({"image": first, "intent": "a red fox"})
    assert 0 <= verdict["score"] <= 10 and verdict["verdict"] in ("accept", "refine", "edit")

    zoom = tools["zoom_image"].invoke({"image": image_id, "question": "what is here?",
                                       "box": {"x0": 0.5, "y0": 0.0, "x1": 1.0, "y1": 0.5}})
    crop = client.store.info(zoom["crop"], scope=SCOPE)
    assert crop.metadata["parent"] == image_id and crop.metadata["pixels"] == [32, 0, 64, 24]
    assert load_image(client.store.get(zoom["crop"], scope=SCOPE)).size == (32, 24)  # cut from the original
    assert isinstance(zoom["text"], str)

    edited = tools["edit_image"].invoke({"image": first, "instruction": "make it blue", "seed": 1, "steps": 2})
    assert edited["parent"] == first and edited["seeds"] == [1]
    prompt = tools["write_image_prompt"].invoke({"request": "a fox in the snow"})
    assert prompt["prompt"]
    assert isinstance(tools["ask_image"].invoke({"image": first, "question": "what colour?"})["text"], str)
