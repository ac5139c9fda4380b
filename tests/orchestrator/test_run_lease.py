"""The run lease seen from the driver, on the real embedded path: its renewal survives database errors, and a stale
driver (one whose lease another took) cannot end or cancel the live run."""

from __future__ import annotations

import sqlite3
import time

import pytest
from flows import register_all
from testkit import wait_for

from mgmflow.models.errors import MGMFlowError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def service(mgmflow_home):
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.workers.settings import Settings

    register_all()
    return RunService(Settings(home=mgmflow_home))


def test_lease_renewal_rides_out_a_database_error(service, monkeypatch):
    orchestrator, calls = service.orchestrator, []

    def renew(run_id, owner, ttl):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        return True

    monkeypatch.setattr(orchestrator, "lease_s", 0.3)
    monkeypatch.setattr(orchestrator.runs, "renew", renew)
    with orchestrator._heartbeat("some-run", "me") as lost:
        time.sleep(1.2)
        assert len(calls) >= 3 and not lost.is_set()  # it kept renewing after the error


def test_a_driver_that_cannot_renew_for_a_whole_lease_stops(service, monkeypatch):
    orchestrator = service.orchestrator

    def renew(run_id, owner, ttl):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(orchestrator, "lease_s", 0.3)
    monkeypatch.setattr(orchestrator.runs, "renew", renew)
    with orchestrator._heartbeat("some-run", "me") as lost:
        assert lost.wait(2)  # its lease may be someone else's by now: it must stop driving


def test_a_stale_driver_ending_in_error_leaves_the_live_run_alone(service):
    run = service.create_run("test-refine", {"request": "a red fox in snow", "budget": 1})
    parked = wait_for(lambda: (r := service.get_run(run.run_id)).awaited and r, 60, "the run parks on its tasks")
    # a driver that lost the run's lease (another one parked it) fails now, and reports its error
    service.orchestrator._finish(parked, "error", "a-stale-driver", MGMFlowError("stale failure"))
    final = service.wait(run.run_id, timeout=120)
    assert final.status == "success", final.error  # neither ended nor cancelled by the stale driver
    for task_id in parked.awaited:
        assert service.orchestrator.client.get(task_id).status == "done"
