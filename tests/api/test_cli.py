"""`mgmflow submit`, `mgmflow models` and `mgmflow serve`'s checks, through the real click entry point."""

from __future__ import annotations

import json
import os
import re

import pytest
from click.testing import CliRunner
from testkit import free_port

from mgmflow.orchestrator.cli import main

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
    # Presets carry the names the other commands take; tiny ones are built on first use, never "missing".
    rows = [re.split(r"\s{2,}", line) for line in lines]
    tiny = [row for row in rows if row[1].startswith(("tiny", "small"))]
    assert {"tiny", "tiny-gemma", "tiny-hd", "small", "tiny-sd"} <= {row[1] for row in tiny}
    assert "tiny-llama" not in [row[1] for row in rows] and all("missing" not in row for row in tiny)


def test_serve_says_when_the_broker_is_unreachable(monkeypatch):
    monkeypatch.setenv("MGMFLOW_BROKER_URL", f"redis://127.0.0.1:{free_port()}/0")
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port())])
    assert result.exit_code == 2 and "cannot reach the broker" in result.output


def test_serve_workers_need_a_broker(monkeypatch):
    monkeypatch.delenv("MGMFLOW_BROKER_URL", raising=False)
    result = CliRunner().invoke(main, ["serve", "--port", str(free_port()), "--workers", "2"])
    assert result.exit_code == 2 and "--workers above 1 needs MGMFLOW_BROKER_URL" in result.output


def test_bad_arguments_fail_in_one_line_before_any_model_loads(tmp_path):
    """A missing image, folder, LoRA or run, or a broker that does not answer: one line naming it, at once."""
    import subprocess
    import sys

    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    (tmp_path / "photo.png").write_bytes(b"")
    missing = tmp_path / "missing"
    broker = f"redis://127.0.0.1:{free_port()}/0"
    cases = [
        (["generate", "--prompt", "x", "--out", f"{missing}/page.png"], f"the folder of --out does not exist: {missing}"),
        (["generate", "--prompt", "x", "--lora", f"{missing}.safetensors:0.5", "--out", f"{tmp_path}/a.png"],
         f"error: LoRA file not found: {missing}.safetensors"),
        (["edit", "--image", f"{missing}.png", "--instruction", "red", "--out", f"{tmp_path}/b.png"],
         f"--image {missing}.png: image file not found"),
        (["edit", "--image", f"{tmp_path}/corrupt.png", "--instruction", "red", "--out", f"{tmp_path}/c.png"],
         f"{tmp_path}/corrupt.png: not a readable image"),
        (["chat", "--image", f"{tmp_path}/photo.png", "what is it?"], f"{tmp_path}/photo.png: image is empty"),
        (["resume", "no-such-run"], "run 'no-such-run' not found"),
        (["cancel", "no-such-run"], "run 'no-such-run' not found"),
        (["run", "story", "--premise", "a fox", "--pages", "1", "--broker", broker, "--out", f"{tmp_path}/s"],
         "cannot reach the broker at redis://127.0.0.1"),
    ]
    script = f"""
import json, sys
from click.testing import CliRunner
from mgmflow.orchestrator.cli import main
results = [(lambda r: (r.exit_code, r.output))(CliRunner().invoke(main, args)) for args, _ in {cases!r}]
print(json.dumps({{"results": results, "loaded": [m for m in ("diffusers", "transformers") if m in sys.modules]}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=os.environ | {"MGMFLOW_HOME": str(tmp_path / "home")})
    report = json.loads(done.stdout.splitlines()[-1])
    for (args, message), (code, output) in zip(cases, report["results"]):
        assert code == 2 and message in output, (args, output)
        assert "Traceback" not in output and "object at 0x" not in output, (args, output)
    assert report["loaded"] == []  # no model library was even imported
    assert not (tmp_path / "s").exists()


@pytest.mark.timeout(600)
def test_resume_changes_one_pages_prompt_or_all_explicitly(api_env, tmp_path):
    """After ``run story --approve``, ``resume --prompt KEY=TEXT`` replaces that page's prompt only; a bare prompt
    with several pages waiting is refused, and the run still waits."""
    runner = CliRunner()
    out = tmp_path / "board"
    started = runner.invoke(main, ["run", "story", "--premise", "A heron fishes at dawn.", "--pages", "2", "--seed",
                                   "5", "--rounds", "1", "--steps", "2", "--approve", "--out", str(out), "--quiet"])
    assert started.exit_code == 0, started.output
    run_id = re.search(r"waits for approval: mgmflow resume (\S+)", started.output).group(1)
    keys = re.findall(r"^\[([^\]]+)\]", started.output, re.M)
    assert len(keys) == 2

    ambiguous = runner.invoke(main, ["resume", run_id, "--prompt", "a heron, woodcut"])
    assert ambiguous.exit_code == 2 and all(key in ambiguous.output for key in keys)
    unknown = runner.invoke(main, ["resume", run_id, "--prompt", "page-99=a heron"])
    assert unknown.exit_code == 2 and "KEY=TEXT" in unknown.output

    resumed = runner.invoke(main, ["resume", run_id, "--prompt", f"{keys[1]}=a grey heron at dawn, woodcut",
                                   "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    pages = json.loads((out / "manifest.json").read_text())["pages"]
    assert pages[1]["prompt"] == "a grey heron at dawn, woodcut"
    assert pages[0]["prompt"] != "a grey heron at dawn, woodcut"


def test_submit_refuses_to_replace_a_folder_it_did_not_write(live_server, tmp_path):
    batch = tmp_path / "inputs.jsonl"
    batch.write_text('{"text": "x"}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    result = CliRunner().invoke(main, ["submit", str(batch), "-w", "echo", "--server", live_server.url,
                                       "--out", str(mine)])
    assert result.exit_code == 2 and "not empty" in result.output, result.output
    assert (mine / "thesis.tex").read_text() == "years of work" and len(list(mine.iterdir())) == 1
    # An earlier download (or an empty folder) is replaced.
    out = tmp_path / "results"
    for _ in range(2):
        result = CliRunner().invoke(main, ["submit", str(batch), "-w", "echo", "--server", live_server.url,
                                           "--out", str(out)])
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("batch_id", "artifact_id", "index"), [
    ("../../escaped", "aaaaaaaaaaaaaaaaaaaaaa", 0),
    ("b1", "../../../escaped", 0),
    ("b1", "aaaaaaaaaaaaaaaaaaaaaa", "../x"),
])
def test_submit_refuses_server_ids_that_are_not_ids(tmp_path, monkeypatch, batch_id, artifact_id, index):
    """A hostile (or broken) server names files: ids that are not plain ids write nothing anywhere."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    run = {"status": "success"}
    answers = {
        "/batches/upload": {"batch_id": batch_id, "total": 1, "done": 0, "counts": {}, "run": run},
        f"/batches/{batch_id}": {"batch_id": batch_id, "total": 1, "done": 1, "counts": {"success": 1}, "run": run},
        f"/batches/{batch_id}/results": [{"index": index, "status": "success", "run_id": "r",
                                          "output": {"artifacts": [{"id": artifact_id, "kind": "image"}]}}],
    }

    class Hostile(BaseHTTPRequestHandler):
        def _answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = self.path.split("?")[0]
            body = json.dumps(answers[path]).encode() if path in answers else b"\x89PNG fake"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    batch = work / "inputs.jsonl"
    batch.write_text('{"text": "x"}\n')
    try:
        result = CliRunner().invoke(main, ["submit", str(batch), "-w", "echo", "--server",
                                           f"http://127.0.0.1:{server.server_port}"])
    finally:
        server.shutdown()
    assert result.exit_code == 2 and "not a valid" in result.output, result.output
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "a", "a/b", "a/b/c", "a/b/c/inputs.jsonl"]


