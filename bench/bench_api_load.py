"""Load on the HTTP API with real parts: 1,000 runs of a small workflow submitted over HTTP to a real API process,
driven by real orchestration workers over a real Redis, all on this machine's cores.

Checks: every run completes (none lost), each exactly once (none duplicated: one run per idempotency key, one
execution per run), and re-sending the same keys returns the same runs. Measures submission throughput and the
submission latency percentiles (goal: >= 300 submissions/s, p95 < 50 ms).

    python bench/bench_api_load.py [--runs 1000] [--clients 16] [--workers 2] [--workers-after]

``--workers-after`` starts the workers once every run is submitted: the submission path alone, for comparison with
the default (runs executing on the same cores while they are submitted).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ECHO_MAIN = ROOT / "tests" / "api" / "echo_main.py"  # mgmflow with a model-free test workflow registered


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what}")


async def submit_all(url: str, runs: int, clients: int, prefix: str) -> tuple[list[float], dict[int, str], float]:
    """POST /runs for every index with ``clients`` concurrent connections; returns latencies, run ids, seconds."""
    latencies: list[float] = []
    run_ids: dict[int, str] = {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(runs):
        queue.put_nowait(index)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while not queue.empty():
                index = queue.get_nowait()
                body = {"assistant_id": "echo", "input": {"text": f"run {index}", "steps": 1}}
                started = time.perf_counter()
                response = await http.post("/runs", json=body, headers={"Idempotency-Key": f"{prefix}-{index}"})
                latencies.append(time.perf_counter() - started)
                response.raise_for_status()
                run_ids[index] = response.json()["run_id"]

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, run_ids, time.perf_counter() - started


async def read_all(url: str, run_ids: list[str], clients: int) -> tuple[list[float], float]:
    """GET /runs/{id} for every run: the API layer's own cost (auth, a record read, JSON) without a submission."""
    latencies: list[float] = []
    pending = list(run_ids)

    async def client() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while pending:
                run_id = pending.pop()
                started = time.perf_counter()
                (await http.get(f"/runs/{run_id}")).raise_for_status()
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="orchestration worker processes")
    parser.add_argument("--workers-after", action="store_true",
                        help="start the workers only after the submissions (measure the submission path alone)")
    args = parser.parse_args()
    redis_server = shutil.which("redis-server") or sys.exit("redis-server is needed")

    home = Path(tempfile.mkdtemp(prefix="mgmflow-bench-"))
    redis_port, api_port = free_port(), free_port()
    env = {**os.environ, "MGMFLOW_HOME": str(home), "MGMFLOW_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # default limits: the burst and quota admit 1,000
    logs = home / "logs"
    logs.mkdir()
    processes = [subprocess.Popen([redis_server, "--port", str(redis_port), "--save", ""],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    def spawn(name: str, *argv: str) -> None:
        processes.append(subprocess.Popen([sys.executable, str(ECHO_MAIN), *argv], env=env,
                                          stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT))

    url = f"http://127.0.0.1:{api_port}"
    try:
        spawn("api", "serve", "--port", str(api_port), "--log-level", "warning")

        def start_workers() -> None:
            for number in range(args.workers):
                spawn(f"worker{number}", "worker", "--queues", "orchestrator", "--concurrency", "4",
                      "--name", f"orch{number}", "--loglevel", "WARNING")

        if not args.workers_after:
            start_workers()
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=1).status_code == 200, 90, "the API")

        # 1. Submit.
        latencies, run_ids, seconds = asyncio.run(submit_all(url, args.runs, args.clients, "bench"))
        # 2. The same keys again: the same runs, nothing new.
        _, again, _ = asyncio.run(submit_all(url, args.runs, args.clients, "bench"))
        duplicates_refused = again == run_ids
        if args.workers_after:
            start_workers()

        # 3. Wait for every run to end; count outcomes and executions.
        http = httpx.Client(base_url=url, timeout=60)
        started = time.monotonic()

        def statuses() -> dict[str, str]:
            found, offset = {}, 0
            while page := http.get("/runs", params={"limit": 1000, "offset": offset}).json():
                found.update({run["run_id"]: run["status"] for run in page})
                offset += len(page)
            return found

        wait_for(lambda: all(s in ("success", "error", "cancelled", "timeout") for s in statuses().values()),
                 900, "every run to end")
        drain = time.monotonic() - started
        final = statuses()
        executions = []
        for run_id in list(run_ids.values())[:: max(1, args.runs // 100)]:  # a sample of event streams
            run = http.get(f"/runs/{run_id}").json()
            events = http.get(f"/threads/{run['thread_id']}/runs/{run_id}/stream")
            executions.append(events.text.count("event: progress"))

        read_latencies, read_seconds = asyncio.run(read_all(url, list(run_ids.values()), args.clients))
        lost = args.runs - sum(1 for run_id in run_ids.values() if final.get(run_id) == "success")
        print(f"runs submitted:          {len(run_ids)} ({len(set(run_ids.values()))} distinct run ids)")
        print(f"runs listed by the API:  {len(final)} (duplicates: {len(final) - len(set(run_ids.values()))})")
        print(f"same keys resubmitted:   {'same runs returned' if duplicates_refused else 'NEW RUNS CREATED'}")
        print(f"completed successfully:  {args.runs - lost} (lost or failed: {lost})")
        print(f"executions per run:      {sorted(set(executions))} (sampled {len(executions)} event streams)")
        print(f"submission throughput:   {len(latencies[:args.runs]) / seconds:.0f} runs/s "
              f"({args.clients} concurrent clients, workers {'started after' if args.workers_after else 'running'};"
              " goal >= 300)")
        print(f"submission latency:      p50 {statistics.median(latencies) * 1000:.1f} ms, "
              f"p95 {percentile(latencies, 0.95) * 1000:.1f} ms, p99 {percentile(latencies, 0.99) * 1000:.1f} ms "
              "(goal p95 < 50 ms)")
        print(f"drain after submission:  {drain:.1f} s with {args.workers} orchestration workers")
        print(f"reads (GET /runs/{{id}}):  {len(read_latencies) / read_seconds:.0f} /s, p50 "
              f"{statistics.median(read_latencies) * 1000:.1f} ms, p95 {percentile(read_latencies, 0.95) * 1000:.1f} ms")
        ok = lost == 0 and duplicates_refused and len(final) == args.runs and set(executions) == {1}
        print("RESULT:", "ok" if ok else "FAILED")
        sys.exit(0 if ok else 1)
    finally:
        for process in processes:
            process.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
