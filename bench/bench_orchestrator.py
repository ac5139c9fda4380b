"""A distributed story run, pipelined per page against the stage-synchronous schedule, on the same workers.

A private redis-server, one VLM worker (`small` preset) and one diffusion worker (`tiny`), `mgmflow worker`
subprocesses that stay up for the whole bench. The orchestration worker runs this tree (pipelined: each page moves
on as soon as its own step finished) or the ``mgmflow.orchestrator`` package of an earlier commit (``--baseline``,
default: the last stage-synchronous one; exported with ``git archive`` and put first on the orchestration worker's
PYTHONPATH), one at a time, since both would take the ``orchestrator`` queue's messages. Repetitions alternate
between the two. Only the orchestration code differs: the model workers, the prompts and the seeds are the same, so
both schedules do the same model work and write byte-identical pages.

Per run, from the run's event stream (Redis stream ids, one clock) and the task records:

- wall: run created → run finished;
- busy fraction of each worker: the union of its tasks' execution intervals / wall;
- first page / wall: when the stream first reports a finished page (``progress`` of the pages stage);
- orchestration overhead: wall / the time some model task is executing (what is left when no task runs is the
  orchestrator's: completion notices, resumes, checkpoints, dispatch); goal ≤ 1.10;
- VLM mean batch size: VLM tasks / VLM model calls (each task reports the size of the batch it ran in).

Last, a one-page story times one page's chain of steps with the workers to itself: the run's prelude plus that chain
is a lower bound on the first page that no schedule of the same work can beat.

A page's drawing should cost about what the VLM spends on a page-round (its prompt and critique, a batch counted
once). Unless ``--size`` is given, a one-round stage-synchronous story first measures the VLM's time per page-round,
then single drawings of ``--steps`` steps are timed at growing sizes and the pages get the size whose drawing time is
closest; every run prints both, so the balance can be checked.

    python bench/bench_orchestrator.py [--reps 3] [--pages 8] [--rounds 2] [--steps 50] [--size PX] [--baseline REV]
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
PIPELINED, STAGED = "pipelined", "stage-synchronous"
DEFAULT_BASELINE = "0acd887"  # the last stage-synchronous loop (one namespace, prompt budgets)
CALIBRATION_SIZE = 128


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


def union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``intervals``."""
    total, end = 0.0, float("-inf")
    for first, last in sorted(intervals):
        if last > end:
            total += last - max(first, end)
            end = last
    return total


def worker_of(kind: str) -> str:
    return "vlm" if kind.startswith("vlm.") else "diffusion"


def measure(events: list, created_at: float, batch_sizes: dict[str, int]) -> dict:
    """Wall time, busy fractions, first page, overhead and VLM batch size of one finished run."""
    started, finished, kinds = {}, {}, {}
    for event in events:
        task = event.data.get("task_id")
        if event.type == "task.started":
            started.setdefault(task, stamp(event))
            kinds[task] = event.data.get("kind", "")
        elif event.type == "task.finished":
            finished[task] = stamp(event)
            kinds.setdefault(task, event.data.get("kind", ""))
    intervals = {task: (started[task], finished[task]) for task in finished if task in started}
    end = max(stamp(event) for event in events if event.type == "run")
    wall = end - created_at
    busy = {name: union([span for task, span in intervals.items() if worker_of(kinds[task]) == name]) / wall
            for name in ("vlm", "diffusion")}
    first_page = min(stamp(event) for event in events
                     if event.type == "progress" and event.data.get("stage") == "pages" and event.data.get("done"))
    vlm = [batch_sizes[task] for task in intervals if worker_of(kinds[task]) == "vlm" and task in batch_sizes]
    pages_start = min(span[0] for task, span in intervals.items() if ":pages:" in task)
    return {"wall": wall, "busy": busy, "first_page": (first_page - created_at) / wall,
            "pages_start": (pages_start - created_at) / wall,
            "overhead": wall / union(list(intervals.values())),
            "vlm_batch": len(vlm) / sum(1 / size for size in vlm) if vlm else float("nan"),
            "per_page": per_page(intervals, kinds)}


def per_page(intervals: dict[str, tuple[float, float]], kinds: dict[str, str]) -> dict[str, float]:
    """Seconds each worker was busy with the pages' tasks, per page-round (a batch counts once)."""
    pages = {task: span for task, span in intervals.items() if ":pages:" in task}
    rounds = {task.split(":")[2] + task.split(":")[3] for task in pages}  # <run>:pages:<page>:r<round>:...
    return {name: union([span for task, span in pages.items() if worker_of(kinds[task]) == name]) / max(1, len(rounds))
            for name in ("vlm", "diffusion")}


