"""Randomized durability soak: story runs on real processes while faults land at random.

    python bench/bench_chaos.py --minutes 5

A private redis-server (AOF), two GPU workers (several threads each) and two orchestration workers, with the
settings users run (10 s leases, the hour-long visibility timeout of real models). Runs are kept in flight while,
every few seconds, one fault is drawn: kill -9 of a GPU or an orchestration worker (a supervisor restarts it),
SIGSTOP of any worker for 1-30 s, or kill -9 of Redis restarted on its AOF. At the end every run must have
finished with the PNG bytes of an undisturbed run. Prints the faults injected and, per run, the outcome; steps
whose work started more than once (only a step killed or stalled mid-work may) and the time each run took.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from worker_support import Services  # noqa: E402

STORY = {"premise": "A lighthouse keeper befriends a whale.", "pages": 2, "seed": 5, "rounds": 1, "steps": 4}
SETTINGS = {"lease_s": 10.0, "visibility_timeout_s": 3600.0, "max_deliveries": 3}
GPU, DRIVER = "vlm,diffusion,edit", "orchestrator"


class Soak:
    def __init__(self, folder: Path, rng: random.Random):
        self.services, self.rng = Services(folder, folder / "home"), rng
        self.redis = self.services.redis(persistent=True)
        self.workers = {GPU: [], DRIVER: []}
        self.faults: Counter = Counter()
        self.lock = threading.Lock()

    def start(self, queues: str) -> None:
        worker = self.services.worker(self.redis, queues, **SETTINGS)
        worker.wait_ready(300)
        with self.lock:
            self.workers[queues].append(worker)

    def supervise(self) -> None:
        """What compose or systemd does: restart a worker that exited (counted: none should on its own)."""
        for queues, workers in self.workers.items():
            for worker in list(workers):
                if worker.process.poll() is not None:
                    with self.lock:
                        workers.remove(worker)
                    if not getattr(worker, "killed", False):
                        self.faults["worker exited on its own (bug)"] += 1
                    self.start(queues)

    def inject(self) -> None:
        kind = self.rng.choice(["kill gpu", "kill driver", "stop worker", "restart redis"])
        if kind == "restart redis":
            self.redis.kill()
            time.sleep(self.rng.uniform(0.5, 3))
            self.redis.start()
        elif kind == "stop worker":
            worker = self.rng.choice(self.workers[GPU] + self.workers[DRIVER])
            os.kill(worker.process.pid, signal.SIGSTOP)
            time.sleep(self.rng.uniform(1, 30))
            os.kill(worker.process.pid, signal.SIGCONT)
        else:
            worker = self.rng.choice(self.workers[GPU if kind == "kill gpu" else DRIVER])
            worker.killed = True
            worker.kill()
        self.faults[kind] += 1


def page_bytes(service, run) -> dict[str, bytes]:
    values = service.output_values(run)
    return {page: service.orchestrator.store.get(artifact, scope=run.scope)
            for page, artifact in (values.get("chosen") or {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0, help="how long faults are injected")
    parser.add_argument("--in-flight", type=int, default=2, help="runs kept in flight")
    parser.add_argument("--every", type=float, nargs=2, default=(5.0, 20.0), help="seconds between faults")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="mgmflow-soak-") as folder:
        soak = Soak(Path(folder), rng)
        try:
            for queues in (GPU, GPU, DRIVER, DRIVER):
                soak.start(queues)
            from mgmflow.orchestrator.runs import RunService

            service = RunService(soak.services.settings(soak.redis, **SETTINGS))
            baseline_run = service.wait(service.create_run("story", STORY).run_id, timeout=600)
            baseline = page_bytes(service, baseline_run)
            print(f"undisturbed run: {baseline_run.status}, {len(baseline)} pages", flush=True)

            runs, end, next_fault = {}, time.monotonic() + args.minutes * 60, time.monotonic() + 5
            while time.monotonic() < end:
                active = [r for r in runs if not service.get_run(r).done]
                for _ in range(args.in_flight - len(active)):
                    run = service.create_run("story", STORY)
                    runs[run.run_id] = time.time()
                if time.monotonic() >= next_fault:
                    soak.inject()
                    next_fault = time.monotonic() + rng.uniform(*args.every)
                soak.supervise()
                time.sleep(0.5)
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline and not all(service.get_run(r).done for r in runs):
                soak.supervise()
                time.sleep(1)

            outcomes, durations, mismatched, repeated, steps = Counter(), [], 0, Counter(), 0
            client = service.orchestrator.client
            for run_id, created in runs.items():
                run = service.get_run(run_id)
                outcomes[run.status] += 1
                if run.done:
                    durations.append(run.updated_at - created)
                if run.status == "success" and page_bytes(service, run) != baseline:
                    mismatched += 1
                for task_id in client.records.redis.smembers(f"mgmflow:run:{run_id}:tasks"):
                    record = client.get(task_id)
                    steps += 1
                    if record.executions != 1:
                        repeated[record.executions] += 1
            print(f"faults injected: {dict(soak.faults)}")
            print(f"runs: {len(runs)}; outcomes: {dict(outcomes)}; PNG bytes different from the undisturbed run: "
                  f"{mismatched}")
            print(f"steps: {steps}; started more than once (killed or stalled mid-work): "
                  f"{sum(repeated.values())} {dict(repeated)}")
            if durations:
                print(f"run time: median {statistics.median(durations):.1f} s, max {max(durations):.1f} s")
        finally:
            soak.services.close()


if __name__ == "__main__":
    main()
