"""Helpers of the orchestrator tests.

``ScriptedClient`` stands in for the workers' TaskClient only in the graph-shape tests (routing with scripted
model outputs): it answers each task from a script, at once or when released, so that park/resume of a graph can
be driven step by step. Every runtime test of the real dispatch path uses ``mgmflow.workers.client.TaskClient``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from mgmflow.orchestrator.runtime import RunContext


@dataclass
class Record:
    task_id: str
    status: str
    result: Any = None
    error: Any = None


@dataclass
class ScriptedClient:
    """Answers ``submit(kind, payload)`` with ``script(kind, payload, step)``; ``hold`` keeps tasks queued."""

    script: Callable[[str, dict, str], dict]
    hold: bool = False
    records: dict[str, Record] = field(default_factory=dict)
    submitted: list[tuple[str, str, dict]] = field(default_factory=list)
    events: list[tuple[str, dict]] = field(default_factory=list)

    def submit(self, kind, payload, *, task_id, run_id, scope, priority=5, notify=None):
        assert json.dumps(payload)  # payloads must be JSON
        if task_id in self.records:
            return  # idempotent per task id
        self.submitted.append((task_id, kind, payload))
        self.records[task_id] = Record(task_id, "queued")
        self._pending = getattr(self, "_pending", []) + [(task_id, kind, payload)]
        if not self.hold:
            self.release()

    def release(self, only: Callable[[str], bool] = lambda task_id: True) -> None:
        """Finish the queued tasks (those whose id ``only`` accepts); the others stay queued."""
        held = []
        for task_id, kind, payload in getattr(self, "_pending", []):
            if not only(task_id):
                held.append((task_id, kind, payload))
                continue
            step = task_id.split(":", 1)[1]
            self.records[task_id] = Record(task_id, "done", self.script(kind, payload, step))
        self._pending = held

    def get(self, task_id):
        return self.records.get(task_id)

    def publish(self, run_id, type, data):
        self.events.append((type, data))

    def cancel(self, run_id):
        pass


def scripted_context(client: ScriptedClient, *, store: Any = None, approve: bool = False,
                     run_id: str = "run-1") -> RunContext:
    return RunContext(run_id=run_id, thread_id="thread-1", scope="test", settings=None, client=client, store=store,
                      approve=approve)


def drive(graph, state: dict, client: ScriptedClient, *, context: RunContext | None = None, approve: bool = False,
          answers: list | None = None, max_parks: int = 100, checkpointer: Any = None,
          releasing: Callable[[str], bool] = lambda task_id: True) -> dict:
    """Run a graph to its end like the driver does: on each park, release the tasks and resume.

    ``answers`` are resume values for approval interrupts, in order; ``releasing`` picks the tasks that finish at
    each park (a hook on the order steps finish in). Returns the final state values. Runs given the same
    ``checkpointer`` are turns of one thread (give each its own ``run_id`` in ``context``).
    """
    compiled = graph.compile(checkpointer=checkpointer or InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    context = context or scripted_context(client, approve=approve)
    answers = list(answers or [])
    command: Any = state
    for _ in range(max_parks):
        compiled.invoke(command, config, context=context)
        snapshot = compiled.get_state(config)
        if not snapshot.interrupts:
            return dict(snapshot.values)
        resume = {}
        for pending in snapshot.interrupts:
            if pending.value["kind"] == "approval":
                resume[pending.id] = answers.pop(0)
            else:
                client.release(releasing)
                resume[pending.id] = {}
        command = Command(resume=resume)
    raise AssertionError("graph did not finish")




def die_at_submission(client: ScriptedClient, ending: str) -> list[str]:
    """The process dies (``SystemError``) the first time a task whose id ends with ``ending`` is submitted; returns
    the list that then holds that id."""
    submit, died = client.submit, []

    def dying_submit(kind, payload, *, task_id, **options):
        if task_id.endswith(ending) and not died:
            died.append(task_id)
            raise SystemError("the process died")
        return submit(kind, payload, task_id=task_id, **options)

    client.submit = dying_submit
    return died


def drive_on(compiled, config: dict, context: RunContext, client: ScriptedClient, max_steps: int = 50) -> dict:
    """The driver again after a crash: from the last checkpoint, resume the parked node or continue the interrupted
    step, every task finishing at each park, to the end. Returns the final state values."""
    for _ in range(max_steps):
        snapshot = compiled.get_state(config)
        if not snapshot.next:
            return dict(snapshot.values)
        command = Command(resume={i.id: {} for i in snapshot.interrupts}) if snapshot.interrupts else None
        compiled.invoke(command, config, context=context)
        client.release()
    raise AssertionError("graph did not finish")
