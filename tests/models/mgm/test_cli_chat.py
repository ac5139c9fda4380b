"""`mgmflow chat` on the tiny preset: streamed answers, structured output, one-line errors."""

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main

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


def test_chat_gen_prints_the_image_prompt(mgmflow_home):
    result = CliRunner().invoke(main, ["chat", "Draw a cat.", "--gen", "--max-new-tokens", "32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("image prompt: ") and "None" not in result.stdout


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
