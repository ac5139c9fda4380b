"""``--conv-mode`` (the official CLI's flag) forces Mini-Gemini's conversation template on the CLI and workers."""

import os

import pytest
from click.testing import CliRunner

from mgmflow.orchestrator.cli import main
from mgmflow.workers.settings import get_settings

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fresh_settings(monkeypatch):
    monkeypatch.delenv("MGMFLOW_VLM_CONV_MODE", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    os.environ.pop("MGMFLOW_VLM_CONV_MODE", None)  # the worker command sets it for its child processes
    get_settings.cache_clear()


def test_chat_conv_mode_sets_the_template(mgmflow_home, monkeypatch):
    from mgmflow.models.mgm.engine import MGMEngine

    used = []
    chat = MGMEngine.chat
    monkeypatch.setattr(MGMEngine, "chat", lambda self, *a, **k: used.append(self.template.name) or chat(self, *a, **k))
    result = CliRunner().invoke(main, ["chat", "Hi", "--conv-mode", "llama_3", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert used == ["llama_3"]  # the tiny preset's own would be vicuna_v1
    result = CliRunner().invoke(main, ["chat", "Hi", "--conv-mode", "alpaca"])
    assert result.exit_code == 2 and "unknown conversation template 'alpaca'" in result.output


def test_worker_setting_sets_the_engines_template(mgmflow_home, fresh_settings):
    from mgmflow.workers.model_cache import ModelCache
    from mgmflow.workers.settings import Settings

    fresh_settings.setenv("MGMFLOW_VLM_CONV_MODE", "gemma")
    assert ModelCache.from_settings(Settings()).get("vlm", "tiny").template.name == "gemma"


def test_worker_flag_is_the_setting(fresh_settings):
    seen = []
    fresh_settings.setattr("mgmflow.workers.worker.run_worker", lambda settings, **k: seen.append(settings.vlm_conv_mode))
    arguments = ["worker", "--conv-mode", "chatml_direct", "--queues", "vlm", "--broker", "redis://127.0.0.1:1/0"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    assert seen == ["chatml_direct"]
