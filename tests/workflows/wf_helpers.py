"""Helpers of the workflow tests: a scripted-client driver for graph-shape tests, run waiting, tiny sizes.

Graph-shape tests reuse the orchestrator tests' ``ScriptedClient`` (scripted model outputs); every end-to-end test
goes through ``mgmflow.orchestrator.runs.RunService`` and the real tiny models.
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS / "orchestrator"))

from orch_helpers import ScriptedClient, die_at_submission, drive, drive_on, scripted_context  # noqa: E402,F401

# Tiny pages keep the end-to-end runs fast on two cores.
TINY = {"width": 64, "height": 64, "steps": 2}


def finish(service, run, timeout: float = 240):
    """Wait for ``run`` to end; fail with its error if it did not succeed."""
    done = service.wait(run.run_id, timeout=timeout)
    assert done.status == "success", f"run ended {done.status}: {done.error}"
    return done
