"""Tasks for bench_workers.py: our no-op step and a bare Celery no-op on the same Redis."""

import os

from celery import Celery
from pydantic import BaseModel

from mgmflow.workers.steps import StepContext, step


class NoopInput(BaseModel):
    value: int = 0


@step("bench.noop", NoopInput)
def noop(ctx: StepContext, data: NoopInput) -> dict:
    return {"value": data.value}


url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
bare = Celery("bare", broker=url, backend=url)
bare.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                 worker_prefetch_multiplier=1, task_acks_late=True, worker_hijack_root_logger=False)


@bare.task(name="bare.noop")
def bare_noop(value: int = 0) -> dict:
    return {"value": value}