@pytest.mark.timeout(600)
def test_submit_downloads_each_storys_storyboard(live_server, tmp_path):
    """``submit --out`` gives every story item the folder the CLI would write: manifest, pages, index.html."""
    batch = tmp_path / "stories.jsonl"
    batch.write_text("".join(json.dumps({"premise": premise, "pages": 1, "seed": 3, "rounds": 1, "steps": 2}) + "\n"
                             for premise in ("A crow keeps a secret.", "A snail crosses a road.")))
    out = tmp_path / "boards"
    result = CliRunner().invoke(main, ["submit", str(batch), "-w", "story", "--server", live_server.url,
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    for index in range(2):
        folder = out / f"item-{index:05d}"
        manifest = json.loads((folder / "manifest.json").read_text())
        assert (folder / "index.html").is_file() and (folder / "contact-sheet.png").is_file()
        assert [(folder / page["image"]).read_bytes()[:8] for page in manifest["pages"]] == [b"\x89PNG\r\n\x1a\n"]


def test_a_hostile_output_zip_writes_nothing_outside_its_folder(tmp_path):
    import io
    import zipfile

    from mgmflow.orchestrator.api.client import ServerError, _extract

    for name in ("../escaped.txt", "/etc/escaped.txt", "a/../../escaped.txt"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("manifest.json", "{}")
            archive.writestr(name, "x")
        with pytest.raises(ServerError, match="not a file inside its folder"):
            _extract(buffer.getvalue(), tmp_path / "item" / "inner")
        assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "item" / "escaped.txt").exists()
    with pytest.raises(ServerError, match="not a zip"):
        _extract(b"<html>", tmp_path / "other")


def test_submit_uploads_local_images_and_sends_their_ids(live_server, tmp_path):
    """The server reads no path: `mgmflow submit` uploads the images a batch file names (relative to the file)."""
    from PIL import Image

    Image.new("RGB", (24, 16), "red").save(tmp_path / "red.png")
    batch = tmp_path / "questions.jsonl"
    batch.write_text('{"question": "what colour?", "images": ["red.png"]}\n')
    from mgmflow.orchestrator.api.client import ApiClient

    client = ApiClient(live_server.url)
    (item,) = [json.loads(line) for line in client._with_uploads(batch, "visual_reasoning").decode().splitlines()]
    (artifact_id,) = item["images"]
    uploaded = client.request("GET", f"/artifacts/{artifact_id}").json()
    assert uploaded["metadata"]["width"] == 24 and uploaded["metadata"]["filename"] == "red.png"


def test_run_uploads_image_paths_before_it_submits(api_env, tmp_path):
    """`mgmflow run chat --images PATH`: the file becomes an artifact of the CLI's scope; the input holds its id."""
    from PIL import Image

    from mgmflow.orchestrator.cli import _upload_local_files
    from mgmflow.orchestrator.workflow import get_workflow
    from mgmflow.workers.artifacts import open_store
    from mgmflow.workers.settings import Settings

    Image.new("RGB", (20, 10), "blue").save(tmp_path / "blue.png")
    settings = Settings()
    given = _upload_local_files(get_workflow("chat"), {"message": "hi", "images": [str(tmp_path / "blue.png")]},
                                settings)
    (artifact_id,) = given["images"]
    assert open_store(settings).get(artifact_id, scope="default") == (tmp_path / "blue.png").read_bytes()
    get_workflow("chat").validate_input(given)
