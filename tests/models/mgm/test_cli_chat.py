"""`mgmflow chat` on the tiny preset: streamed answers, structured output, one-line errors."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from mgmflow.orchestrator.cli import main

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "green.png"
    Image.new("RGB", (50, 40), (10, 200, 30)).save(path)
    return path


def test_chat_streams_an_answer(mgmflow_home, image_path):
    result = CliRunner().invoke(main, ["chat", "--image", str(image_path), "What colour?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()


def test_chat_with_json_schema_prints_valid_json(mgmflow_home, image_path, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"green": {"type": "boolean"}},
                                  "required": ["green"], "additionalProperties": False}))
    result = CliRunner().invoke(main, ["chat", "--image", str(image_path), "Green?", "--json-schema", str(schema),
                                       "--temperature", "0.9", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout)["green"], bool)


def test_chat_gen_draws_the_image_the_model_asks_for(mgmflow_home, tmp_path, monkeypatch):
    from testkit import script_mgm_answers

    from mgmflow.models.diffusion import read_parameters
    from mgmflow.models.mgm import NEGATIVE_PROMPT

    script_mgm_answers(monkeypatch, "Here is a cat. <h>a ginger cat asleep on a red sofa</h>")
    out = tmp_path / "cat.png"
    result = CliRunner().invoke(main, ["chat", "Draw a cat.", "--gen", "--max-new-tokens", "40", "--seed", "3",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "image prompt: a ginger cat asleep on a red sofa" in result.stdout and str(out) in result.stdout
    parameters = read_parameters(out.read_bytes())
    assert parameters["prompt"] == "a ginger cat asleep on a red sofa" and parameters["seed"] == 3
    assert parameters["negative_prompt"] == NEGATIVE_PROMPT


def test_chat_gen_draws_nothing_when_the_model_writes_no_prompt(mgmflow_home, tmp_path):
    out = tmp_path / "none.png"
    result = CliRunner().invoke(main, ["chat", "Draw a cat.", "--gen", "--max-new-tokens", "12", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "no image" in result.stdout and not out.exists()


def test_chat_json_cut_by_max_new_tokens_is_an_error(mgmflow_home, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"story": {"type": "string"}},
                                  "required": ["story"]}))
    result = CliRunner().invoke(main, ["chat", "A story?", "--json-schema", str(schema), "--max-new-tokens", "4",
                                       "--temperature", "1", "--seed", "1"])
    assert result.exit_code == 2
    assert "--max-new-tokens" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["chat", "--image", "{bad}", "x"], "not a readable image"),
        (["chat", "x", "--model", "no-such-model"], "no-such-model"),
        (["chat", "x", "--json-schema", "{bad}"], "--json-schema"),
    ],
)
def test_errors_are_one_line(mgmflow_home, tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    result = CliRunner().invoke(main, [a.replace("{bad}", str(bad)) for a in args])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output
