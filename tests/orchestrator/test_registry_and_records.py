"""Workflow discovery through entry points, state reducers, schemas, and run records on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import BaseModel, Field

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator import workflow as registry
from mgmflow.orchestrator.checkpoint import open_database
from mgmflow.orchestrator.records import RunInfo, RunNotFound, RunStore
from mgmflow.orchestrator.schemas import Critique, Regions, SceneList
from mgmflow.orchestrator.state import lineage, merge_artifacts
from mgmflow.workers.settings import Settings


def test_entry_point_discovery(tmp_path, monkeypatch):
    """A user's package registers a workflow through its metadata alone, without touching the orchestrator."""
    package = tmp_path / "userflows.py"
    package.write_text(textwrap.dedent("""
        from pydantic import BaseModel
        from langgraph.graph import StateGraph
        from mgmflow.orchestrator.workflow import Workflow

        class Input(BaseModel):
            text: str

        workflow = Workflow("echo-user", Input, lambda: StateGraph(dict), description="a user's workflow")
        broken = 42
    """))
    dist = tmp_path / "userflows-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: userflows\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[mgmflow.workflows]\necho-user = userflows:workflow\nnot-a-workflow = userflows:broken\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = registry.load_workflows()
    assert found["echo-user"].description == "a user's workflow"
    assert "not-a-workflow" not in found
    with pytest.raises(InvalidInputError, match="unknown workflow 'nope'.*echo-user"):
        registry.get_workflow("nope")
    sys.modules.pop("userflows", None)


def test_input_validation_names_the_field():
    class Input(BaseModel):
        pages: int = Field(ge=1, le=64)

    flow = registry.Workflow("t", Input, lambda: None)
    with pytest.raises(InvalidInputError, match="pages: Input should be less than or equal to 64"):
        flow.validate_input({"pages": 65})


def test_merge_artifacts_and_lineage():
    state = {"artifacts": merge_artifacts([{"id": "a", "parent": None}], [{"id": "b", "parent": "a"}])}
    state["artifacts"] = merge_artifacts(state["artifacts"], [{"id": "b", "scores": {"critique": 7}}, {"id": "c", "parent": "b"}])
    assert [ref["id"] for ref in state["artifacts"]] == ["a", "b", "c"]
    assert state["artifacts"][1] == {"id": "b", "parent": "a", "scores": {"critique": 7}}
    assert [ref["id"] for ref in lineage(state, "c")] == ["c", "b", "a"]


def test_schemas_are_bounded_for_constrained_decoding():
    schema = SceneList.json_schema(scenes=4)
    assert schema["properties"]["scenes"]["minItems"] == schema["properties"]["scenes"]["maxItems"] == 4
    assert "$ref" not in str(schema) and schema["properties"]["scenes"]["items"]["properties"]["title"]["maxLength"]
    assert Critique.json_schema()["properties"]["verdict"]["enum"] == ["accept", "refine", "edit"]
    # a weak model's degenerate box still gives a usable, ordered region
    (region,) = Regions.model_validate({"regions": [{"x0": 0.9, "y0": 0.5, "x1": 0.2, "y1": 0.5, "question": "?"}]}).regions
    assert region.x0 < region.x1 and region.y1 - region.y0 == pytest.approx(0.05)


def _store(url: str, tmp_path) -> RunStore:
    settings = Settings(home=tmp_path, database_url=url)
    return RunStore(open_database(settings))


def _run(run_id: str, thread_id: str, **fields) -> RunInfo:
    return RunInfo(run_id=run_id, thread_id=thread_id, workflow="w", status="pending", scope="s", input={"x": 1},
                   **fields)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return _store(None, tmp_path)
    return _store(request.getfixturevalue("postgres_url"), tmp_path)


def test_records_roundtrip_idempotency_and_serial_threads(store):
    thread = store.create_thread(scope="s")["thread_id"]
    first = store.insert(_run("r1", thread, idempotency_key="k"))
    again = store.insert(_run("r2", thread, idempotency_key="k"))
    assert again.run_id == "r1" and first.input == {"x": 1}
    time.sleep(0.01)
    second = store.insert(_run("r3", thread))
    assert store.blocking_run(second) == "r1" and store.next_pending(thread) == "r1"
    assert store.update("r1", status="success")
    assert not store.update("r1", status="running")  # a finished run stays finished
    assert store.blocking_run(second) is None
    with pytest.raises(RunNotFound):
        store.get("r1", scope="other")


def test_active_at_least_counts_one_scopes_unfinished_runs(store):
    thread = store.create_thread(scope="s")["thread_id"]
    for number in range(3):
        store.insert(_run(f"w{number}", thread))
    store.insert(_run("started", thread))
    store.update("started", status="running")
    store.insert(_run("done", thread))
    store.update("done", status="success")
    other = store.create_thread(scope="other")["thread_id"]
    store.insert(RunInfo(run_id="elsewhere", thread_id=other, workflow="wf", status="pending", scope="other",
                         input={}))
    assert store.active_at_least("s", 4) and not store.active_at_least("s", 5)  # waiting and running, not done
    assert store.active_at_least("other", 1) and not store.active_at_least("other", 2)


