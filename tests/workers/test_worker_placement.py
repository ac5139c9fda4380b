"""`mgmflow worker --device-map / --load-4bit / --load-8bit`: the flags reach the VLM loader of a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from worker_support import MGMFLOW  # noqa: E402

from mgmflow.orchestrator.cli import main  # noqa: E402
from mgmflow.workers.client import TaskClient  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

SPLIT = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
         "model.norm": "cpu", "lm_head": "cpu"}


def test_a_worker_serves_the_vlm_split_by_its_device_map(services):
    redis = services.redis()
    worker = services.worker(redis, "vlm", f"--device-map={json.dumps(SPLIT)}").wait_ready()
    assert f"LLM placement: {SPLIT}" in worker.text()
    client = TaskClient(services.settings(redis))
    client.submit("vlm.chat", {"messages": [{"role": "user", "text": "hello"}], "max_new_tokens": 4},
                  task_id="split:a", run_id="split", scope="s")
    record = client.wait("split:a", timeout=60)
    assert record.status == "done" and record.result["completion_tokens"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_quantized_worker_without_cuda_exits_with_a_clear_message(services):
    redis = services.redis()
    env = {**os.environ, "MGMFLOW_BROKER_URL": redis.url, "MGMFLOW_HOME": str(services.home)}
    done = subprocess.run([MGMFLOW, "worker", "--queues=vlm", "--load-8bit"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert ("cannot load the vlm model 'tiny': 8bit loading quantizes the LLM with bitsandbytes, which needs a "
            "CUDA GPU: there is no CUDA device here") in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--load-4bit", "--load-8bit"], "--load-4bit and --load-8bit exclude each other"),
        (["--device-map=quick"], "'quick' is not one of auto, balanced, balanced_low_0, sequential"),
        (["--device-map={not json"], "not a JSON object"),
        (['--device-map=["cpu"]'], "not one of auto"),
        (['--device-map={"model.layers.0": [0]}'], "nor a JSON object from the LLM's modules to devices"),
    ],
)
def test_bad_placement_flags_are_usage_errors(args, message):
    result = CliRunner().invoke(main, ["worker", "--queues=vlm", "--broker=redis://127.0.0.1:1/0", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_gpus_with_a_device_map_is_one_process_over_all_of_them(monkeypatch):
    from mgmflow.workers import worker

    started, spawned = [], []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test: the worker command sets it
    monkeypatch.setattr(worker, "run_worker", lambda settings, **options: started.append(
        (settings, os.environ["CUDA_VISIBLE_DEVICES"], options["name"])))
    monkeypatch.setattr(worker, "run_per_gpu", lambda argv, gpus, name: spawned.append((argv, gpus)) or 0)
    base = ["worker", "--queues=vlm", "--broker=redis://127.0.0.1:1/0", "--gpus=0,1"]

    result = CliRunner().invoke(main, [*base, "--device-map=balanced", "--load-4bit"])
    assert result.exit_code == 0, result.output
    [(settings, visible, name)] = started
    assert visible == "0,1" and name == "gpu0-1" and not spawned
    assert settings.vlm_device_map == "balanced" and settings.vlm_quantization == "4bit"

    result = CliRunner().invoke(main, [*base, "--load-8bit"])  # no map: one process per GPU, each quantized
    assert result.exit_code == 0, result.output
    [(argv, gpus)] = spawned
    assert gpus == ["0", "1"] and "--load-8bit" in argv
