"""Runs over the real embedded path: in-process Celery worker on the memory transport, tiny models, SQLite.

Parking is internal (status stays running, the run awaits task ids), approval shows as interrupted, threads carry
their messages and images, cancel stops a run, the sweeper resumes a run whose completion notice was lost, and bad
input gets a typed error.
"""

from __future__ import annotations

import pytest
from flows import register_all
from testkit import wait_for

from mgmflow.models.errors import InvalidInputError
from mgmflow.orchestrator.records import RunNotFound

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(mgmflow_home):
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.workers.settings import Settings

    register_all()
    return RunService(Settings(home=mgmflow_home))


def refine_steps(values: dict) -> list[str]:
    """Every task step a finished test-refine run executed (plan=False: prompt, draft, critique per round)."""
    rounds = values["items"][0]["round"]
    return [f"refine:main:r{r}:{part}" for r in range(rounds) for part in ("prompt", "d0", "d0:critique")]


def test_park_and_resume_keep_the_run_running(service):
    run = service.create_run("test-refine", {"request": "a red fox in snow", "budget": 1})
    parked = wait_for(lambda: (r := service.get_run(run.run_id)).awaited and r, 60, "the run parks on its tasks")
    assert parked.status == "running"  # parking for a GPU task is internal
    final = service.wait(run.run_id, timeout=120)
    assert final.status == "success", final.error
    values = service.output_values(final)
    chosen = values["chosen"]["main"]
    assert service.orchestrator.store.get(chosen, scope=final.scope)[:8] == b"\x89PNG\r\n\x1a\n"
    assert values["artifacts"][0]["tool"] == "diffusion.text2img" and values["artifacts"][0]["round"] == 1
    # every step ran exactly once
    for step in refine_steps(values):
        record = service.orchestrator.client.get(f"{run.run_id}:{step}")
        assert record.status == "done" and record.executions == 1, step
    events = service.events(run.run_id)
    kinds = {(event.type, event.data.get("phase") or event.data.get("status")) for event in events}
    assert {("node", "parked"), ("run", "running"), ("run", "success")} <= kinds
    assert ("run", "interrupted") not in kinds


