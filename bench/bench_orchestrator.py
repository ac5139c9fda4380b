"""Orchestration overhead of a distributed story run (private redis-server, `mgmflow worker` subprocesses).

Per run, from the run's event stream (every timestamp is a Redis stream id, so one clock):

- critical path: the sum over stages (one park of the graph each) of the stage's model-task span, from its first
  task start to its last task finish: what the run would take with a free orchestrator;
- overhead ratio: wall time (run created → run finished) / critical path; goal ≤ 1.10;
- per-hop overhead (dispatch → park → resume), in ms: from the last task of a stage finishing to the next stage's
  first task starting: the completion notice, the resume (lease, checkpoint, graph step) and the dispatch.

    python bench/bench_orchestrator.py [--runs 3] [--pages 2] [--vlm small] [--steps 8]

Runs are sequential (one story at a time, each on its own thread); medians over runs.
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
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")
MGMFLOW = str(Path(sys.executable).parent / "mgmflow")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if process.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"{path.name}: not ready\n{path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)


def stamp(event) -> float:
    """Seconds of a Redis stream id ("<ms>-<seq>")."""
    return int(event.id.split("-")[0]) / 1000



def measure(events: list, created_at: float) -> dict:
    """Stages, critical path, hops and wall time of one finished run."""
    started, finished = {}, {}
    for event in events:
        task = event.data.get("task_id")
        if event.type == "task.started":
            started.setdefault(task, stamp(event))
        elif event.type == "task.finished":
            finished[task] = stamp(event)
    # a drive starts at the first node event after a park (or at the run's start)
    drives, parked = [], True
    for event in events:
        if event.type == "node" and parked:
            drives.append(stamp(event))
            parked = False
        elif event.type == "node" and event.data.get("phase") == "parked" and not event.data.get("path"):
            parked = True
    drives.append(float("inf"))
    stages = []
    for begin, end in zip(drives, drives[1:]):
        tasks = [task for task, at in started.items() if begin <= at < end and task in finished]
        if tasks:
            stages.append((min(started[t] for t in tasks), max(finished[t] for t in tasks), len(tasks)))
    hops = [(nxt[0] - cur[1]) * 1000 for cur, nxt in zip(stages, stages[1:])]
    finished_at = max(stamp(event) for event in events if event.type == "run")
    critical = sum(last - first for first, last, _ in stages)
    return {"wall": finished_at - created_at, "critical": critical, "stages": len(stages), "hops": hops,
            "tasks": len(finished)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pages", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--vlm", default="small", help="Mini-Gemini preset of the VLM worker")
    parser.add_argument("--diffusion", default="tiny", help="diffusion preset (no 'small' diffusion preset exists)")
    parser.add_argument("--home", default=None, help="MGMFLOW_HOME (default: a temporary folder)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    home = Path(args.home) if args.home else folder / "home"
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
    env = {**os.environ, "MGMFLOW_BROKER_URL": f"redis://127.0.0.1:{port}/0", "MGMFLOW_HOME": str(home),
           "MGMFLOW_VLM_MODEL": args.vlm, "MGMFLOW_DIFFUSION_MODEL": args.diffusion, "OMP_NUM_THREADS": "1"}
    workers = []
    try:
        for queues in ("vlm,diffusion,edit", "orchestrator"):
            log = folder / f"worker-{queues.split(',')[0]}.log"
            # its own process group, killed whole: a worker's pool processes must not outlive the measurement
            process = subprocess.Popen([MGMFLOW, "worker", f"--queues={queues}", "--loglevel=INFO"], env=env,
                                       stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO, process_group=0)
            workers.append((process, log))
        for process, log in workers:
            wait_for_text(log, " ready.", process, 600)

        os.environ.update(env)
        from mgmflow.orchestrator.runs import RunService
        from mgmflow.workers.settings import Settings

        service = RunService(Settings())
        results = []
        for index in range(args.runs):
            run = service.create_run("story", {"premise": "A lighthouse keeper befriends a whale.",
                                               "pages": args.pages, "rounds": args.rounds, "steps": args.steps,
                                               "seed": index})
            final = service.wait(run.run_id, timeout=3600)
            if final.status != "success":
                raise RuntimeError(f"run {run.run_id} ended {final.status}: {final.error}")
            result = measure(list(service.all_events(run.run_id)), final.created_at)
            results.append(result)
            print(f"run {index + 1}: wall {result['wall']:.2f} s, critical path {result['critical']:.2f} s, "
                  f"ratio {result['wall'] / result['critical']:.3f}, {result['stages']} stages, "
                  f"{result['tasks']} tasks, hop median {statistics.median(result['hops']):.0f} ms", flush=True)
        hops = [hop for result in results for hop in result["hops"]]
        ratios = [result["wall"] / result["critical"] for result in results]
        print(f"\nstory, {args.pages} pages, {args.rounds} round(s), VLM {args.vlm}, diffusion {args.diffusion} "
              f"({args.steps} steps); {args.runs} runs, 1 GPU-queue worker + 1 orchestration worker")
        print(f"orchestration overhead ratio (wall / critical path): median {statistics.median(ratios):.3f} "
              f"(goal <= 1.10)")
        print(f"per-hop overhead (task finished -> next stage's task started): median "
              f"{statistics.median(hops):.0f} ms, p90 {sorted(hops)[int(0.9 * (len(hops) - 1))]:.0f} ms, "
              f"{len(hops)} hops")
    finally:
        for process, _ in workers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        redis.kill()
        redis.wait()


if __name__ == "__main__":
    main()
