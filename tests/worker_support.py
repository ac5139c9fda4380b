"""Real parts for tests: a private redis-server (free port) and `mgmflow worker` subprocesses, all killed by
``Services.close()``. Used by the workers, orchestrator and workflows tests."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from testkit import free_port, wait_for

# `mgmflow worker --include worker_test_steps` imports the test-only step kinds from tests/workers.
TEST_STEPS = Path(__file__).parent / "workers"
REPO = TEST_STEPS.parent.parent
MGMFLOW = str(Path(sys.executable).parent / "mgmflow")
# Short reliability timings: a killed worker's step is redelivered within seconds.
FAST = {"visibility_timeout_s": 3.0, "lease_s": 2.0, "max_deliveries": 2, "oom_backoff_s": 0.1}


class RedisServer:
    def __init__(self, workdir: Path, *, persistent: bool = False):
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (./dev setup installs it)")
        self.port, self.dir, self.persistent = free_port(), workdir, persistent
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        persistence = (["--appendonly", "yes", "--appendfsync", "always", "--save", ""] if self.persistent
                       else ["--save", "", "--appendonly", "no"])
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--maxmemory-policy", "noeviction", *persistence],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, "redis-server")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.kill()


def _pings(client) -> bool:
    import redis

    try:
        client.ping()
        return True
    except redis.ConnectionError:
        return False


class Worker:
    """`mgmflow worker` in a subprocess; ready once Celery logs that it is ready."""

    def __init__(self, redis: RedisServer, home: Path, queues: str, *, log: Path, env: dict, args=()):
        self.log = log
        self.process = subprocess.Popen(
            [MGMFLOW, "worker", f"--queues={queues}", "--include=worker_test_steps", "--loglevel=INFO", *args],
            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=REPO)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> Worker:
        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.text()[-3000:]}")
            return " ready." in self.text()

        wait_for(ready, timeout, "the worker to be ready", interval=0.1)
        return self

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


class Services:
    """Starts redis-servers and workers under one folder; ``close()`` kills every one of them."""

    def __init__(self, folder: Path, home: Path):
        self.folder, self.home = folder, home
        self.servers: list[RedisServer] = []
        self.workers: list[Worker] = []

    def redis(self, persistent: bool = False) -> RedisServer:
        server = RedisServer(self.folder, persistent=persistent)
        self.servers.append(server)
        return server

    def worker(self, redis: RedisServer, queues: str, *args, **settings) -> Worker:
        """A started `mgmflow worker` (call wait_ready); ``settings`` become MGMFLOW_* variables."""
        env = {**os.environ, "MGMFLOW_BROKER_URL": redis.url, "MGMFLOW_HOME": str(self.home),
               "PYTHONPATH": os.pathsep.join([str(TEST_STEPS), str(REPO)]), "OMP_NUM_THREADS": "1",
               **{f"MGMFLOW_{k.upper()}": str(v) for k, v in {**FAST, **settings}.items()}}
        worker = Worker(redis, self.home, queues, log=self.folder / f"worker-{len(self.workers)}.log", env=env,
                        args=args)
        self.workers.append(worker)
        return worker

    def settings(self, redis: RedisServer | None = None, **overrides):
        from mgmflow.workers.settings import Settings

        return Settings(broker_url=redis.url if redis else None, home=self.home, **{**FAST, **overrides})

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        for server in self.servers:
            server.stop()
