"""The story workflow with scripted model outputs: input limits, scene chunks, the outlier loop, the storyboard."""

from __future__ import annotations

import io
import json

import pytest
from wf_helpers import ScriptedClient, drive, scripted_context
from PIL import Image

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.budget import budget_for
from mgmflow.orchestrator.seeds import derive_seed
from mgmflow.orchestrator.workflow import get_workflow
from mgmflow.workflows import story
from mgmflow.workflows.storyboard import MANIFEST, write_storyboard


def png(color: tuple[int, int, int], size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


# Input limits: the workflow's own model gives the typed error the CLI and the API show.
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"premise": ""}, "premise"),
        ({"premise": "   \n"}, "the premise is empty"),
        ({"premise": "x" * (8 * 1024 + 1)}, "8 KB"),
        ({"pages": 0}, "pages"),
        ({"pages": 65}, "pages"),
        ({"rounds": 0}, "rounds"),
        ({"drafts": 0}, "drafts"),
        ({"width": 100}, "width"),
    ],
)
def test_bad_input_is_a_typed_error(change, message):
    with pytest.raises(InvalidInputError, match=message):
        get_workflow("story").validate_input({"premise": "a fox", **change})


def test_input_limits_accept_the_edges():
    workflow = get_workflow("story")
    assert workflow.validate_input({"premise": "x" * 8 * 1024, "pages": 64}).pages == 64
    assert workflow.validate_input({"premise": "é", "pages": 1}).premise == "é"
    # Without --seed a seed is drawn once and kept in the run's input, so a resumed run keeps it.
    first, second = (workflow.validate_input({"premise": "a fox"}).seed for _ in range(2))
    assert first != second


def test_scene_chunks_are_fixed_by_page():
    assert story.page_chunks(1) == [(1, 1)]
    assert story.page_chunks(4) == [(1, 4)]
    assert story.page_chunks(10) == [(1, 4), (5, 8), (9, 10)]
    assert sum(last - first + 1 for first, last in story.page_chunks(64)) == 64
    # As many scenes per request as the model's context leaves room for in one answer.
    assert story.scenes_per_request(budget_for("tiny")) == 1 and story.scenes_per_request(budget_for("mgm-7b-hd")) == 2
    assert story.page_chunks(5, 2) == [(1, 2), (3, 4), (5, 5)]


def test_clip_keeps_task_messages_small():
    text = "\ufffd" * 2000  # a random model's bytes: 6 bytes each as JSON
    clipped = story.clip(text, 600)
    assert len(json.dumps(clipped)) <= 600 and clipped.endswith("…")
    assert story.clip("short", 600) == "short"


def story_script(store, critiques: dict[tuple[str, int], tuple[int, str]]):
    """Scenes and sheet from the JSON schema's sizes, prompts echo the page, images are real PNGs in ``store``;
    critiques come from ``critiques[(page key, round)]`` (default: a failing 3)."""
    colors = iter((value, 40, 200 - value) for value in range(0, 250, 3))

    def script(kind: str, payload: dict, step: str) -> dict:
        if step.startswith("scenes:"):
            first, last = map(int, step.split(":")[1].split("-"))
            scenes = [{"title": f"Scene {n}", "description": f"the fox on page {n}", "characters": ["Fox"]}
                      for n in range(first, last + 1)]
            return {"text": json.dumps({"scenes": scenes})}
        if step == "sheet":
            sheet = {"characters": [{"name": "Fox", "description": "a small red fox"}], "style": "watercolour"}
            return {"text": json.dumps(sheet)}
        if kind == "vlm.write_prompt":
            return {"text": "", "image_prompt": f"prompt for {step.split(':')[1]}"}
        if kind == "vlm.chat":  # pages:<key>:r<round>:d<draft>:critique
            parts = step.split(":")
            score, verdict = critiques.get((parts[1], int(parts[2][1:])), (3, "refine"))
            return {"text": json.dumps({"score": score, "verdict": verdict, "feedback": f"fix {parts[1]}"})}
        artifact = store.put(png(next(colors)), scope="test", media_type="image/png", metadata={"step": step})
        return {"images": [{"artifact": artifact.id, "seed": payload["seeds"][0]}], "model": "tiny"}

    return script


def run_story(store, critiques, **input_):
    client = ScriptedClient(story_script(store, critiques))
    state = story.StoryInput(premise="A fox finds a lantern.", seed=11, **input_).model_dump(mode="json")
    values = drive(story.build_graph(), state, client, context=scripted_context(client, store=store))
    return values, client


