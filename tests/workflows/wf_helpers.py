"""Helpers of the workflow tests: a scripted-client driver for graph-shape tests, run waiting, tiny sizes.

Graph-shape tests reuse the orchestrator tests' ``ScriptedClient`` (scripted model outputs); every end-to-end test
goes through ``orchestrator.runs.RunService`` and the real tiny models.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "orchestrator"))

from orch_helpers import ScriptedClient  # noqa: E402,F401

# Tiny pages keep the end-to-end runs fast on two cores.
TINY = {"width": 64, "height": 64, "steps": 2}

def finish(service, run, timeout: float = 240):
    """Wait for ``run`` to end; fail with its error if it did not succeed."""
    done = service.wait(run.run_id, timeout=timeout)
    assert done.status == "success", f"run ended {done.status}: {done.error}"
    return done


def scripted_context(client, store, *, approve: bool = False, run_id: str = "run-1"):
    from orchestrator.runtime import RunContext

    return RunContext(run_id=run_id, thread_id="thread-1", scope="test", settings=None, client=client, store=store,
                      approve=approve)


def drive(graph, state: dict, context, client, *, answers: list | None = None) -> dict:
    """Run an uncompiled graph to its end like the driver: at each park, release the tasks and resume."""
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.types import Command

    compiled = graph.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    answers = list(answers or [])
    command = state
    for _ in range(200):
        compiled.invoke(command, config, context=context)
        snapshot = compiled.get_state(config)
        if not snapshot.interrupts:
            return dict(snapshot.values)
        resume = {}
        for pending in snapshot.interrupts:
            if pending.value["kind"] == "approval":
                resume[pending.id] = answers.pop(0)
            else:
                client.release()
                resume[pending.id] = {}
        command = Command(resume=resume)
    raise AssertionError("graph did not finish")
