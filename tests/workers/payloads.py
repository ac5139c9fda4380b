"""Inputs and result checks shared by the embedded and distributed round trips."""

from __future__ import annotations

import io

from PIL import Image

from mgmflow.workers.client import TaskClient


def png(color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buffer, "PNG")
    return buffer.getvalue()


def inputs(client: TaskClient, scope: str = "alice") -> tuple[str, str]:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buffer = io.BytesIO()
    mask.save(buffer, "PNG")
    image = client.store.put(png(), scope=scope, media_type="image/png", metadata={}).id
    return image, client.store.put(buffer.getvalue(), scope=scope, media_type="image/png", metadata={}).id


def round_trip_payloads(image: str, mask: str) -> dict[str, dict]:
    draw = {"seeds": [5], "steps": 3}
    return {
        "diffusion.text2img": {"prompts": ["a red fox"], "preview_every": 2, **draw},
        "edit.img2img": {"prompts": ["a red fox"], "image": image, **draw},
        "edit.instruct": {"prompts": ["make it blue"], "image": image, **draw},
        "edit.inpaint": {"prompts": ["a cat"], "image": image, "mask": mask, **draw},
        "vlm.describe": {"image": image, "max_new_tokens": 6},
        "vlm.chat": {"messages": [{"role": "user", "text": "hello", "images": [image]}], "max_new_tokens": 6},
        "vlm.write_prompt": {"request": "draw a fox in the snow", "max_new_tokens": 40},
        "vlm.critique": {"image": image, "intent": "a red square"},
    }


def check_result(client: TaskClient, kind: str, result: dict, scope: str = "alice") -> None:
    from mgmflow.models.diffusion import read_parameters

    if kind.startswith(("diffusion.", "edit.")):
        [image] = result["images"]
        data = client.store.get(image["artifact"], scope=scope)
        assert Image.open(io.BytesIO(data)).size == (64, 64)
        assert read_parameters(data)["seed"] == image["seed"] == 5
        assert client.store.info(image["artifact"], scope=scope).metadata["parameters"]["seed"] == 5
    elif kind == "vlm.critique":
        assert 0 <= result["score"] <= 10 and result["verdict"] in ("accept", "refine", "edit")
    else:
        assert isinstance(result["text"], str) and result["completion_tokens"] >= 1
        if kind == "vlm.write_prompt":
            assert result["image_prompt"]
