"""`mgmflow serve` bounds what idle and slow clients hold (issue 12): connections that send no complete headers are
closed after the header deadline (default 10 s), a body that stops arriving is answered 408, and past the
connection cap requests get 503 at once instead of piling up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from testkit import free_port, wait_for

pytestmark = pytest.mark.timeout(120)

MGMFLOW = str(Path(sys.executable).parent / "mgmflow")
HEADER_TIMEOUT_S = 10.0  # ApiSettings' default


@pytest.fixture
def serve(tmp_path):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MGMFLOW_")},
           "MGMFLOW_HOME": str(tmp_path / "home"), "MGMFLOW_BODY_TIMEOUT_S": "2", "MGMFLOW_MAX_CONNECTIONS": "150"}
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen([MGMFLOW, "serve", "--port", str(port), "--log-level", "warning"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _status(url) == 200, timeout=60, interval=0.2, what="mgmflow serve")
        yield port, url
    finally:
        process.terminate()
        process.wait(20)


def _status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code
    except httpx.HTTPError:
        return None


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_slow_clients_are_cut_off(serve):
    port, url = serve
    opened = time.monotonic()
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    half = [socket.create_connection(("127.0.0.1", port)) for _ in range(60)]
    for sock in half:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    idle = silent + half
    assert _status(url) == 200  # 121 open connections: under the cap of 150

    # A body announced and never finished: 408 after the body deadline, and the connection is closed.
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow_body:
        slow_body.sendall(b"POST /runs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"assistant_id\": ")
        started = time.monotonic()
        answer = b""
        while chunk := slow_body.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and 1.5 < time.monotonic() - started < 10

    # Past the cap: refused at once, not queued.
    extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    time.sleep(0.5)
    assert _status(url) == 503

    # Every connection without complete headers is closed by the header deadline (not before).
    for sock in idle + extra:
        sock.setblocking(False)
    assert not any(_closed(sock) for sock in idle[:5])
    wait_for(lambda: all(_closed(sock) for sock in idle + extra), timeout=HEADER_TIMEOUT_S + 10, interval=0.5,
             what="the idle connections to be closed")
    assert time.monotonic() - opened >= HEADER_TIMEOUT_S - 0.5
    assert _status(url) == 200
    for sock in idle + extra:
        sock.close()
