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
