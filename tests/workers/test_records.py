"""Task records: the same transitions on Redis (a private redis-server) and SQLite."""

from __future__ import annotations

import threading
import time

import pytest

from mgmflow.workers import records as rec
from mgmflow.workers.batching import Batcher, BatchItem
from mgmflow.models.errors import Cancelled


@pytest.fixture(params=["sqlite", "redis"])
def records(request, tmp_path):
    if request.param == "sqlite":
        return rec.SqliteRecords(tmp_path / "tasks.sqlite")
    services = request.getfixturevalue("services")
    return rec.RedisRecords(rec.redis_client(services.redis().url), ttl_s=3600)


def header(task_id="run:step", run_id="run"):
    return rec.StepHeader(task_id, "test.echo", run_id, "scope", ["orchestrator.resume", {"run_id": run_id}])


def test_lifecycle_idempotent_submit_and_exactly_one_completion(records):
    h = header()
    assert records.register(h, resend_after_s=60) is True
    assert records.register(h, resend_after_s=60) is False  # queued recently: no second message
    assert records.get(h.task_id).status == rec.QUEUED
    assert records.acquire(h, "w1", lease_s=5, max_deliveries=3) == (rec.ACQUIRED, 1)
    assert records.acquire(h, "w2", lease_s=5, max_deliveries=3) == (rec.BUSY, 0)  # a duplicate waits
    assert records.start(h.task_id, "w2", 5) is False and records.start(h.task_id, "w1", 5) is True
    assert records.register(h, resend_after_s=0) is False  # running under a live lease
    assert records.finish(h.task_id, "w2", rec.DONE, result={"x": 2}) == "lost"
    assert records.finish(h.task_id, "w1", rec.DONE, result={"x": 1}) == "ok"
    assert records.acquire(h, "w3", lease_s=5, max_deliveries=3) == (rec.FINISHED, 0)
    record = records.get(h.task_id)
    assert (record.status, record.result, record.executions, record.deliveries) == (rec.DONE, {"x": 1}, 1, 1)
    assert record.notify == ["orchestrator.resume", {"run_id": "run"}]


def test_a_lapsed_lease_is_taken_over_and_the_old_owner_cannot_finish(records):
    h = header()
    records.register(h, resend_after_s=60)
    records.acquire(h, "w1", lease_s=0.2, max_deliveries=3)
    time.sleep(0.3)
    assert records.register(h, resend_after_s=60) is True  # its message may be lost: send a copy
    assert records.acquire(h, "w2", lease_s=5, max_deliveries=3) == (rec.ACQUIRED, 2)
    assert records.renew(h.task_id, "w1", 5) is False and records.renew(h.task_id, "w2", 5) is True
    assert records.start(h.task_id, "w1", 5) is False and records.start(h.task_id, "w2", 5) is True
    assert records.finish(h.task_id, "w1", rec.DONE, result={}) == "lost"
    assert records.finish(h.task_id, "w2", rec.DONE, result={}) == "ok"
    assert records.get(h.task_id).executions == 1


def test_a_worker_waking_past_its_lease_takes_the_step_back_when_nobody_else_did(records):
    h = header()
    records.register(h, resend_after_s=60)
    records.acquire(h, "w1", lease_s=0.2, max_deliveries=3)
    time.sleep(0.3)  # stalled past its lease; no copy took the step over
    assert records.renew(h.task_id, "w1", 5) is True and records.lease_held(h.task_id)
    assert records.acquire(h, "w2", lease_s=5, max_deliveries=3) == (rec.BUSY, 0)
    assert records.finish(h.task_id, "w1", rec.DONE, result={"x": 1}) == "ok"


def test_executions_count_every_start_of_the_work(records):
    h = header()
    records.acquire(h, "w1", lease_s=0.2, max_deliveries=3)
    assert records.start(h.task_id, "w1", 0.2)
    time.sleep(0.3)  # its worker died mid-step: the next one starts the work again, and that is counted
    records.acquire(h, "w2", lease_s=5, max_deliveries=3)
    assert records.start(h.task_id, "w2", 5)
    records.finish(h.task_id, "w2", rec.DONE, result={})
    assert records.get(h.task_id).executions == 2


def test_an_outcome_is_kept_even_when_the_record_vanished_under_its_step(records):
    h = header()
    records.acquire(h, "w1", lease_s=5, max_deliveries=3)
    records.delete_run("run")  # (as an expiry or an eviction would)
    assert records.finish(h.task_id, "w1", rec.DONE, result={"x": 1}) == "ok"
    assert (records.get(h.task_id).status, records.get(h.task_id).result) == (rec.DONE, {"x": 1})


def test_unfinished_steps_are_watched_once_each_until_they_end(records):
    h = header()
    message = {"body": {"header": h.to_dict(), "payload": {}}, "queue": "q", "priority": 5}
    records.register(h, resend_after_s=60, message=message, watch_after_s=0)
    assert records.watch_due(limit=10, recheck_s=60) == [h.task_id]
    assert records.watch_due(limit=10, recheck_s=60) == []  # claimed: another process skips it
    assert records.message(h.task_id) == message
    records.resent(h.task_id, next_check=time.time() - 1)
    assert records.get(h.task_id).resends == 1 and records.watch_due(limit=10, recheck_s=60) == [h.task_id]
    records.acquire(h, "w1", lease_s=5, max_deliveries=3)
    records.finish(h.task_id, "w1", rec.DONE, result={})
    time.sleep(0.01)
    assert records.watch_due(limit=10, recheck_s=60) == []  # finished: no longer watched