class Bench:
    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.port = free_port()
        home = Path(args.home) if args.home else folder / "home"
        self.env = {**os.environ, "MGMFLOW_BROKER_URL": f"redis://127.0.0.1:{self.port}/0", "MGMFLOW_HOME": str(home),
                    "MGMFLOW_VLM_MODEL": args.vlm, "MGMFLOW_DIFFUSION_MODEL": args.diffusion, "OMP_NUM_THREADS": "1"}
        self.processes: list[subprocess.Popen] = []
        self.baseline = folder / "baseline"

    def start(self, name: str, queues: str, *, tree: Path | None = None) -> subprocess.Popen:
        log = self.folder / f"{name}.log"
        env = {**self.env, **({"PYTHONPATH": str(tree)} if tree else {})}
        # its own process group, killed whole: a worker's pool processes must not outlive the measurement
        process = subprocess.Popen([MGMFLOW, "worker", f"--queues={queues}", "--loglevel=INFO"], env=env,
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tree or REPO, process_group=0)
        self.processes.append(process)
        wait_for_text(log, " ready.", process, 900)
        return process

    def stop(self, process: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def export_baseline(self) -> None:
        """``baseline/mgmflow/orchestrator``: first on the path, it shadows this tree's package (and only it)."""
        package = self.baseline / "mgmflow"
        package.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", self.args.baseline, "orchestrator"], cwd=REPO,
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(package)], input=archive.stdout, check=True)

    def story(self, service, schedule: str, seed: int, *, rounds: int, size: int, pages: int | None = None) -> dict:
        """One story (of ``--pages`` unless ``pages``) on the schedule's orchestration worker (started for it,
        stopped after it)."""
        orchestrator = self.start(f"orchestrator-{schedule}-{seed}", "orchestrator",
                                  tree=self.baseline if schedule == STAGED else None)
        try:
            run = service.create_run("story", {"premise": "A lighthouse keeper befriends a whale.",
                                               "pages": pages or self.args.pages, "rounds": rounds,
                                               "steps": self.args.steps, "width": size, "height": size, "seed": seed})
            final = service.wait(run.run_id, timeout=7200)
            if final.status != "success":
                raise RuntimeError(f"run {run.run_id} ended {final.status}: {final.error}")
        finally:
            self.stop(orchestrator)
        events = list(service.all_events(run.run_id))
        tasks = {event.data["task_id"] for event in events if event.type == "task.finished"}
        batch_sizes = {}
        for task in tasks:
            record = service.orchestrator.client.get(task)
            if record is not None and isinstance(record.result, dict) and record.result.get("batch_size"):
                batch_sizes[task] = record.result["batch_size"]
        return measure(events, final.created_at, batch_sizes)


def calibrate(bench: Bench, service) -> int:
    """The pages' size at which drawing a page costs about what the VLM spends on a page-round: the VLM's time from
    a one-round stage-synchronous story (its pages' size does not change the VLM's work), then single drawings
    timed at growing sizes (a small UNet's time is not proportional to the pixels: fixed costs dominate)."""
    vlm = bench.story(service, STAGED, 10_000, rounds=1, size=CALIBRATION_SIZE)["per_page"]["vlm"]
    timed = {}
    for size in range(CALIBRATION_SIZE, 2048 + 1, 64):
        timed[size] = draw_seconds(service, size, bench.args.steps)
        if timed[size] >= vlm:
            break
    size = min(timed, key=lambda candidate: abs(timed[candidate] - vlm))
    print(f"calibration: per page-round VLM {vlm:.1f} s; drawing " +
          ", ".join(f"{seconds:.1f} s at {px} px" for px, seconds in timed.items()) + f"; pages of {size} px",
          flush=True)
    return size


