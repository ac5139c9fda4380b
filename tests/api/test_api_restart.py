"""Distributed, with real parts: a redis-server, an orchestration worker and the API as subprocesses.

- The API is kill -9'd while runs are in flight and restarted: every run still completes and stays readable, and a
  stream resumed with Last-Event-ID continues exactly where it stopped.
- ``serve --workers 2``: two API processes share each key's rate limit (in Redis) and add up their metrics, each
  finished run counted once."""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from testkit import free_port, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.services]

ECHO_MAIN = str(Path(__file__).resolve().parent / "echo_main.py")
REDIS = shutil.which("redis-server")


@pytest.fixture
def deployment(tmp_path):
    if REDIS is None:
        pytest.skip("redis-server is not installed (scripts/dev.sh setup installs it)")
    redis_port = free_port()
    redis = subprocess.Popen([REDIS, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "MGMFLOW_HOME": str(tmp_path / "home"), "MGMFLOW_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("MGMFLOW_API_KEYS", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes = {"redis": redis}

    def start(name: str, *args: str, **more_env: str) -> subprocess.Popen:
        log = (logs / f"{name}.log").open("ab")
        # A session of its own: the kill at the end reaches the API processes `serve --workers` spawns.
        processes[name] = subprocess.Popen([sys.executable, ECHO_MAIN, *args], env={**env, **more_env}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
        return processes[name]

    api_port = free_port()
    url = f"http://127.0.0.1:{api_port}"

    def start_api(*args: str, **more_env: str) -> subprocess.Popen:
        process = start("api", "serve", "--port", str(api_port), "--log-level", "warning", *args, **more_env)
        wait_for(lambda: _healthy(url), timeout=60, interval=0.2)
        return process

    wait_for(lambda: _redis_up(redis_port), timeout=10)
    start("worker", "worker", "--queues", "orchestrator", "--concurrency", "8", "--name", "orch")
    start_api()
    yield {"url": url, "start_api": start_api, "processes": processes, "logs": logs}
    for name, process in processes.items():
        with contextlib.suppress(ProcessLookupError):
            process.kill() if name == "redis" else os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def _redis_up(port: int) -> bool:
    import redis

    try:
        return redis.Redis(port=port, socket_timeout=1).ping()
    except redis.RedisError:
        return False


def _read_events(http: httpx.Client, path: str, headers: dict, stop_after: int | None = None) -> list[dict]:
    events, current = [], {}
    try:
        with http.stream("GET", path, headers=headers) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    if not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        current[name] = value
                    continue
                if current:
                    events.append(current)
                    current = {}
                    if stop_after is not None and sum(e.get("event") == "progress" for e in events) >= stop_after:
                        return events
    except httpx.TransportError:
        pass  # the API died under the stream: what was read stays read
    return events


def test_api_killed_and_restarted_during_runs(deployment):
    url = deployment["url"]
    http = httpx.Client(base_url=url, timeout=30)
    body = {"assistant_id": "echo", "input": {"text": "survive", "steps": 10, "delay": 0.3}}
    runs = [http.post("/runs", json=body).json() for _ in range(6)]
    watched = runs[0]
    path = f"/threads/{watched['thread_id']}/runs/{watched['run_id']}/stream"

    # 1. Read the first progress events of one run, then kill -9 the API while every run is in flight.
    before = _read_events(http, path, {}, stop_after=3)
    assert sum(e.get("event") == "progress" for e in before) == 3
    deployment["processes"]["api"].send_signal(signal.SIGKILL)
    deployment["processes"]["api"].wait(10)
    with pytest.raises(httpx.TransportError):
        http.get("/healthz")

    # 2. Restart it; resume the stream after the last event seen.
    deployment["start_api"]()
    last_id = [e for e in before if "id" in e][-1]["id"]
    after = _read_events(http, path, {"Last-Event-ID": last_id})
    assert after[-1]["event"] == "end" and '"success"' in after[-1]["data"]
    done = [int(e["data"].split('"done": ')[1].split(",")[0]) for e in before + after if e.get("event") == "progress"]
    assert done == list(range(1, 11)), "the resumed stream must continue exactly where it stopped"
    ids = [e["id"] for e in before + after if "id" in e]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) and len(ids) == len(set(ids))

    # 3. Every run completed and is readable through the new API process.
    for run in runs:
        final = wait_for(lambda r=run: (x := http.get(f"/runs/{r['run_id']}").json())["status"] == "success" and x,
                           timeout=60)
        assert final["run_id"] == run["run_id"]
        assert http.get(f"/threads/{run['thread_id']}/state").json()["values"]["answer"] == "SURVIVE"
    assert len({r["run_id"] for r in http.get("/runs", params={"limit": 100}).json()}) == len(runs)


def _stop_api(deployment) -> None:
    api = deployment["processes"]["api"]
    os.killpg(api.pid, signal.SIGKILL)
    api.wait(10)


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample of the exposition text (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in metrics.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_api_processes_share_rate_limits_and_metrics(deployment):
    url = deployment["url"]
    _stop_api(deployment)
    # 1 request/s sustained and a burst of 40 per key: shared, the two processes admit 40 at once, not 80.
    deployment["start_api"]("--workers", "2", MGMFLOW_RATE_LIMIT_PER_SECOND="1", MGMFLOW_RATE_LIMIT_BURST="40")
    import psutil

    children = psutil.Process(deployment["processes"]["api"].pid).children()
    assert sum("spawn_main" in " ".join(child.cmdline()) for child in children) == 2  # beside multiprocessing's tracker

    # Separate buckets would admit 80 of these at once; the shared one admits 40, plus 1 per second they take.
    statuses, started = [], time.monotonic()
    for _ in range(60):
        with httpx.Client(base_url=url, timeout=10) as fresh:  # a new connection each: both processes answer
            statuses.append(fresh.get("/runs", params={"limit": 1}).status_code)
    admitted = statuses.count(200)
    assert statuses.count(429) == len(statuses) - admitted
    assert 40 <= admitted <= 40 + math.ceil(time.monotonic() - started) + 1

    # Metrics: every scrape, whichever process answers it, counts the requests of both.
    scrapes = []
    for _ in range(6):
        with httpx.Client(base_url=url, timeout=10) as fresh:
            scrapes.append(fresh.get("/metrics").text)
    refused = [_sample(text, "mgmflow_http_requests_total", method="GET", route="/runs", status="429")
               for text in scrapes]
    assert refused == [len(statuses) - admitted] * len(scrapes)


def test_api_processes_count_each_finished_run_once(deployment):
    url = deployment["url"]
    _stop_api(deployment)
    deployment["start_api"]("--workers", "2")
    http = httpx.Client(base_url=url, timeout=30)
    body = {"assistant_id": "echo", "input": {"text": "count me", "steps": 1}}
    runs = [http.post("/runs", json=body).json() for _ in range(3)]
    for run in runs:
        wait_for(lambda r=run: http.get(f"/runs/{r['run_id']}").json()["status"] == "success", timeout=60)
    counts = []
    for _ in range(6):  # several scrapes, spread over both processes: each run is observed by one of them
        with httpx.Client(base_url=url, timeout=10) as fresh:
            counts.append(_sample(fresh.get("/metrics").text, "mgmflow_run_seconds_count",
                                  status="success", workflow="echo"))
    assert counts[-1] == len(runs), counts


def test_api_processes_stop_when_their_supervisor_is_killed(deployment):
    import psutil

    _stop_api(deployment)
    supervisor = deployment["start_api"]("--workers", "2")
    children = wait_for(lambda: [child for child in psutil.Process(supervisor.pid).children()
                                 if "multiprocessing" in " ".join(child.cmdline())][:2] or None, timeout=30)
    supervisor.send_signal(signal.SIGKILL)  # only the supervisor: its API processes learn it from the kernel
    supervisor.wait(10)
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [child.pid for child in alive]
    assert not _healthy(deployment["url"])
