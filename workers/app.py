"""The Celery app: JSON only, late acks, one queue per capability and model, priorities.

Queues are ``vlm.<model>``, ``diffusion.<model>``, ``edit.<model>`` and ``orchestrator`` (whose tasks the
orchestrator registers on this app through :func:`get_app`). With no broker configured the app runs over
Celery's in-memory transport and an in-process worker (``mgmflow.workers.embedded``): the same dispatch path.
"""

from __future__ import annotations

import threading

from celery import Celery

from mgmflow.workers.settings import MODEL_FAMILIES, ORCHESTRATOR_QUEUE, Settings, get_settings

# Our step tasks; imported by every app so that workers and clients know the same kinds.
TASK_MODULES = ("mgmflow.workers.tasks.vlm", "mgmflow.workers.tasks.diffusion")

_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def create_app(settings: Settings) -> Celery:
    app = Celery("mgmflow", broker=settings.broker_url or "memory://", set_as_current=False)
    visibility = settings.visibility_timeout
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"], event_serializer="json",
        # Step outcomes live in task records (workers.records); Celery keeps no results of ours.
        task_ignore_result=True, result_expires=settings.result_expires_s,
        # A step is acknowledged only once finished; a killed worker's step is redelivered after the
        # visibility timeout, and records make the second run wait for, or return, the first.
        task_acks_late=True, task_reject_on_worker_lost=True, worker_prefetch_multiplier=1,
        task_default_priority=5, task_default_queue=ORCHESTRATOR_QUEUE,
        task_routes={"orchestrator.*": {"queue": ORCHESTRATOR_QUEUE}},
        broker_transport_options={
            "visibility_timeout": visibility,
            # Redis priorities: 0 is the most urgent; ten real levels instead of the default four.
            "queue_order_strategy": "priority", "priority_steps": list(range(10)), "sep": ":",
            # Sweep for abandoned (unacked) messages often enough to honour a short visibility timeout.
            "unacked_restore_interval": max(1, min(10, int(visibility / 5))), "unacked_restore_throttle": 1,
            # The in-memory transport polls (Redis blocks instead): its 1 s default would add up to 1 s per hop.
            **({} if settings.broker_url else {"polling_interval": 0.02}),
        },
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        include=list(TASK_MODULES),
    )
    for module in TASK_MODULES:  # registers the shared tasks with this app
        __import__(module)
    return app


def get_app(settings: Settings | None = None) -> Celery:
    """The process's app for ``settings``' broker (one per broker URL). The orchestrator registers its tasks here."""
    settings = settings or get_settings()
    key = settings.broker_url or "memory://"
    with _apps_lock:
        if key not in _apps:
            _apps[key] = create_app(settings)
        return _apps[key]


def default_model(settings: Settings, kind: str) -> str | None:
    """The model a task kind runs on unless its payload names another."""
    family, _, operation = kind.partition(".")
    if family == "edit" and operation == "instruct":
        return settings.instruct_model
    return settings.model_for(family) if family in MODEL_FAMILIES else None


def queue_for(kind: str, model: str | None) -> str:
    """``vlm.chat`` on ``mgm-7b`` → ``vlm.mgm-7b``; kinds of other families go to the family's queue."""
    family = kind.partition(".")[0]
    return f"{family}.{model}" if family in MODEL_FAMILIES and model else family


def queue_depth(settings: Settings, queue: str) -> int:
    """Messages waiting in ``queue`` (Redis: every priority level). 0 for a queue the broker does not have (nothing
    ever waited there, or it is empty: Redis drops empty lists); an unreachable broker raises."""
    from amqp.exceptions import ChannelError

    with get_app(settings).connection_for_read() as connection:
        try:
            return connection.default_channel.queue_declare(queue, passive=True).message_count
        except ChannelError:
            return 0