def test_a_thread_carries_messages_and_images_across_runs(service):
    first = service.create_run("test-turns", {"text": "draw a lighthouse", "draw": True})
    assert service.wait(first.run_id, timeout=120).status == "success"
    second = service.create_run("test-turns", {"text": "now make it red"}, thread_id=first.thread_id)
    assert second.thread_id == first.thread_id
    final = service.wait(second.run_id, timeout=120)
    assert final.status == "success", final.error
    state = service.thread_state(first.thread_id)
    assert state["images_seen"] == [0, 1]  # the second turn's model call was shown the first turn's image
    messages = state["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    image = messages[1]["images"][0]
    assert messages[2]["text"] == "now make it red"
    history = service.thread_history(first.thread_id, limit=50)
    assert {entry["run_id"] for entry in history} >= {first.run_id, second.run_id}
    assert service.orchestrator.store.info(image, scope="default").media_type == "image/png"


def test_approval_interrupt_resumed_with_an_edited_prompt(service):
    run = service.create_run("test-refine", {"request": "a castle", "budget": 1}, approve=True)
    waiting = service.wait(run.run_id, timeout=120)
    assert waiting.status == "interrupted"
    (pending,) = waiting.interrupt
    assert pending["kind"] == "approval" and pending["items"][0]["key"] == "main"
    service.resume(run.run_id, {"approved": True, "prompt": "a blue castle at dawn"})
    final = service.wait(run.run_id, timeout=120)
    assert final.status == "success", final.error
    values = service.output_values(final)
    assert values["artifacts"][0]["prompt"] == "a blue castle at dawn"


def test_cancel_stops_a_parked_run(service):
    run = service.create_run("test-refine", {"request": "a long task", "budget": 3})
    wait_for(lambda: service.get_run(run.run_id).awaited, 60, "the run parks")
    assert service.cancel(run.run_id).status == "cancelled"
    with pytest.raises(TimeoutError):  # it never leaves cancelled, whatever finishes meanwhile
        service.wait(run.run_id, timeout=3, until=("success", "error", "running"))
    assert service.get_run(run.run_id).status == "cancelled"


def test_sweeper_resumes_a_run_whose_completion_notice_was_lost(service, monkeypatch):
    """The first step's completion notice is lost, and the step ends only after its driver let the run go (and
    re-checked readiness, which finds the step unfinished): only the sweeper can resume the run."""
    import threading
    from concurrent.futures import Future

    from mgmflow.workers import faults, steps

    from mgmflow.orchestrator.driver import Orchestrator

    created, parked_by, released, dropped, swept = Future(), set(), threading.Event(), [], []
    point, advance, notify, sweep = faults.point, service.orchestrator.advance, steps._notify, Orchestrator.sweep

    def mine(run_id):
        return run_id == created.result(timeout=60)  # its driver may start before create_run returns

    def ordered(name, **info):
        """The fault points as in-process hooks: the run's steps start their work once the driver that parked the
        run has returned (released its lease, found nothing ready)."""
        if name == "driver.parked" and mine(info["run_id"]):
            parked_by.add(threading.get_ident())
        elif name == "step.acquired" and mine(info["task_id"].split(":", 1)[0]):
            released.wait(60)
        point(name, **info)

    def driving(driven, force=False):
        try:
            advance(driven, force)
        finally:
            if threading.get_ident() in parked_by:
                released.set()

    def lossy(task, header):
        if header.notify and mine(header.notify[1].get("run_id")) and not dropped:
            dropped.append(header.task_id)  # the first completion notice of this run is lost
            return
        notify(task, header)

    def sweeping(orchestrator):
        # Every sweeper of the process counts (earlier tests' services sweep the same home), and none sweeps before
        # the loss: a run sent to a driver early leaves that driver to find it ready itself.
        if not dropped:
            return []
        resent = sweep(orchestrator)
        swept.extend(resent)
        return resent

    monkeypatch.setattr(faults, "point", ordered)
    monkeypatch.setattr(service.orchestrator, "advance", driving)
    monkeypatch.setattr(steps, "_notify", lossy)
    monkeypatch.setattr(Orchestrator, "sweep", sweeping)
    run = service.create_run("test-refine", {"request": "a lost message", "budget": 1})
    created.set_result(run.run_id)
    final = service.wait(run.run_id, timeout=120)
    assert released.is_set(), "the driver that parked the run never returned"
    assert dropped, "no completion notice was dropped"
    assert final.status == "success" and run.run_id in swept


def test_the_sweeper_backs_off_from_a_run_that_stays_idle(service, monkeypatch):
    """A run idle in a backlog is sent again after the grace, then after twice as long each time: not every sweep."""
    import types

    import mgmflow.orchestrator.driver as driver

    orchestrator = service.orchestrator
    sent = []
    monkeypatch.setattr(orchestrator, "dispatch", lambda run_id, force=False: sent.append(run_id))
    run = service.create_run("test-refine", {"request": "waits in a backlog", "budget": 1})  # its message is lost
    start = driver.time.time()
    orchestrator.runs.db.execute("UPDATE mgmflow_runs SET updated_at = ? WHERE run_id = ?",
                                 (start - 3, run.run_id))  # idle for longer than the grace
    now = [start]
    monkeypatch.setattr(driver, "time", types.SimpleNamespace(time=lambda: now[0], monotonic=driver.time.monotonic))
    resent = []
    for seconds in range(17):  # a sweep every second of a backlog of 17 s
        now[0] = start + seconds
        orchestrator.sweep()
        resent.append(sent.count(run.run_id) - 1)
    # sent again at once, then after 4 s and 8 s more: 3 times, not 17
    assert resent == [1] * 4 + [2] * 8 + [3] * 5, resent

    # While messages wait in the orchestration queue, an idle run is probably one of those: it waits longer.
    monkeypatch.setattr(orchestrator, "_backlog", lambda: 12)
    orchestrator._resent.clear()
    now[0] = start + 30
    assert orchestrator.sweep() == []
    now[0] = start + driver.SWEEP_BACKOFF_MAX_S
    assert orchestrator.sweep() == [run.run_id]
    monkeypatch.undo()
    service.cancel(run.run_id)


def test_a_driver_that_died_between_a_nodes_writes_and_its_checkpoint_is_continued(service):
    """A process killed after LangGraph saved a node's writes but before it saved the next checkpoint leaves a
    thread whose latest step has every task done and no `next`: that is not the end of the graph. The restarted
    run must continue to the real end, and reuse its finished steps rather than declare success early."""
    run = service.create_run("test-refine", {"request": "a kite over the sea", "budget": 1})
    assert service.wait(run.run_id, timeout=120).status == "success"
    saver = service.orchestrator.database.saver
    config = {"configurable": {"thread_id": run.thread_id, "checkpoint_ns": ""}}
    # Cut the history back to the checkpoint before `items`, keeping the writes `items` made: the state right after
    # the kill. Its successors (and the refine subgraph's own checkpoints) were never written.
    history = {saved.metadata["step"]: saved.config["configurable"]["checkpoint_id"] for saved in saver.list(config)}
    later = [checkpoint_id for step, checkpoint_id in history.items() if step > 0]
    with saver.cursor() as cursor:
        cursor.execute(f"DELETE FROM checkpoints WHERE thread_id = ? AND (checkpoint_ns != '' OR checkpoint_id IN "
                       f"({', '.join('?' * len(later))}))", (run.thread_id, *later))
    assert service.orchestrator.graph("test-refine").get_state(config).next == ()  # what the driver sees
    service.runs.update(run.run_id, unless_status=(), status="running", awaited=[])

    service.restart(run.run_id)
    final = service.wait(run.run_id, timeout=120)
    assert final.status == "success", final.error
    values = service.output_values(final)
    assert service.orchestrator.store.get(values["chosen"]["main"], scope=final.scope)[:4] == b"\x89PNG"
    for step in refine_steps(values):  # the second pass through refine reused every finished step
        assert service.orchestrator.client.get(f"{run.run_id}:{step}").executions == 1, step


def test_a_driver_whose_lease_was_taken_over_learns_it_at_its_next_renewal(service, monkeypatch):
    orchestrator = service.orchestrator
    monkeypatch.setattr(orchestrator, "lease_s", 0.3)
    run = service.create_run("test-refine", {"request": "a stalled driver", "budget": 1})
    assert service.wait(run.run_id, timeout=120).status == "success"
    assert orchestrator.runs.acquire(run.run_id, "stalled", 0.3)
    with orchestrator._heartbeat(run.run_id, "stalled") as lost:
        assert not lost.wait(0.5)  # renewed in time: still the holder
        orchestrator.runs.db.execute("UPDATE mgmflow_runs SET lease_owner = 'next' WHERE run_id = ?", (run.run_id,))
        assert lost.wait(2)


def test_bad_input_is_a_typed_error(service):
    with pytest.raises(InvalidInputError, match="unknown workflow 'nope'.*test-refine"):
        service.create_run("nope", {})
    with pytest.raises(InvalidInputError, match="budget: Input should be greater than or equal to 1"):
        service.create_run("test-refine", {"request": "x", "budget": 0})
    with pytest.raises(InvalidInputError, match="request"):
        service.create_run("test-refine", {"budget": 1})
    done = service.create_run("test-turns", {"text": "hello"})
    service.wait(done.run_id, timeout=60)
    with pytest.raises(InvalidInputError, match="not waiting for approval"):
        service.resume(done.run_id, {"approved": True})
    with pytest.raises(InvalidInputError, match="belongs to workflow 'test-turns'"):
        service.create_run("test-refine", {"request": "x"}, thread_id=done.thread_id)
    with pytest.raises(RunNotFound):
        service.get_run(done.run_id, scope="someone-else")
