"""``vlm.chat`` in process: structured answers are complete or a typed error; ``generate_image`` modes."""

from __future__ import annotations

import pytest

from mgmflow.workers.client import TaskClient
from mgmflow.workers.settings import Settings

pytestmark = pytest.mark.timeout(240)
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}


@pytest.fixture(scope="module")
def client(mgmflow_home):
    return TaskClient(Settings(home=mgmflow_home, batch_window_ms=5))


def _chat(client, task_id, **payload):
    client.submit("vlm.chat", {"messages": [{"role": "user", "text": "Tell a story."}], **payload},
                  task_id=f"vst:{task_id}", run_id="vst", scope="alice")
    return client.wait(f"vst:{task_id}", timeout=180)


def test_json_cut_by_max_new_tokens_is_a_typed_error_not_a_result(client):
    record = _chat(client, "cut", json_schema=SCHEMA, max_new_tokens=4, temperature=1.0, seed=1)
    assert record.status == "failed" and record.error["code"] == "incomplete_output"
    assert "max_new_tokens" in record.error["message"]
    record = _chat(client, "whole", json_schema={"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                 "required": ["ok"], "additionalProperties": False},
                   max_new_tokens=30)
    assert record.status == "done" and record.result["finish_reason"] == "stop"


@pytest.mark.parametrize(("mode", "drawn"), [("require", True), (True, True), ("allow", False), (None, False),
                                             (False, False)])
def test_generate_image_modes(client, mode, drawn):
    # The random tiny model never writes <h>…</h> by itself: only "require" (true, the former boolean) gets one.
    record = _chat(client, f"gen-{mode}", generate_image=mode, max_new_tokens=40)
    assert record.status == "done", record.error
    assert (record.result["image_prompt"] is not None) is drawn


def test_unknown_generate_image_mode_is_refused(client):
    record = _chat(client, "gen-bad", generate_image="sometimes")
    assert record.status == "failed" and record.error["code"] == "invalid_input"
    assert "generate_image" in record.error["message"]
