"""Workers benchmark, side by side on one private redis-server (repetitions interleaved, medians):

1. round trip through our task layer (submit → record → worker → record → wait) against a bare Celery no-op
   (apply_async().get() over the same Redis); goal ≤ 1.5x;
2. broker bytes per task message, for each task kind with realistic payloads (limit 4 KB);
3. VLM throughput under 8 concurrent clients, dynamic batching (batch 8) against none (batch 1).

    python bench/bench_workers.py [--round-trips 200] [--vlm-requests 48]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "tests" / "workers")]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.1)


class Processes:
    def __init__(self):
        self.started: list[subprocess.Popen] = []

    def start(self, argv, env, log: Path) -> subprocess.Popen:
        # its own process group, killed whole: a worker's pool processes must not outlive the measurement
        process = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                                   process_group=0)
        self.started.append(process)
        return process

    def close(self):
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ready(log: Path) -> bool:
    return " ready." in log.read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--vlm-requests", type=int, default=48)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-workers-"))
    home = Path(os.environ.get("MGMFLOW_HOME", folder / "home"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    os.environ["BENCH_REDIS_URL"] = url
    processes = Processes()
    try:
        processes.start(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"], os.environ,
                        folder / "redis.log")
        time.sleep(0.5)
        env = {**os.environ, "MGMFLOW_BROKER_URL": url, "MGMFLOW_HOME": str(home),
               "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
        ours_log, bare_log = folder / "ours.log", folder / "bare.log"
        mgmflow = str(Path(sys.executable).parent / "mgmflow")
        processes.start([mgmflow, "worker", "--queues=bench", "--include=bench_tasks", "--concurrency=1"], env,
                        ours_log)
        processes.start([sys.executable, "-m", "celery", "-A", "bench_tasks:bare", "worker", "--pool=threads",
                         "-c", "1", "--without-mingle", "--without-gossip", "-l", "INFO"], env, bare_log)
        wait_until(lambda: ready(ours_log) and ready(bare_log), 120)

        from bench_tasks import bare_noop
        from mgmflow.workers.client import TaskClient
        from mgmflow.workers.settings import Settings

        client = TaskClient(Settings(broker_url=url, home=home))
        # Bare Celery twice: .get() at its default interval (0.5 s) and at its fastest (1 ms), the fair baseline.
        times: dict[str, list[float]] = {"ours": [], "bare": [], "bare-default": []}
        for index in range(args.round_trips + 10):  # interleaved; the first 10 warm up
            start = time.perf_counter()
            client.submit("bench.noop", {"value": index}, task_id=f"rt:{index}", run_id="bench", scope="b")
            assert client.wait(f"rt:{index}", timeout=10).status == "done"
            ours = time.perf_counter()
            assert bare_noop.apply_async((index,)).get(timeout=10, interval=0.001) == {"value": index}
            bare = time.perf_counter()
            assert bare_noop.apply_async((index,)).get(timeout=10) == {"value": index}
            end = time.perf_counter()
            if index >= 10:
                times["ours"].append(ours - start)
                times["bare"].append(bare - ours)
                times["bare-default"].append(end - bare)
        ms = {name: statistics.median(values) * 1000 for name, values in times.items()}
        print(f"round trip, median of {args.round_trips}: ours {ms['ours']:.2f} ms, bare Celery {ms['bare']:.2f} ms "
              f"(.get(interval=0.001); {ms['bare-default']:.2f} ms at the default interval), "
              f"ratio {ms['ours'] / ms['bare']:.2f}x (goal <= 1.5x)")

        broker_bytes(client, url)
        vlm_throughput(processes, env, folder, url, home, args.vlm_requests)
    finally:
        processes.close()


def broker_bytes(client, url: str) -> None:
    """Submit one step of each kind to a queue nobody consumes and measure the message Redis holds."""
    import redis
    from payloads import inputs, round_trip_payloads

    image, mask = inputs(client)
    connection = redis.Redis.from_url(url)
    sizes = {}
    for kind, payload in round_trip_payloads(image, mask).items():
        payload = {**payload, "model": "unserved-model"}
        task_id = f"size:{kind}:{'x' * 40}"  # a realistic run:step id
        client.submit(kind, payload, task_id=task_id, run_id="r" * 36, scope="user-" + "u" * 30,
                      notify=("orchestrator.resume", {"run_id": "r" * 36}))
        queue = kind.split(".")[0] + ".unserved-model"
        keys = [k for k in connection.keys(f"{queue}*")]
        raw = [m for key in keys for m in connection.lrange(key, 0, -1)]
        sizes[kind] = max(len(m) for m in raw)
        connection.delete(*keys)
    print("broker bytes per task message (whole Celery envelope): " +
          ", ".join(f"{kind} {size}" for kind, size in sizes.items()))
    assert max(sizes.values()) < 4096, "a task message is over 4 KB"


def vlm_throughput(processes, env, folder: Path, url: str, home: Path, requests: int) -> None:
    """8 client threads, each submitting describe requests one after the other; batched vs unbatched worker."""
    from mgmflow.workers.client import TaskClient
    from mgmflow.workers.settings import Settings
    from payloads import inputs

    logs = {}
    for label, batch, db in (("batched", 8, 1), ("unbatched", 1, 2)):
        db_url = url.rsplit("/", 1)[0] + f"/{db}"
        logs[label] = (folder / f"vlm-{label}.log", db_url)
        processes.start([str(Path(sys.executable).parent / "mgmflow"), "worker", "--queues=vlm"],
                        {**env, "MGMFLOW_BROKER_URL": db_url, "MGMFLOW_VLM_BATCH_SIZE": str(batch),
                         "MGMFLOW_BATCH_WINDOW_MS": "10"}, logs[label][0])
    wait_until(lambda: all(ready(log) for log, _ in logs.values()), 300)
    rates = {label: [] for label in logs}
    for repetition in range(3):
        for label, (_, db_url) in logs.items():
            client = TaskClient(Settings(broker_url=db_url, home=home))
            image, _ = inputs(client)
            counter = iter(range(requests))
            lock = threading.Lock()

            def client_loop():
                while True:
                    with lock:
                        index = next(counter, None)
                    if index is None:
                        return
                    task_id = f"vlm:{repetition}:{index}"
                    client.submit("vlm.describe", {"image": image, "prompt": f"what is in picture {index}?",
                                                   "max_new_tokens": 16}, task_id=task_id, run_id="v", scope="alice")
                    assert client.wait(task_id, timeout=120).status == "done"

            start = time.perf_counter()
            threads = [threading.Thread(target=client_loop) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rates[label].append(requests / (time.perf_counter() - start))
    batched, unbatched = statistics.median(rates["batched"]), statistics.median(rates["unbatched"])
    print(f"VLM describe throughput, 8 concurrent clients, {requests} requests x 3 (median): batched "
          f"{batched:.1f} req/s, unbatched {unbatched:.1f} req/s, ratio {batched / unbatched:.2f}x")


if __name__ == "__main__":
    main()