def draw_seconds(service, size: int, steps: int) -> float:
    """How long the diffusion worker takes to draw one page of ``size`` px (from its step's own events)."""
    run_id = f"calibration-{size}"
    task_id = f"{run_id}:draw"
    client = service.orchestrator.client
    client.submit("diffusion.text2img", {"prompts": ["a lighthouse at dusk"], "seeds": [0], "width": size,
                                         "height": size, "steps": steps, "exclusive": True},
                  task_id=task_id, run_id=run_id, scope="default")
    client.wait(task_id, timeout=600)
    started = client.wait_for_event(run_id, lambda event: event.type == "task.started", timeout=60)
    finished = client.wait_for_event(run_id, lambda event: event.type == "task.finished", timeout=60)
    return stamp(finished) - stamp(started)


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="runs of each schedule, alternating")
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of a page")
    parser.add_argument("--size", type=int, default=None,
                        help="page width and height in pixels: with --steps, what a page's drawing costs (default: "
                             "calibrated to the VLM's time per page-round)")
    parser.add_argument("--vlm", default="small", help="Mini-Gemini preset of the VLM worker")
    parser.add_argument("--diffusion", default="tiny", help="diffusion preset (no 'small' diffusion preset exists)")
    parser.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision of the stage-synchronous loop")
    parser.add_argument("--home", default=None, help="MGMFLOW_HOME (default: a temporary folder)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    bench = Bench(args, folder)
    redis = subprocess.Popen(["redis-server", "--port", str(bench.port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--maxmemory-policy", "noeviction"], stdout=subprocess.DEVNULL)
    try:
        bench.export_baseline()
        bench.start("worker-vlm", "vlm")
        bench.start("worker-diffusion", "diffusion,edit")
        os.environ.update(bench.env)
        from mgmflow.orchestrator.runs import RunService
        from mgmflow.workers.settings import Settings

        service = RunService(Settings())
        print(f"before: {load()}", flush=True)
        size = args.size or calibrate(bench, service)
        results: dict[str, list[dict]] = {PIPELINED: [], STAGED: []}
        for rep in range(args.reps):
            for schedule in ((STAGED, PIPELINED) if rep % 2 == 0 else (PIPELINED, STAGED)):
                result = bench.story(service, schedule, rep, rounds=args.rounds, size=size)
                results[schedule].append(result)
                print(f"rep {rep + 1} {schedule:>17}: wall {result['wall']:6.1f} s, busy VLM "
                      f"{result['busy']['vlm']:.2f} diffusion {result['busy']['diffusion']:.2f}, first page "
                      f"{result['first_page']:.2f} (pages start {result['pages_start']:.2f}), overhead "
                      f"{result['overhead']:.3f}, VLM batch "
                      f"{result['vlm_batch']:.2f}, per page-round VLM {result['per_page']['vlm']:.1f} s / "
                      f"drawing {result['per_page']['diffusion']:.1f} s; {load()}", flush=True)

        def median(schedule: str, pick) -> float:
            return statistics.median(pick(result) for result in results[schedule])

        print(f"\nstory, {args.pages} pages, {args.rounds} rounds, VLM worker {args.vlm}, diffusion worker "
              f"{args.diffusion} ({args.steps} steps, {size}x{size} px); {args.reps} runs of each schedule, alternating; medians")
        for schedule in (STAGED, PIPELINED):
            print(f"{schedule:>17}: wall {median(schedule, lambda r: r['wall']):6.1f} s, busy fraction VLM "
                  f"{median(schedule, lambda r: r['busy']['vlm']):.2f} diffusion "
                  f"{median(schedule, lambda r: r['busy']['diffusion']):.2f}, first page / wall "
                  f"{median(schedule, lambda r: r['first_page']):.2f}, overhead (wall / model tasks running) "
                  f"{median(schedule, lambda r: r['overhead']):.3f}, VLM mean batch "
                  f"{median(schedule, lambda r: r['vlm_batch']):.2f}")
        print(f"wall time, pipelined / stage-synchronous: "
              f"{median(PIPELINED, lambda r: r['wall']) / median(STAGED, lambda r: r['wall']):.3f} (goal <= 0.7); "
              f"first page / wall, pipelined: {median(PIPELINED, lambda r: r['first_page']):.2f} (goal <= 0.35); "
              f"overhead, pipelined: {median(PIPELINED, lambda r: r['overhead']):.3f} (goal <= 1.10)")
        # No schedule can finish a page sooner than the prelude plus that page's own chain of steps with both
        # workers to itself (its VLM calls alone, unbatched, and its drawings): a one-page story measures the chain.
        alone = bench.story(service, PIPELINED, args.reps, rounds=args.rounds, size=size, pages=1)
        chain = alone["wall"] * (1 - alone["pages_start"])
        print(f"first page / wall, lower bound on these workers: "
              f"{median(PIPELINED, lambda r: r['pages_start'] + chain / r['wall']):.2f} (the run's prelude, "
              f"{median(PIPELINED, lambda r: r['pages_start']):.2f} of its wall, then one page's {args.rounds} "
              f"rounds with the workers to itself, {chain:.1f} s, timed as a one-page story)")
        print(f"after: {load()}")
    finally:
        for process in bench.processes:
            bench.stop(process)
        redis.kill()
        redis.wait()


if __name__ == "__main__":
    main()