def test_story_regenerates_and_edits_outliers_within_the_budget(store):
    # page 1 is accepted at once; page 2 is close (edit), then accepted; page 3 never passes (budget spent).
    critiques = {("page-01", 0): (9, "accept"), ("page-02", 0): (6, "edit"), ("page-02", 1): (8, "accept")}
    values, client = run_story(store, critiques, pages=3, rounds=2, **{"width": 64, "height": 64})
    routes = {(entry["item"], entry["round"]): entry["route"] for entry in values["scores"]}
    assert routes == {("page-01", 1): "accept", ("page-02", 1): "edit", ("page-02", 2): "accept",
                      ("page-03", 1): "refine", ("page-03", 2): "exhausted"}
    kinds = [(task_id.split(":", 1)[1], kind) for task_id, kind, _ in client.submitted]
    assert ("pages:page-02:r1:d0", "edit.instruct") in kinds  # the close page was edited, not redrawn
    assert ("pages:page-03:r1:d0", "diffusion.text2img") in kinds  # the far one was re-prompted and redrawn
    # One scene per request (a 2,048-token context leaves room for one scene's answer); every seed derived from
    # (seed, page, round, draft).
    assert [k for k in kinds if k[0].startswith("scenes")] == [(f"scenes:{n}-{n}", "vlm.chat") for n in (1, 2, 3)]
    draws = {task_id.split(":", 1)[1]: payload for task_id, kind, payload in client.submitted
             if kind in ("diffusion.text2img", "edit.instruct")}
    assert draws["pages:page-03:r1:d0"]["seeds"] == [derive_seed(11, 2, 1, 0)]
    assert draws["pages:page-01:r0:d0"]["width"] == 64 and draws["pages:page-02:r1:d0"]["exclusive"] is True
    # No task message carries the premise inline: it travels as an artifact.
    scene_payload = next(p for t, _, p in client.submitted if ":scenes:" in t)
    assert "messages" not in scene_payload
    staged = json.loads(store.get(scene_payload["messages_artifact"], scope="test"))
    assert "A fox finds a lantern." in staged[0]["text"]


def test_storyboard_manifest_lists_every_page_in_order(store, tmp_path):
    values, _ = run_story(store, {("page-02", 0): (6, "edit"), ("page-02", 1): (8, "accept")}, pages=3, rounds=2)
    pages = story.storyboard_pages(values)
    assert [page["page"] for page in pages] == [1, 2, 3]
    edited = pages[1]
    assert [ref["tool"] for ref in edited["lineage"]] == ["edit.instruct", "diffusion.text2img"]
    assert edited["lineage"][0]["parent"] == edited["lineage"][1]["id"]
    assert edited["scores"] == [6, 8] and edited["prompt"] == "prompt for page-02"
    assert edited["lineage"][0]["critique"]["verdict"] == "accept"

    path = write_storyboard(tmp_path / "board", pages=pages, header={"premise": "p", "title": "T"},
                            read_png=lambda artifact_id: store.get(artifact_id, scope="test"))
    manifest = json.loads(path.read_text())
    assert path.name == MANIFEST
    for entry, page in zip(manifest["pages"], pages):
        assert (tmp_path / "board" / entry["image"]).read_bytes() == store.get(page["artifact_id"], scope="test")
        assert entry["seed"] == page["seed"] and entry["prompt"] == page["prompt"]
    sheet = Image.open(tmp_path / "board" / manifest["contact_sheet"])
    assert sheet.size == (3 * 32, 32 + 16)  # three 32 px pages in one row, with their labels
    index = (tmp_path / "board" / manifest["index"]).read_text()
    assert all(f'src="{entry["image"]}"' in index for entry in manifest["pages"])
    assert not list((tmp_path / "board").glob(".*partial"))


def test_storyboard_escapes_model_text(tmp_path):
    page = {"page": 1, "artifact_id": "a", "scene": "<script>x</script>", "prompt": "<b>", "seed": 1,
            "scores": [3.0], "lineage": []}
    write_storyboard(tmp_path, pages=[page], header={"premise": "<img onerror=1>"}, read_png=lambda _: png((1, 2, 3)))
    index = (tmp_path / "index.html").read_text()
    assert "<script>" not in index and "<img onerror" not in index and "&lt;script&gt;" in index


def test_story_stops_for_approval_and_draws_the_edited_prompt(store):
    client = ScriptedClient(story_script(store, {("page-01", 0): (9, "accept"), ("page-02", 0): (9, "accept")}))
    state = story.StoryInput(premise="A fox.", pages=2, seed=3, rounds=1).model_dump(mode="json")
    answer = {"approved": True, "prompts": {"page-02": "a fox under the moon, ink drawing"}}
    values = drive(story.build_graph(), state, client, context=scripted_context(client, store=store, approve=True),
                   answers=[answer])
    drawn = {task_id.split(":", 1)[1]: payload["prompts"][0] for task_id, kind, payload in client.submitted
             if kind == "diffusion.text2img"}
    assert drawn == {"pages:page-01:r0:d0": "prompt for page-01",
                     "pages:page-02:r0:d0": "a fox under the moon, ink drawing"}
    assert [page["prompt"] for page in story.storyboard_pages(values)] == [
        "prompt for page-01", "a fox under the moon, ink drawing"]


def test_a_rejected_storyboard_is_an_empty_but_valid_folder(store, tmp_path):
    client = ScriptedClient(story_script(store, {}))
    state = story.StoryInput(premise="A fox.", pages=2, seed=3, rounds=1).model_dump(mode="json")
    values = drive(story.build_graph(), state, client, context=scripted_context(client, store=store, approve=True),
                   answers=[{"approved": False}])
    assert not [kind for _, kind, _ in client.submitted if kind == "diffusion.text2img"]  # nothing was drawn
    path = write_storyboard(tmp_path, pages=story.storyboard_pages(values), header={"premise": "A fox."},
                            read_png=lambda artifact_id: store.get(artifact_id, scope="test"))
    assert json.loads(path.read_text())["pages"] == [] and (tmp_path / "contact-sheet.png").is_file()
