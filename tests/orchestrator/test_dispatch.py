"""Dispatch messages go out in batches from one thread, over a real Redis: every message arrives, in order."""

from __future__ import annotations

import base64
import json
import threading

import pytest
from worker_support import Services

from mgmflow.orchestrator.dispatch import Dispatcher
from mgmflow.workers.app import create_app

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def services(tmp_path, mgmflow_home):
    started = Services(tmp_path, mgmflow_home)
    yield started
    started.close()


def test_messages_queued_during_a_round_trip_go_out_together_and_all_arrive(services):
    import redis as redis_client

    redis = services.redis()
    dispatcher = Dispatcher(create_app(services.settings(redis)), "orchestrator.advance", "dispatch-test")
    batches, release = [], threading.Event()
    publish = dispatcher._publish

    def slow_first_round_trip(batch):
        batches.append(len(batch))
        release.wait(10)  # the broker is slow: what is sent meanwhile waits for the next round trip
        publish(batch)

    dispatcher._publish = slow_first_round_trip
    for number in range(100):
        dispatcher.send({"run_id": f"run-{number}", "force": False})
    release.set()
    assert dispatcher.flush(10)

    assert batches[0] >= 1 and sum(batches) == 100 and len(batches) <= 3  # not one round trip per message
    queued = redis_client.Redis(port=redis.port).lrange("dispatch-test", 0, -1)[::-1]  # LPUSH: oldest last
    bodies = [json.loads(base64.b64decode(json.loads(message)["body"])) for message in queued]
    assert [kwargs["run_id"] for _args, kwargs, _embed in bodies] == [f"run-{number}" for number in range(100)]


def test_a_forked_child_dispatches_with_a_thread_of_its_own(services):
    import os

    import redis as redis_client

    redis = services.redis()
    dispatcher = Dispatcher(create_app(services.settings(redis)), "orchestrator.advance", "fork-test")
    child = os.fork()
    if child == 0:  # the child: its copy of the dispatcher must still publish
        dispatcher.send({"run_id": "from-the-child", "force": False})
        os._exit(0 if dispatcher.flush(10) else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert redis_client.Redis(port=redis.port).llen("fork-test") == 1
