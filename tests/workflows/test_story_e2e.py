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


# The cheapest settings that still run 64 pages × 2 rounds: dynamic VLM batches wide enough for every page at once
# (and, embedded, threads enough to fill them).
WIDE_BATCHES = {"vlm_batch_size": 64, "embedded_concurrency": 96}
# The reliability defaults users run on the tiny presets, not the suite's short leases: a 64-wide batch on two
# loaded cores may outlast those, and a lapsed lease would start a step's work twice.
USERS_RELIABILITY = {"lease_s": 10.0, "visibility_timeout_s": 15.0, "max_deliveries": 3, "oom_backoff_s": 5.0}


@pytest.mark.parametrize("where", ["embedded", pytest.param("distributed", marks=pytest.mark.services)])
@pytest.mark.timeout(1260)
def test_a_64_page_story_of_two_rounds_completes(where, request, private_home, tmp_path):
    """Stories of every length fit the model (issue 14): `mgmflow run story --pages 64 --rounds 2` on the default
    tiny preset (before the prompt budgets its sheet prompt outgrew the 2,048-token context at ~28 pages), the
    same command embedded and pointed at distributed workers. 64-pixel pages of one denoising step keep it cheap.
    Every step's work started once, and none is left queued or running. The progress prints each page as it
    finishes."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    settings = _long_story_settings(where, request, private_home)
    out = tmp_path / "board"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **{f"MGMFLOW_{k.upper()}": str(v) for k, v in settings.items()}}
    command = [str(Path(sys.executable).parent / "mgmflow"), "run", "story", "--premise", STORY["premise"],
               "--pages", "64", "--seed", "3", "--rounds", "2", "--width", "64", "--height", "64", "--steps", "1",
               "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [page["page"] for page in manifest["pages"]] == list(range(1, 65))
    for page in manifest["pages"]:
        with Image.open(out / page["image"]) as image:
            assert (image.format, image.size) == ("PNG", (64, 64))
            image.verify()
        assert 1 <= len(page["scores"]) <= 2 and page["scene"] and page["prompt"]
    finished = re.findall(r"^page-(\d\d) (?:accepted|exhausted): score", result.stderr, re.MULTILINE)
    assert sorted(int(number) for number in finished) == list(range(1, 65))
    steps = _steps(settings)
    assert steps
    assert {task_id: done for task_id, done in steps.items() if done != ("done", 1)} == {}


def _long_story_settings(where: str, request, home) -> dict:
    """The MGMFLOW_* settings of the long story's `mgmflow run`: embedded (in-process workers, SQLite), or a private
    redis-server served by worker processes shaped as docker-compose.yml deploys them (the VLM; diffusion and
    edits; orchestration), all on ``home``."""
    settings = {"home": home, **WIDE_BATCHES}
    if where == "embedded":
        return settings
    services = request.getfixturevalue("services")
    redis = services.redis()
    workers = [services.worker(redis, queues, **WIDE_BATCHES, **USERS_RELIABILITY)
               for queues in ("vlm", "diffusion,edit", "orchestrator")]
    for worker in workers:
        worker.wait_ready(240)
    return {**settings, **USERS_RELIABILITY, "broker_url": redis.url}


def _steps(settings: dict) -> dict[str, tuple[str, int]]:
    """Every recorded step (the home or the redis-server holds one run's): its status, and how many times its work
    started (counted by the workers where it starts)."""
    import sqlite3
    from contextlib import closing

    from mgmflow.workers.records import open_records, redis_client
    from mgmflow.workers.settings import Settings

    where = Settings(**settings)
    if where.embedded:
        with closing(sqlite3.connect(where.home / "tasks.sqlite")) as db:
            task_ids = [task_id for (task_id,) in db.execute("SELECT task_id FROM tasks")]
    else:
        task_ids = [key.removeprefix("mgmflow:task:")
                    for key in redis_client(where.records_url).scan_iter("mgmflow:task:*")]
    records = open_records(where)
    return {task_id: (record.status, record.executions) for task_id in task_ids
            for record in [records.get(task_id)]}
