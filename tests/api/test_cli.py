"""`mgmflow submit`, `mgmflow models` and `mgmflow serve`'s checks, through the real click entry point."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from testkit import free_port

from orchestrator.cli import main

pytestmark = pytest.mark.timeout(120)


def test_submit_sends_a_batch_and_downloads_its_results(live_server, tmp_path):
    batch = tmp_path / "inputs.jsonl"
    batch.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "results"
    result = CliRunner().invoke(main, ["submit", str(batch), "--workflow", "echo", "--server", live_server.url,
                                       "--concurrency", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "batch success" in result.output
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["output"]["answer"] for row in rows] == [f"LINE {i}" for i in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".results-")]  # no staging left behind


def test_submit_errors_are_one_line(live_server, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["submit", str(tmp_path / "nope.jsonl"), "-w", "echo"])
    assert missing.exit_code == 2 and "not found" in missing.output and "Traceback" not in missing.output

    batch = tmp_path / "inputs.jsonl"
    batch.write_text('{"text": "x"}\n')
    port = free_port()  # nothing listens there
    down = runner.invoke(main, ["submit", str(batch), "-w", "echo", "--server", f"http://127.0.0.1:{port}"])
    assert down.exit_code == 2 and "cannot reach the mgmflow server" in down.output

    unknown = runner.invoke(main, ["submit", str(batch), "-w", "nope", "--server", live_server.url,
                                   "--out", str(tmp_path / "never")])
    assert unknown.exit_code == 2 and "unknown workflow" in unknown.output
    assert not (tmp_path / "never").exists()


def test_models_lists_presets_and_where_weights_go():
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("mini-gemini") and "mgm-7b-hd" in line for line in lines)
    assert any(line.startswith("diffusion") and "sdxl-base" in line for line in lines)


def test_serve_says_when_the_broker_is_unreachable(monkeypatch):
    monkeypatch.setenv("MGMFLOW_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port())])
    assert result.exit_code == 2 and "cannot reach the broker" in result.output


def test_serve_workers_need_a_broker(monkeypatch):
    monkeypatch.delenv("MGMFLOW_BROKER_URL", raising=False)
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--workers", "2"])
    assert result.exit_code == 2 and "--workers above 1 needs MGMFLOW_BROKER_URL" in result.output


def test_submit_uploads_local_images_and_sends_their_ids(live_server, tmp_path):
    """The server reads no path: `mgmflow submit` uploads the images a batch file names (relative to the file)."""
    from PIL import Image

    Image.new("RGB", (24, 16), "red").save(tmp_path / "red.png")
    batch = tmp_path / "questions.jsonl"
    batch.write_text('{"question": "what colour?", "images": ["red.png"]}\n')
    from orchestrator.api.client import ApiClient

    client = ApiClient(live_server.url)
    (item,) = [json.loads(line) for line in client._with_uploads(batch, "visual_reasoning").decode().splitlines()]
    (artifact_id,) = item["images"]
    uploaded = client.request("GET", f"/artifacts/{artifact_id}").json()
    assert uploaded["metadata"]["width"] == 24 and uploaded["metadata"]["filename"] == "red.png"


def test_run_uploads_image_paths_before_it_submits(api_env, tmp_path):
    """`mgmflow run chat --images PATH`: the file becomes an artifact of the CLI's scope; the input holds its id."""
    from PIL import Image

    from orchestrator.cli import _upload_local_files
    from orchestrator.workflow import get_workflow
    from workers.artifacts import open_store
    from workers.settings import Settings

    Image.new("RGB", (20, 10), "blue").save(tmp_path / "blue.png")
    settings = Settings()
    given = _upload_local_files(get_workflow("chat"), {"message": "hi", "images": [str(tmp_path / "blue.png")]},
                                settings)
    (artifact_id,) = given["images"]
    assert open_store(settings).get(artifact_id, scope="default") == (tmp_path / "blue.png").read_bytes()
    get_workflow("chat").validate_input(given)
