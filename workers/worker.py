"""``mgmflow worker``: a Celery worker that loads its models before it takes a single task.

- Queues: ``vlm``, ``diffusion``, ``edit``, ``orchestrator`` (a family takes its model from ``--model`` or the
  settings) or full names such as ``vlm.mgm-7b``. No queues: all of them, on the default presets.
- CUDA-safe: a thread pool in the process that loaded the models (nothing forks after CUDA starts); one
  process per GPU with ``--gpus 0,1`` (each sees only its GPU through ``CUDA_VISIBLE_DEVICES``).
- Threads = the batch size on batching queues (they feed one batcher thread per model), 1 otherwise, and
  prefetch 1 per thread. Deadlines and cancel are cooperative (``check()`` between steps and tokens).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys

from mgmflow.models.errors import MGMFlowError
from mgmflow.workers.app import get_app
from mgmflow.workers.settings import MODEL_FAMILIES, ORCHESTRATOR_QUEUE, Settings
from mgmflow.workers.steps import start_runtime

logger = logging.getLogger(__name__)
ALL_QUEUES = (*MODEL_FAMILIES, ORCHESTRATOR_QUEUE)


class WorkerStartError(MGMFlowError):
    """The worker cannot serve what it was asked to (a model that does not load, an unknown queue)."""

    code = "worker_start_failed"


class WorkerStoppedError(MGMFlowError):
    """Celery's worker stopped although nobody asked it to (an unrecoverable error in its consumer): the command
    exits non-zero so that a supervisor (compose ``restart:``, systemd ``Restart=``) starts it again."""

    code = "worker_stopped"


def survive_broker_restarts() -> None:
    """Work around kombu's Redis transport stopping the worker after a broker restart: a step that was running
    while the connection dropped acks its message, once done, on the old channel, whose connection is gone; kombu
    then builds a client from it and fails (``AttributeError: 'NoneType' object has no attribute 'client'`` or
    ``... 'hostname'``, celery/kombu#970, #582), inside the consumer's loop, and Celery stops the worker with status
    0. Restoring unacknowledged messages over that channel fails the same way. An ack or restore that cannot reach
    the broker is dropped here instead: the message stays in the broker's unacked set, whose visibility sweep
    delivers it again later; a finished step's copy only returns its recorded outcome (``mgmflow.workers.records``), and
    the step watcher sends any unfinished step sooner."""
    from kombu.transport import redis as kombu_redis

    qos = kombu_redis.QoS
    if getattr(qos, "survives_closed_connections", False):
        return

    def guarded(method):
        def call(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except AttributeError:
                connection = self.channel.connection
                if connection is not None and connection.client is not None:
                    raise  # not the closed-connection case
                logger.warning("broker connection closed under %s; the message is left to the visibility sweep",
                               method.__name__)

        return call

    for name in ("ack", "reject", "restore_unacked"):
        setattr(qos, name, guarded(getattr(qos, name)))
    qos.survives_closed_connections = True


def resolve_queues(settings: Settings, queues: list[str], models: dict[str, str]) -> list[str]:
    """``["vlm", "edit"]`` with ``{"vlm": "mgm-7b"}`` → ``["vlm.mgm-7b", "edit.tiny", "edit.tiny-ip2p"]``."""
    resolved = []
    for name in queues or ALL_QUEUES:
        if name in MODEL_FAMILIES:
            if name in models:
                resolved.append(f"{name}.{models[name]}")
            elif name == "edit":
                resolved += [f"edit.{settings.edit_model}", f"edit.{settings.instruct_model}"]
            else:
                resolved.append(f"{name}.{settings.model_for(name)}")
        elif not name or any(c.isspace() or c == "," for c in name):
            raise WorkerStartError(f"not a queue name: {name!r}")
        else:
            resolved.append(name)
    return list(dict.fromkeys(resolved))


def parse_models(values: list[str], queues: list[str]) -> dict[str, str]:
    """``--model vlm=mgm-7b`` per family, or a bare ``--model NAME`` when exactly one model family is served."""
    models = {}
    for value in values:
        family, sep, name = value.partition("=")
        if not sep:
            families = [q for q in queues if q in MODEL_FAMILIES]
            if len(families) != 1:
                raise WorkerStartError(f"--model {value}: say which family it is for, e.g. --model vlm={value}")
            family, name = families[0], value
        if family not in MODEL_FAMILIES or not name:
            raise WorkerStartError(f"--model {value}: expected FAMILY=NAME with FAMILY in {', '.join(MODEL_FAMILIES)}")
        models[family] = name
    return models


def concurrency_for(settings: Settings, queues: list[str]) -> int:
    families = {queue.partition(".")[0] for queue in queues}
    sizes = [settings.vlm_batch_size if "vlm" in families else 1,
             settings.diffusion_batch_size if families & {"diffusion", "edit"} else 1]
    threads = max(sizes)
    if ORCHESTRATOR_QUEUE in families:  # orchestration steps are light; never let them wait behind the models
        threads += 4
    return threads


def run_worker(settings: Settings, *, queues: list[str], models: dict[str, str], concurrency: int | None = None,
               name: str | None = None, include: list[str] = (), loglevel: str = "INFO") -> None:
    if settings.embedded:
        raise WorkerStartError("a worker needs a broker: set MGMFLOW_BROKER_URL (e.g. redis://localhost:6379/0) "
                               "or pass --broker; without one, mgmflow runs its workers in-process")
    served = resolve_queues(settings, queues, models)
    for module in include:  # extra task modules (tests, plugins)
        importlib.import_module(module)
    runtime = start_runtime(settings)
    for queue in served:
        family, _, model = queue.partition(".")
        if family in MODEL_FAMILIES:
            logger.info("loading %s model %r", family, model)
            try:
                runtime.models.get(family, model)
            except MGMFlowError as error:
                raise WorkerStartError(f"cannot load the {family} model {model!r}: {error}") from error
            except Exception as error:  # noqa: BLE001 — any load failure stops the worker before it takes tasks
                raise WorkerStartError(f"cannot load the {family} model {model!r}: "
                                       f"{type(error).__name__}: {error}") from error
    name = name or f"worker-{os.getpid()}"
    private = [runtime.affinity.serve(queue, name) for queue in served if queue.startswith("vlm.")]
    threads = concurrency or concurrency_for(settings, served)
    logger.info("serving %s with %d threads", ", ".join(served + private), threads)
    app = get_app(settings)
    app.set_default()  # pool threads look tasks up on the process's default app (see workers.embedded)
    survive_broker_restarts()
    stop_signals = []
    from celery.signals import worker_shutting_down

    worker_shutting_down.connect(lambda sig=None, **_: stop_signals.append(sig), weak=False)
    try:
        app.worker_main([
            "worker", "--pool=threads", f"--concurrency={threads}", f"--queues={','.join(served + private)}",
            f"--hostname={name}@%h", "--without-mingle", "--without-gossip", f"--loglevel={loglevel}",
        ])
    except SystemExit as exit_:
        if stop_signals or exit_.code not in (0, None):
            raise
    if not stop_signals:
        raise WorkerStoppedError("the worker stopped although nobody asked it to (see the log above); "
                                 "its supervisor should start it again")


def run_per_gpu(argv: list[str], gpus: list[str], name: str) -> int:
    """Start ``argv`` (a worker command) once per GPU with ``--gpus G --name <name>G``; wait for all, forwarding
    SIGTERM/SIGINT."""
    children = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
        children.append(subprocess.Popen([*argv, f"--gpus={gpu}", f"--name={name}{gpu}"], env=env))

    def forward(signum, frame):
        for child in children:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)


def use_gpu(gpu: str) -> None:
    """Pin this process to one GPU; before anything initialises CUDA."""
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        raise WorkerStartError("CUDA was initialised before the worker chose its GPU")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
