"""The story workflow end to end on the tiny presets: embedded, distributed (real redis-server and a real
`mgmflow worker` subprocess), and reproducible to the byte across both."""

from __future__ import annotations

import hashlib
import json

import pytest
from wf_helpers import TINY, finish

from mgmflow.orchestrator.workflow import get_workflow

STORY = {"premise": "A small fox finds a glowing lantern in a snowy forest and follows its light home.",
         "pages": 2, "seed": 1234, "rounds": 1, **TINY}


def storyboard(service, run, out_dir) -> dict:
    values = service.output_values(run)
    return get_workflow("story").write_output(values, out_dir, service.context(run))


def page_digests(out_dir, manifest) -> list[str]:
    return [hashlib.sha256((out_dir / page["image"]).read_bytes()).hexdigest() for page in manifest["pages"]]


@pytest.fixture(scope="module")
def reference(embedded, tmp_path_factory):
    """The story run once, embedded: its run and the digests of its pages (the reference of both tests)."""
    out = tmp_path_factory.mktemp("reference")
    run = finish(embedded, embedded.create_run("story", STORY))
    manifest = storyboard(embedded, run, out)
    return {"run": run, "out": out, "manifest": manifest, "digests": page_digests(out, manifest)}


@pytest.mark.timeout(400)
def test_story_embedded_writes_a_storyboard_and_repeats_it_byte_for_byte(embedded, reference, tmp_path):
    out, manifest = reference["out"], reference["manifest"]
    # The folder: a manifest listing every page in order, the PNGs, the page, the contact sheet.
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert [page["page"] for page in manifest["pages"]] == [1, 2]
    for page in manifest["pages"]:
        assert (out / page["image"]).read_bytes().startswith(b"\x89PNG")
        assert page["prompt"] and isinstance(page["seed"], int) and len(page["scores"]) == 1
        assert page["lineage"][0]["id"] == page["artifact_id"] and page["lineage"][-1]["tool"] == "diffusion.text2img"
    assert (out / "index.html").is_file() and (out / "contact-sheet.png").is_file()

    # The same premise, pages and seed again, this time beside another story whose draws arrive at the workers
    # at the same moment (and would share dynamic batches): a new run, new tasks, the same bytes.
    second = embedded.create_run("story", STORY)
    other = embedded.create_run("story", {**STORY, "seed": 99})
    second, other = finish(embedded, second), finish(embedded, other)
    assert second.run_id != reference["run"].run_id
    assert page_digests(tmp_path, storyboard(embedded, second, tmp_path)) == reference["digests"]


@pytest.mark.services
@pytest.mark.timeout(500)
def test_distributed_story_matches_embedded_beside_the_other_workflows(services, reference, tmp_path):
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.workers.artifacts import open_store

    redis = services.redis()
    services.worker(redis, "vlm,diffusion,edit,orchestrator").wait_ready()
    service = RunService(services.settings(redis))
    # The other workflows run beside the story on the same worker: a batch of chat turns (its children wake
    # it through the orchestration queue) and a visual question.
    image = open_store(services.settings(redis)).put(_png(), scope="default", media_type="image/png", metadata={})
    story = service.create_run("story", STORY)
    batch = service.create_run("batch", {"workflow": "chat", "concurrency": 2, "items": [
        {"message": "Draw a red boat.", **TINY}, {"message": "hello"}, {"message": "edit the last picture"}]})
    question = service.create_run("visual_reasoning", {"question": "What is it?", "images": [image.id]})

    manifest = storyboard(service, finish(service, story), tmp_path / "d")
    assert page_digests(tmp_path / "d", manifest) == reference["digests"]
    report = get_workflow("batch").write_output(service.output_values(finish(service, batch)), tmp_path / "b",
                                                 None)
    assert report["summary"] == {"success": 3}
    answer = service.output_values(finish(service, question))
    assert answer["answer"] and answer["regions"] and all(region["crop"] for region in answer["regions"])


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), "green").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.timeout(1260)
def test_a_64_page_story_of_two_rounds_completes_and_shows_pages_as_they_finish(tmp_path, mgmflow_home):
    """Stories of every length fit the model (issue 14): `mgmflow run story --pages 64 --rounds 2` on the default
    tiny preset, embedded (before the prompt budgets its sheet prompt outgrew the 2,048-token context at ~28
    pages). The cheapest settings that still run 64 pages × 2 rounds: 64-pixel pages of one denoising step, and
    dynamic VLM batches wide enough for every page at once. The progress prints each page as it finishes."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    home, out = tmp_path / "home", tmp_path / "board"
    home.mkdir()
    (mgmflow_home / "presets").mkdir(exist_ok=True)
    (home / "presets").symlink_to(mgmflow_home / "presets")  # shared, not rebuilt
    env = {**os.environ, "MGMFLOW_HOME": str(home), "OMP_NUM_THREADS": "1", "MGMFLOW_VLM_BATCH_SIZE": "64",
           "MGMFLOW_EMBEDDED_CONCURRENCY": "96"}
    command = [str(Path(sys.executable).parent / "mgmflow"), "run", "story", "--premise", STORY["premise"],
               "--pages", "64", "--seed", "3", "--rounds", "2", "--width", "64", "--height", "64", "--steps", "1",
               "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [page["page"] for page in manifest["pages"]] == list(range(1, 65))
    for page in manifest["pages"]:
        assert (out / page["image"]).read_bytes()[:4] == b"\x89PNG"
        assert 1 <= len(page["scores"]) <= 2 and page["scene"] and page["prompt"]
    finished = re.findall(r"^page-(\d\d) (?:accepted|exhausted): score", result.stderr, re.MULTILINE)
    assert sorted(int(number) for number in finished) == list(range(1, 65))
