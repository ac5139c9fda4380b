"""Distributed: a real redis-server and real `mgmflow worker` subprocesses on tiny models; faults by kill -9."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import worker_test_steps  # noqa: E402,F401 — registers the test-only kinds in this process too
from testkit import wait_for  # noqa: E402
from worker_support import MGMFLOW, Services  # noqa: E402
from payloads import check_result, inputs, round_trip_payloads  # noqa: E402

from mgmflow.workers.client import TaskClient  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, mgmflow_home):
    """One Redis and one `mgmflow worker` with no queue arguments: every queue, default tiny presets."""
    services = Services(tmp_path_factory.mktemp("stack"), mgmflow_home)
    redis = services.redis()
    worker = services.worker(redis, "", batch_window_ms=400)
    client = TaskClient(services.settings(redis, batch_window_ms=400))
    worker.wait_ready(timeout=180)
    yield services, client, worker
    services.close()


def test_every_kind_round_trips_on_a_default_worker(stack):
    _, client, _ = stack
    image, mask = inputs(client)
    for kind, payload in round_trip_payloads(image, mask).items():
        client.submit(kind, payload, task_id=f"rt:{kind}", run_id="rt", scope="alice")
    for kind in round_trip_payloads(image, mask):
        record = client.wait(f"rt:{kind}", timeout=120)
        assert record.status == "done", (kind, record.error)
        check_result(client, kind, record.result)
    steps = [e.data for e in client.events("rt")
             if e.type == "task.step" and e.data["task_id"] == "rt:diffusion.text2img"]
    assert [(s["step"], "preview" in s) for s in steps] == [(1, False), (2, True), (3, True)]  # every 2nd, and last
    preview = client.store.get(steps[-1]["preview"], scope="alice")
    assert Image.open(io.BytesIO(preview)).size == (8, 8)  # latent resolution: 1/8 of the 64x64 image


def test_bad_input_fails_clearly_and_the_worker_keeps_serving(stack):
    _, client, _ = stack
    image, _ = inputs(client, scope="alice")
    foreign, _ = inputs(client, scope="mallory")
    cases = {
        "missing": ("vlm.describe", {"image": "A" * 22}, "artifact_not_found"),
        "foreign": ("edit.img2img", {"prompts": ["x"], "image": foreign, "steps": 2}, "artifact_not_found"),
        "types": ("diffusion.text2img", {"prompts": "not a list", "steps": "many"}, "invalid_input"),
        "unknown_field": ("vlm.describe", {"image": image, "colour": "red"}, "invalid_input"),
        "engine_check": ("diffusion.text2img", {"prompts": ["x"], "width": 65, "height": 64}, "invalid_input"),
        "not_an_image": ("vlm.describe", {"image": client.store.put(b"GIF89a?", scope="alice",
                                                                    media_type="image/gif", metadata={}).id},
                         "invalid_image"),
    }
    for name, (kind, payload, _) in cases.items():
        client.submit(kind, payload, task_id=f"bad:{name}", run_id="bad", scope="alice")
    for name, (_, _, code) in cases.items():
        record = client.wait(f"bad:{name}", timeout=60)
        assert record.status == "failed" and record.error["code"] == code, (name, record.error)
        assert record.error["message"] and record.error["retryable"] is False
    client.submit("diffusion.text2img", {"prompts": ["still here"], "seeds": [5], "steps": 2},
                  task_id="bad:after", run_id="bad", scope="alice")
    assert client.wait("bad:after", timeout=60).status == "done"


def test_concurrent_requests_share_one_batch_each_with_its_own_result(stack):
    _, client, _ = stack
    image, _ = inputs(client)
    prompts = ["a red fox", "a blue whale", "a green tree", "a yellow sun"]
    for index, prompt in enumerate(prompts):
        client.submit("diffusion.text2img", {"prompts": [prompt], "seeds": [100 + index], "steps": 2},
                      task_id=f"batch:{index}", run_id="batch", scope="alice")
    records = [client.wait(f"batch:{index}", timeout=60) for index in range(4)]
    assert [r.result["batch_size"] for r in records] == [4, 4, 4, 4]
    from mgmflow.models.diffusion import read_parameters

    for index, record in enumerate(records):
        parameters = read_parameters(client.store.get(record.result["images"][0]["artifact"], scope="alice"))
        assert (parameters["prompt"], parameters["seed"]) == (prompts[index], 100 + index)
    # VLM batching: each concurrent turn gets the answer it gets alone
    for index in range(3):
        client.submit("vlm.describe", {"image": image, "prompt": f"question {index}", "max_new_tokens": 6},
                      task_id=f"vbatch:{index}", run_id="vbatch", scope="alice")
    batched = [client.wait(f"vbatch:{index}", timeout=60).result for index in range(3)]
    assert [r["batch_size"] for r in batched] == [3, 3, 3]
    for index in range(3):
        client.submit("vlm.describe", {"image": image, "prompt": f"question {index}", "max_new_tokens": 6},
                      task_id=f"vsingle:{index}", run_id="vsingle", scope="alice")
        alone = client.wait(f"vsingle:{index}", timeout=60).result
        assert alone["batch_size"] == 1 and alone["text"] == batched[index]["text"]


def test_cancel_stops_a_running_diffusion_task(stack):
    _, client, _ = stack
    client.submit("diffusion.text2img", {"prompts": ["a long one"], "seeds": [1], "steps": 200},
                  task_id="cancel:a", run_id="cancel", scope="alice")
    client.wait_for_event("cancel", lambda e: e.type == "task.step", timeout=60)
    client.cancel("cancel")
    record = client.wait("cancel:a", timeout=30)
    assert record.status == "cancelled" and record.error["code"] == "cancelled" and record.executions == 1
    steps = [e.data["step"] for e in client.events("cancel") if e.type == "task.step"]
    assert steps[-1] < 200


@pytest.fixture(scope="module")
def pair(tmp_path_factory, mgmflow_home):
    """One Redis and two workers serving vlm and diffusion; ``live()`` restarts any that a test killed."""
    services = Services(tmp_path_factory.mktemp("pair"), mgmflow_home)
    redis = services.redis()
    workers = [services.worker(redis, "vlm,diffusion") for _ in range(2)]
    client = TaskClient(services.settings(redis))

    def live():
        for index, worker in enumerate(workers):
            if worker.process.poll() is not None:
                workers[index] = services.worker(redis, "vlm,diffusion")
        for worker in workers:
            worker.wait_ready(timeout=180)
        return workers

    yield client, live
    services.close()


def test_a_worker_killed_mid_step_is_redelivered_and_the_step_runs_once(pair):
    client, live = pair
    first, second = live()
    client.submit("diffusion.text2img", {"prompts": ["a fox"], "seeds": [3], "steps": 60},
                  task_id="kill:a", run_id="kill", scope="alice")
    client.wait_for_event("kill", lambda e: e.type == "task.step", timeout=60)
    owner_pid = int(client.get("kill:a").owner.split(":")[1])
    victim, survivor = (first, second) if first.process.pid == owner_pid else (second, first)
    victim.kill()
    started = time.monotonic()
    record = client.wait("kill:a", timeout=60)
    assert record.status == "done" and int(record.owner.split(":")[1]) == survivor.process.pid
    assert record.executions == 2 and record.deliveries == 2  # its work started in the victim, then once more
    assert time.monotonic() - started < 30  # picked up again well within 30 s
    finished = [e for e in client.events("kill") if e.type == "task.finished"]
    assert len(finished) == 1


def test_redis_killed_with_queued_tasks_loses_none(services):
    redis = services.redis(persistent=True)
    worker = services.worker(redis, "test", "--concurrency=1")
    client = TaskClient(services.settings(redis))
    worker.wait_ready()
    for index in range(8):
        client.submit("test.echo", {"value": index, "steps": 2, "step_s": 0.2},
                      task_id=f"aof:{index}", run_id="aof", scope="s")
    client.wait_for_event("aof", lambda e: e.type == "task.step", timeout=30)
    redis.kill()
    time.sleep(1.0)
    redis.start()
    records = [client.wait(f"aof:{index}", timeout=90) for index in range(8)]
    assert [r.status for r in records] == ["done"] * 8
    assert [r.result["value"] for r in records] == list(range(8))
    assert all(r.executions == 1 for r in records)


def test_a_poison_task_is_quarantined_after_max_deliveries(services):
    redis = services.redis()
    client = TaskClient(services.settings(redis))
    client.submit("test.poison", {}, task_id="poison:a", run_id="poison", scope="s")
    deaths = 0
    # A supervisor (systemd, Kubernetes) restarts a worker that dies; here the test does.
    while not client.get("poison:a").final:
        worker = services.worker(redis, "test")
        wait_for(lambda: worker.process.poll() is not None or client.get("poison:a").final, 60, "a delivery")
        deaths += worker.process.poll() is not None
        worker.kill()
        assert deaths <= 3, "the poison task keeps being delivered"
    record = client.get("poison:a")
    assert record.status == "quarantined" and record.error["code"] == "quarantined"
    assert "started 2 times" in record.error["message"] and deaths == 2 and record.executions == 2
    healthy = services.worker(redis, "test").wait_ready()  # the queue is not blocked by the poison task
    client.submit("test.echo", {"value": 1}, task_id="poison:after", run_id="poison", scope="s")
    assert client.wait("poison:after", timeout=30).status == "done" and healthy.process.poll() is None


def test_a_worker_whose_model_does_not_load_exits_with_a_clear_message(services):
    redis = services.redis()
    env = {**os.environ, "MGMFLOW_BROKER_URL": redis.url, "MGMFLOW_HOME": str(services.home)}
    done = subprocess.run([MGMFLOW, "worker", "--queues=vlm", "--model=vlm=no-such-model"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "cannot load the vlm model 'no-such-model'" in done.stderr and "Traceback" not in done.stderr


def test_out_of_memory_is_retried_with_backoff_then_fails_retryable(services):
    redis = services.redis()
    worker = services.worker(redis, "test", oom_retries=2)
    client = TaskClient(services.settings(redis, oom_retries=2))
    worker.wait_ready()
    client.submit("test.oom", {"fail_times": 2}, task_id="oom:a", run_id="oom", scope="s")
    client.submit("test.oom", {"fail_times": 99}, task_id="oom:b", run_id="oom", scope="s")
    recovered, exhausted = client.wait("oom:a", timeout=30), client.wait("oom:b", timeout=30)
    assert recovered.status == "done" and recovered.result["attempts"] == 3 and recovered.executions == 3
    assert exhausted.status == "failed" and exhausted.error["code"] == "resource_exhausted"
    assert exhausted.error["retryable"] is True and exhausted.deliveries == 1  # retries are not poison deliveries


def test_an_urgent_step_overtakes_a_queued_batch(services):
    redis = services.redis()
    worker = services.worker(redis, "test", "--concurrency=1")
    client = TaskClient(services.settings(redis))
    worker.wait_ready()
    for index in range(12):
        client.submit("test.echo", {"value": index, "steps": 1, "step_s": 0.1}, task_id=f"pri:batch{index}",
                      run_id="pri", scope="s", priority=9)
    client.submit("test.echo", {"value": 99}, task_id="pri:chat", run_id="pri", scope="s", priority=0)
    urgent = client.wait("pri:chat", timeout=30)
    batch = [client.wait(f"pri:batch{index}", timeout=30) for index in range(12)]
    assert sum(record.updated_at < urgent.updated_at for record in batch) <= 2


def test_thread_turns_prefer_the_worker_holding_the_thread(pair):
    client, live = pair
    first, second = live()
    owners = set()
    for turn in range(4):
        client.submit("vlm.chat", {"messages": [{"role": "user", "text": f"turn {turn}"}], "max_new_tokens": 4,
                                   "thread_id": "thread-1"}, task_id=f"aff:{turn}", run_id="aff", scope="s")
        record = client.wait(f"aff:{turn}", timeout=60)
        assert record.status == "done"
        owners.add(int(record.owner.split(":")[1]))
    assert len(owners) == 1  # every later turn went to the first turn's worker
    home = first if first.process.pid in owners else second
    home.kill()  # its private queue is no longer alive: the next turn falls back to the shared queue
    wait_for(lambda: not client.affinity.redis.keys("mgmflow:alive:*@worker-" + str(home.process.pid)), 15,
             "the killed worker's liveness key to lapse")
    client.submit("vlm.chat", {"messages": [{"role": "user", "text": "again"}], "max_new_tokens": 4,
                               "thread_id": "thread-1"}, task_id="aff:after", run_id="aff", scope="s")
    record = client.wait("aff:after", timeout=60)
    assert record.status == "done" and int(record.owner.split(":")[1]) != home.process.pid


def test_mgmflow_generate_runs_on_the_deployment_workers_when_a_broker_is_set(stack, tmp_path):
    services, client, worker = stack
    out = tmp_path / "fox.png"
    env = {**os.environ, "MGMFLOW_BROKER_URL": client.settings.broker_url, "MGMFLOW_HOME": str(services.home)}
    done = subprocess.run([MGMFLOW, "generate", "--prompt", "a fox", "--seed", "9", "--steps", "2", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{out} (seed 9)"
    from mgmflow.models.diffusion import read_parameters

    assert read_parameters(out.read_bytes())["seed"] == 9
    assert f"Task diffusion.text2img[cli-" in worker.text()  # drawn by the worker, not in the CLI process


def test_a_bad_request_does_not_fail_the_batch_it_arrives_with(stack):
    _, client, _ = stack
    image, _ = inputs(client)
    broken = client.store.put(b"\x89PNG\r\n\x1a\n truncated", scope="alice", media_type="image/png", metadata={}).id
    for index, target in enumerate([image, broken, image]):
        client.submit("vlm.describe", {"image": target, "prompt": f"look {index}", "max_new_tokens": 4},
                      task_id=f"mixed:{index}", run_id="mixed", scope="alice")
    good, bad, other = (client.wait(f"mixed:{index}", timeout=60) for index in range(3))
    assert good.status == other.status == "done" and good.result["batch_size"] == other.result["batch_size"] == 2
    assert bad.status == "failed" and bad.error["code"] == "invalid_image"
