"""A story run over HTTP gives the storyboard the CLI gives: a zip with manifest, PNGs, index.html, contact sheet."""

from __future__ import annotations

import io
import json
import zipfile

import pytest
from click.testing import CliRunner
from testkit import wait_for

from mgmflow.orchestrator.cli import main

pytestmark = pytest.mark.timeout(600)

STORY = {"premise": "A fox finds a brass key in the snow.", "pages": 2, "seed": 11, "rounds": 1, "steps": 2}


def test_a_story_run_over_http_offers_the_storyboard_the_cli_writes(client, tmp_path):
    run = client.post("/runs", json={"assistant_id": "story", "input": STORY}).json()
    early = client.get(f"/threads/{run['thread_id']}/runs/{run['run_id']}/output")
    done = wait_for(lambda: (r := client.get(f"/runs/{run['run_id']}").json())["status"]
                    in ("success", "error") and r, timeout=500)
    assert done["status"] == "success", done
    if early.status_code != 200:  # asked before the end: not there yet, and said so
        assert early.status_code == 409 and early.json()["code"] == "no_output"
    assert done["output_url"] == f"/threads/{run['thread_id']}/runs/{run['run_id']}/output"

    response = client.get(done["output_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert f"story-{run['run_id']}.zip" in response.headers["content-disposition"]
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    manifest = json.loads(archive.read("manifest.json"))
    assert len(manifest["pages"]) == 2 and {"index.html", "contact-sheet.png"} <= set(archive.namelist())
    assert client.get(done["output_url"]).content == response.content  # the same run, the same bytes

    # The CLI, with the same flags, writes the same storyboard: the same pages, byte for byte.
    flags = [part for key, value in STORY.items() for part in (f"--{key}", str(value))]
    result = CliRunner().invoke(main, ["run", "story", *flags, "--out", str(tmp_path / "cli"), "--quiet"])
    assert result.exit_code == 0, result.output
    cli_manifest = json.loads((tmp_path / "cli" / "manifest.json").read_text())
    assert [page["image"] for page in cli_manifest["pages"]] == [page["image"] for page in manifest["pages"]]
    for page in manifest["pages"]:
        assert archive.read(page["image"]) == (tmp_path / "cli" / page["image"]).read_bytes()


def test_runs_without_files_say_so(client):
    run = client.post("/runs", json={"assistant_id": "echo", "input": {"text": "hi"}}).json()
    record = wait_for(lambda: (r := client.get(f"/runs/{run['run_id']}").json())["status"] == "success" and r)
    assert record["output_url"] is None
    missing = client.get(f"/threads/{record['thread_id']}/runs/{record['run_id']}/output")
    assert missing.status_code == 404 and missing.json()["code"] == "no_output"
    other_thread = client.get(f"/threads/not-its-thread/runs/{record['run_id']}/output")
    assert other_thread.status_code == 404
