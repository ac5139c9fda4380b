"""Step kinds for tests only. Workers load them with ``mgmflow worker --include worker_test_steps`` (this folder
on PYTHONPATH); production workers never import this module, so these kinds are unreachable there."""

import os
import signal
import time

from pydantic import BaseModel, ConfigDict

from mgmflow.workers.steps import StepContext, step


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: int
    steps: int = 0
    step_s: float = 0.0


@step("test.echo", EchoInput)
def echo(ctx: StepContext, data: EchoInput) -> dict:
    for index in range(data.steps):
        ctx.check()
        time.sleep(data.step_s)
        ctx.on_step(index + 1, data.steps)
    return {"value": data.value, "pid": os.getpid()}


class PoisonInput(BaseModel):
    pass


@step("test.poison", PoisonInput)
def poison(ctx: StepContext, data: PoisonInput) -> dict:
    os.kill(os.getpid(), signal.SIGKILL)  # what a segfault or the OOM killer does to a worker
    raise AssertionError("unreachable")


class OomInput(BaseModel):
    fail_times: int


@step("test.oom", OomInput)
def oom(ctx: StepContext, data: OomInput) -> dict:
    """Runs out of memory the first ``fail_times`` attempts (counted in Redis), then succeeds."""
    from mgmflow.models.errors import ResourceExhaustedError

    attempt = ctx.runtime.records.redis.incr(f"test:oom:{ctx.header.task_id}")
    if attempt <= data.fail_times:
        raise ResourceExhaustedError(f"CUDA out of memory (attempt {attempt})")
    return {"attempts": attempt}
