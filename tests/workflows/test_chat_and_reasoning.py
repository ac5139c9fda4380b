"""The chat and visual_reasoning workflows end to end on the tiny presets (embedded), plus their pure parts."""

from __future__ import annotations

import io
import json

import pytest
from wf_helpers import TINY, finish
from PIL import Image

from mgmflow.models.errors import InvalidInputError
from mgmflow.models.images import load_image
from mgmflow.orchestrator.references import store_file
from mgmflow.orchestrator.workflow import get_workflow
from mgmflow.workflows.chat import referenced_image


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("make the dog in the last picture red", "c"),
        ("Make the first image brighter", "a"),
        ("in the previous dog picture, add a hat", "c"),
        ("edit image 2 please", "b"),
        ("picture #3, darker", "c"),
        ("image 7, darker", None),  # no such image
        ("the first time I saw it", None),  # not about a picture
        ("draw a cat", None),
    ],
)
def test_referenced_image(text, expected):
    assert referenced_image(text, ["a", "b", "c"]) == expected
    assert referenced_image(text, []) is None


def test_an_image_path_is_a_typed_error(tmp_path):
    """Inputs hold artifact ids: a path, existing or not, is refused the same way (the CLI uploads files first)."""
    (tmp_path / "there.png").write_bytes(b"x")
    for name, field in (("visual_reasoning", {"question": "what?"}), ("chat", {"message": "hi"})):
        for path in (tmp_path / "missing.png", tmp_path / "there.png"):
            with pytest.raises(InvalidInputError, match="not an artifact id"):
                get_workflow(name).validate_input({**field, "images": [str(path)]})
    with pytest.raises(InvalidInputError, match="images"):
        get_workflow("visual_reasoning").validate_input({"question": "what?", "images": []})


@pytest.mark.timeout(300)
def test_chat_draws_then_edits_the_last_picture_by_reference(embedded, tmp_path, monkeypatch):
    from testkit import script_mgm_answers

    # MGM draws when it writes an <h>…</h> prompt (generate_image "allow"); a random model would not.
    script_mgm_answers(monkeypatch, "Here it is. <h>a dog running in a green park</h>")
    thread = embedded.create_thread()["thread_id"]
    first = finish(embedded, embedded.create_run("chat", {"message": "Draw a dog in a park.", "seed": 4, **TINY},
                                                 thread_id=thread))
    drawn = embedded.output_values(first)
    (picture,) = drawn["reply_images"]
    assert drawn["image_prompt"] == "a dog running in a green park"
    assert drawn["artifacts"][-1]["tool"] == "diffusion.text2img"

    second = finish(embedded, embedded.create_run("chat", {"message": "Make the dog in the last picture red.",
                                                           "seed": 4, "steps": 2}, thread_id=thread))
    values = embedded.output_values(second)
    (edited,) = values["reply_images"]
    ref = values["artifacts"][-1]
    assert ref["id"] == edited and ref["tool"] == "edit.instruct" and ref["parent"] == picture
    # The thread holds both turns of both runs, with their images.
    assert [(m["role"], m["images"]) for m in values["messages"]] == [
        ("user", []), ("assistant", [picture]), ("user", []), ("assistant", [edited])]
    report = get_workflow("chat").write_output(values, tmp_path, embedded.context(second))
    assert (tmp_path / report["files"][0]).read_bytes() == embedded.context(second).store.get(edited, scope="default")


@pytest.mark.timeout(300)
def test_visual_reasoning_zooms_into_the_original_image(embedded, tmp_path):
    path = tmp_path / "scene.png"
    photo = Image.new("RGB", (640, 480), "white")
    photo.paste(Image.new("RGB", (320, 240), "blue"), (320, 0))
    photo.save(path)
    uploaded = store_file(embedded.orchestrator.store, path, scope="default")  # what the CLI does with a path
    run = finish(embedded, embedded.create_run("visual_reasoning", {"question": "What colour is the top right?",
                                                                     "images": [uploaded]}))
    values = embedded.output_values(run)
    context = embedded.context(run)
    report = get_workflow("visual_reasoning").write_output(values, tmp_path / "out", context)

    assert report["answer"] and report["plan"]["steps"]
    (image,) = report["images"]
    assert context.store.get(image, scope="default") == path.read_bytes()  # the upload, byte for byte
    assert 1 <= len(report["evidence"]) <= 8
    for item in report["evidence"]:
        crop = context.store.info(item["crop"], scope="default")
        assert crop.metadata["parent"] == image  # lineage: crop → original
        x0, y0, x1, y1 = crop.metadata["pixels"]
        size = load_image(io.BytesIO((tmp_path / "out" / item["crop_image"]).read_bytes()).getvalue()).size
        assert size == (x1 - x0, y1 - y0)  # cut at the original's 640x480 resolution
        assert isinstance(item["answer"], str) and item["question"]
    assert json.loads((tmp_path / "out" / "answer.json").read_text())["answer"] == report["answer"]
    lineage = {ref["id"]: ref for ref in values["artifacts"]}
    assert all(lineage[item["crop"]]["parent"] == image for item in report["evidence"])


@pytest.mark.timeout(300)
def test_run_prints_the_answer_and_where_the_images_are(embedded, tmp_path, monkeypatch):
    """``mgmflow run visual_reasoning`` / ``run chat`` print the answer itself, not only a folder name."""
    from click.testing import CliRunner

    from mgmflow.orchestrator.cli import main

    path = tmp_path / "scene.png"
    Image.new("RGB", (96, 64), "green").save(path)
    runner = CliRunner()
    looked = runner.invoke(main, ["run", "visual_reasoning", "--question", "What colour is it?", "--images",
                                  str(path), "--out", str(tmp_path / "vr"), "--quiet"])
    assert looked.exit_code == 0, looked.output
    report = json.loads((tmp_path / "vr" / "answer.json").read_text())
    assert report["answer"].strip() and report["answer"] in looked.output
    for index in range(1, len(report["evidence"]) + 1):
        assert str(tmp_path / "vr" / f"region-{index:02d}.png") in looked.output

    from testkit import script_mgm_answers

    script_mgm_answers(monkeypatch, "A kite. <h>a red kite in a blue sky</h>")  # MGM draws when it writes <h>
    said = runner.invoke(main, ["run", "chat", "--message", "Draw a red kite.", "--generate", "--steps", "2",
                                "--out", str(tmp_path / "chat"), "--quiet"])
    assert said.exit_code == 0, said.output
    reply = json.loads((tmp_path / "chat" / "reply.json").read_text())
    assert reply["files"] and str(tmp_path / "chat" / reply["files"][0]) in said.output
    assert reply["reply"] in said.output
