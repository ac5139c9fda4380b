"""An embedded `mgmflow serve` killed during a run, then started again on the same home: the new server picks the
run up (the dead process held its lease and had its steps in memory), finishes it and fires its webhook."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from fault_support import FaultLog, stopped
from testkit import free_port, wait_for

MGMFLOW = str(Path(sys.executable).parent / "mgmflow")
pytestmark = pytest.mark.timeout(400)


class Hook:
    """A webhook endpoint keeping the bodies it receives."""

    def __init__(self):
        bodies = self.bodies = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://127.0.0.1:{self.server.server_port}"  # the webhook allow-list entry: scheme, host, port
        self.url = f"{self.origin}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _serve(home: Path, port: int, log: Path, hook: Hook, **extra) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MGMFLOW_")}
    env.update(MGMFLOW_HOME=str(home), MGMFLOW_WEBHOOK_HOSTS=hook.origin, OMP_NUM_THREADS="1", **extra)
    process = subprocess.Popen([MGMFLOW, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                               stdout=log.open("ab"), stderr=subprocess.STDOUT)

    def up():
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 180, "the server", interval=0.2)
    return process


def test_a_restarted_embedded_server_finishes_the_run_its_predecessor_was_driving(tmp_path):
    home, port, faults, hook = tmp_path / "home", free_port(), FaultLog(tmp_path), Hook()
    first = _serve(home, port, tmp_path / "serve-1.log", hook, **faults.env("driver.parked=stop@2"))
    try:
        run = httpx.post(f"http://127.0.0.1:{port}/runs", timeout=30, json={
            "assistant_id": "story", "webhook": hook.url,
            "input": {"premise": "A lighthouse keeper befriends a whale.", "pages": 2, "seed": 5, "rounds": 1,
                      "steps": 2}}).json()
        pid, _ = faults.wait("driver.parked", check=lambda: first.poll() is None or pytest.fail("server died"))
        wait_for(lambda: stopped(pid), 10, "the server to stop")
        first.send_signal(signal.SIGKILL)  # mid-run: its lease is held, its steps queued in its memory
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    second = _serve(home, port, tmp_path / "serve-2.log", hook)
    try:
        wait_for(lambda: hook.bodies, 240, "the run's webhook")
        (body,) = hook.bodies
        assert body["run_id"] == run["run_id"] and body["status"] == "success", body
        state = httpx.get(f"http://127.0.0.1:{port}/threads/{run['thread_id']}/state", timeout=30).json()
        assert sorted(state["values"]["chosen"]) == ["page-01", "page-02"]
    finally:
        second.kill()
        second.wait()