def test_quarantine_after_max_deliveries(records):
    h = header()
    for owner in ("w1", "w2"):
        assert records.acquire(h, owner, lease_s=0.05, max_deliveries=2)[0] == rec.ACQUIRED
        time.sleep(0.1)
    assert records.acquire(h, "w3", lease_s=5, max_deliveries=2) == (rec.QUARANTINED, 3)
    record = records.get(h.task_id)
    assert record.status == rec.QUARANTINED and "started 2 times" in record.error["message"]


def test_release_for_retry_is_not_counted_and_wait_wakes_on_finish(records):
    h = header()
    records.acquire(h, "w1", lease_s=5, max_deliveries=1)
    records.release(h.task_id, "w1")
    assert records.get(h.task_id).status == rec.QUEUED
    assert records.acquire(h, "w2", lease_s=5, max_deliveries=1) == (rec.ACQUIRED, 1)
    threading.Timer(0.2, records.finish, (h.task_id, "w2", rec.FAILED),
                    {"error": {"code": "x", "message": "m", "retryable": False}}).start()
    started = time.monotonic()
    assert records.wait(h.task_id, timeout=10).status == rec.FAILED
    assert time.monotonic() - started < 2


def test_cancel_run_cancels_queued_steps_and_flags_running_ones(records):
    queued, running, other = header("run:a"), header("run:b"), header("else:a", run_id="else")
    for h in (queued, running, other):
        records.register(h, resend_after_s=60)
    records.acquire(running, "w1", lease_s=5, max_deliveries=3)
    records.cancel_run("run")
    assert records.get("run:a").status == rec.CANCELLED
    assert records.get("run:b").status == rec.RUNNING and records.is_cancelled("run", "run:b")
    assert not records.is_cancelled("else", "else:a")
    records.cancel_task("else:a")
    assert records.is_cancelled("else", "else:a")
    records.delete_run("run")
    assert records.get("run:a") is None and records.get("else:a") is not None


def _gather(batcher: Batcher, requests: list[tuple[int, str]]) -> dict[int, int]:
    """Submit ``requests`` ((request, key)) from one thread each, 20 ms apart; their results."""
    results = {}
    threads = [threading.Thread(target=lambda r=r, k=k: results.update({r: batcher(BatchItem(r, k))}))
               for r, k in requests]
    for thread in threads:
        thread.start()
        time.sleep(0.02)
    for thread in threads:
        thread.join(5)
    return results


@pytest.mark.parametrize("mix_keys, batches", [
    (False, [[1, 2, 4], [3, 6], [5]]),  # an incompatible request waits for a batch of its key
    (True, [[1, 2, 4, 3], [5, 6]]),  # a batch not full after the window takes other keys, in arrival order
])
def test_batcher_gathers_compatible_requests_and_answers_each(mix_keys, batches):
    calls = []

    def run(items, check):
        calls.append([item.request for item in items])
        check()
        return [item.request * 10 for item in items]

    batcher = Batcher(run, max_size=4, window_s=0.3, mix_keys=mix_keys)
    requests = [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c"), (6, "b")]
    assert _gather(batcher, requests) == {r: r * 10 for r, _ in requests}
    assert calls == batches


def test_batcher_answers_a_stopped_request_at_once_and_stops_when_all_are():
    cancelled = threading.Event()
    steps = []

    def run(items, check):
        for step in range(100):
            check()
            steps.append(step)
            time.sleep(0.01)
        return [0 for _ in items]

    def stop():
        if cancelled.is_set():
            raise Cancelled("cancelled by request")

    batcher = Batcher(run, max_size=2, window_s=0)
    threading.Timer(0.1, cancelled.set).start()
    with pytest.raises(Cancelled):
        batcher(BatchItem("r", "k", check=stop), timeout=5)
    time.sleep(0.05)
    assert len(steps) < 30



@pytest.mark.parametrize("wait_share, calls", [
    (0.0, [["slow"], ["waiting"], ["late"]]),  # the late request misses the call that started as the slow one ended
    (0.5, [["slow"], ["waiting", "late"]]),  # requests were waiting: the next call waits up to 0.5 s for more
])
def test_a_busy_batcher_waits_a_share_of_its_last_call_for_late_requests(wait_share, calls):
    made, slow_done = [], threading.Event()

    def run(items, check):
        made.append([item.request for item in items])
        if items[0].request == "slow":
            time.sleep(1.0)
            slow_done.set()
        return [None for _ in items]

    batcher = Batcher(run, max_size=4, window_s=0.0, wait_share=wait_share)

    def late():
        slow_done.wait(5)
        time.sleep(0.1)  # set off by the slow call's results, a hop later
        batcher(BatchItem("late", "k"))

    threads = [threading.Thread(target=batcher, args=(BatchItem("slow", "k"),)),
               threading.Thread(target=lambda: (time.sleep(0.2), batcher(BatchItem("waiting", "k")))),
               threading.Thread(target=late)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert made == calls
    # A request that finds the model idle does not wait, however long the last call was.
    batcher(BatchItem("slow", "k"), timeout=5)
    started = time.monotonic()
    batcher(BatchItem("alone", "k"), timeout=5)
    assert time.monotonic() - started < 0.3