def test_lease_is_exclusive_until_released_or_expired(store):
    thread = store.create_thread(scope="s")["thread_id"]
    store.insert(_run("lease", thread))
    assert store.acquire("lease", "a", 30)
    assert not store.acquire("lease", "b", 30)
    store.release("lease", "a")
    assert store.acquire("lease", "b", 0.05)
    time.sleep(0.1)
    assert store.acquire("lease", "a", 30)  # b's lease expired: b died, or stalled
    assert not store.renew("lease", "b", 30)
    # a stalled driver that wakes up cannot record anything: the run is a's now
    assert not store.update("lease", owner="b", status="success")
    assert store.get("lease").status == "pending"
    assert store.update("lease", owner="a", status="running")


# The runs table as the first release created it (before previews and webhooks).
_FIRST_RUNS_TABLE = """CREATE TABLE mgmflow_runs (
    run_id TEXT PRIMARY KEY, thread_id TEXT NOT NULL, workflow TEXT NOT NULL, status TEXT NOT NULL,
    scope TEXT NOT NULL, input TEXT NOT NULL, approve INTEGER NOT NULL, priority INTEGER NOT NULL,
    idempotency_key TEXT, awaited TEXT NOT NULL, interrupt TEXT, error TEXT, metadata TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, resume_value TEXT,
    lease_owner TEXT, lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0)"""


@pytest.mark.parametrize("dialect", ["sqlite", "postgres"])
def test_a_database_of_the_first_release_gains_the_new_columns(dialect, request, tmp_path):
    url = None if dialect == "sqlite" else request.getfixturevalue("postgres_url")
    database = open_database(Settings(home=tmp_path, database_url=url))
    database.execute(_FIRST_RUNS_TABLE)
    database.execute(
        "INSERT INTO mgmflow_runs (run_id, thread_id, workflow, status, scope, input, approve, priority, awaited,"
        " metadata, created_at, updated_at) VALUES ('old', 't', 'w', 'success', 's', '{}', 0, 5, '[]', '{}', 1, 1)"
    )
    store = RunStore(database)
    RunStore(database)  # a second process opening it finds nothing to add
    old = store.get("old")
    assert (old.previews, old.webhook, old.webhook_status) == (0, None, None)
    assert store.due_webhooks() == []
    new = store.insert(_run("new", "t", previews=3, webhook="http://h/x", webhook_status="pending"))
    assert (new.previews, new.webhook, new.webhook_status) == (3, "http://h/x", "pending")


def test_webhook_delivery_state(store):
    thread = store.create_thread(scope="s")["thread_id"]
    store.insert(_run("hooked", thread, webhook="http://h/x", webhook_status="pending"))
    store.insert(_run("plain", thread))
    assert store.due_webhooks() == []  # not before the run has ended
    store.update("hooked", status="success")
    store.update("plain", status="success")
    (due,) = store.due_webhooks()
    assert (due.run_id, due.scope, due.url, due.attempts) == ("hooked", "s", "http://h/x", 0)
    assert store.claim_webhook(due, for_s=60)
    assert not store.claim_webhook(due, for_s=60)  # one process per attempt
    assert store.due_webhooks() == []  # claimed: not due until the claim lapses
    store.webhook_attempted("hooked", error="HTTPStatusError: 500", retry_at=time.time() - 1)
    (again,) = store.due_webhooks()
    assert again.attempts == 1 and store.webhook_state("hooked")["error"] == "HTTPStatusError: 500"
    assert store.claim_webhook(again, for_s=60)
    store.release_webhook("hooked")  # a stopping process gives it back without counting an attempt
    (again,) = store.due_webhooks()
    assert again.attempts == 1 and store.claim_webhook(again, for_s=60)
    store.webhook_attempted("hooked", error=None, retry_at=None)
    state = store.webhook_state("hooked")
    assert (state["status"], state["attempts"], state["error"]) == ("delivered", 2, None)
    assert store.due_webhooks() == [] and store.get("hooked").webhook_status == "delivered"


def test_admitting_a_story_and_sizing_its_prompts_imports_no_torch():
    """The orchestrator reads prompt budgets from the presets' specs: a process that admits a run (the API, the CLI)
    or runs its first step (the orchestration worker) must not wait seconds for torch and transformers to import."""
    script = (
        "import sys\n"
        "from mgmflow.orchestrator.budget import budget_for\n"
        "from mgmflow.orchestrator.workflow import load_workflows\n"
        "story = load_workflows()['story']\n"
        "story.validate_input({'premise': 'A lighthouse keeper befriends a whale.', 'pages': 8}, budget_for('small'))\n"
        "assert budget_for('small').image_tokens == 576\n"
        "loaded = sorted({'torch', 'transformers', 'diffusers'} & set(sys.modules))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
