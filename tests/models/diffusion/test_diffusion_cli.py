"""``mgmflow generate`` and ``mgmflow edit``: one PNG on success; one error line, exit 2 and no file on failure."""

import pytest
from click.testing import CliRunner

from mgmflow.models.diffusion import read_parameters
from mgmflow.orchestrator.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def run(mgmflow_home):
    def invoke(*args):
        return CliRunner().invoke(main, list(args))

    return invoke


@pytest.fixture(scope="module")
def input_png(tmp_path_factory, photo):
    path = tmp_path_factory.mktemp("inputs") / "photo.png"
    photo.save(path)
    return path


def test_generate_writes_a_png_with_its_parameters(run, tmp_path, lora_file):
    out = tmp_path / "cat.png"
    result = run("generate", "--prompt", "a cat, in a hat", "--seed", "42", "--steps", "2", "--width", "72",
                 "--height", "64", "--negative", "", "--lora", f"{lora_file}:0.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{out} (seed 42)"
    parameters = read_parameters(out.read_bytes())
    assert (parameters["prompt"], parameters["seed"], parameters["steps"]) == ("a cat, in a hat", 42, 2)
    assert (parameters["width"], parameters["height"], parameters["negative_prompt"]) == (72, 64, "")
    assert [(lora["name"], lora["weight"]) for lora in parameters["loras"]] == [("pixel_art", 0.5)]
    assert [path.name for path in tmp_path.iterdir()] == ["cat.png"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "100", "--height", "64"], "error: width must be a multiple of 8, got 100"),
        (["--steps", "0"], "error: steps must be an integer in [1, 200], got 0"),
        (["--model", "no-such-model"], "error: unknown diffusion model 'no-such-model'"),
        (["--lora", "/no/such.safetensors:1"], "error: LoRA file not found: /no/such.safetensors"),
    ],
)
def test_generate_errors_are_one_line_and_leave_no_file(run, tmp_path, args, message):
    out = tmp_path / "out.png"
    result = run("generate", "--prompt", "a cat", "--out", str(out), *args)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and result.stderr.startswith(message)
    assert "Traceback" not in result.output
    assert list(tmp_path.glob("*.png*")) == [] and not list(tmp_path.glob(".out.png*"))


def test_edit_in_each_mode(run, tmp_path, input_png, square_mask):
    mask = tmp_path / "mask.png"
    square_mask.save(mask)
    modes = {
        "instruct_edit": ["--instruction", "make it snowy"],
        "img2img": ["--prompt", "a cat", "--strength", "0.5"],
        "inpaint": ["--prompt", "a red door", "--mask", str(mask)],
    }
    for task, args in modes.items():
        out = tmp_path / f"{task}.png"
        result = run("edit", "--image", str(input_png), *args, "--seed", "3", "--steps", "2", "--out", str(out))
        assert result.exit_code == 0, result.output
        parameters = read_parameters(out.read_bytes())
        assert parameters["task"] == task and parameters["seed"] == 3
    assert read_parameters((tmp_path / "instruct_edit.png").read_bytes())["model"] == "tiny-ip2p"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give either --instruction, or --prompt"),
        (["--instruction", "x", "--prompt", "y"], "give either --instruction, or --prompt"),
        (["--instruction", "x", "--strength", "0.5"], "--instruction takes neither"),
        (["--prompt", "x"], "--prompt needs --strength"),
        (["--prompt", "x", "--strength", "1.5"], "strength must be a number in (0, 1]"),
        (["--prompt", "x", "--mask", "MISSING"], "image file not found"),
    ],
)
def test_edit_errors_leave_no_file(run, tmp_path, input_png, args, message):
    out = tmp_path / "edited.png"
    result = run("edit", "--image", str(input_png), *[str(tmp_path / a) if a == "MISSING" else a for a in args],
                 "--out", str(out))
    assert result.exit_code == 2
    assert message in result.stderr and "Traceback" not in result.output
    assert not out.exists()


def test_edit_rejects_a_mask_of_another_size(run, tmp_path, input_png, square_mask):
    mask = tmp_path / "mask.png"
    square_mask.resize((48, 48)).save(mask)
    out = tmp_path / "edited.png"
    result = run("edit", "--image", str(input_png), "--prompt", "x", "--mask", str(mask), "--out", str(out))
    assert result.exit_code == 2 and "the mask is 48x48 but the image is 64x64" in result.stderr
    assert not out.exists()


def test_output_must_be_a_png_in_an_existing_folder(run, tmp_path):
    for out, message in ((tmp_path / "x.jpg", "must name a .png file"), (tmp_path / "no" / "x.png", "does not exist")):
        result = run("generate", "--prompt", "a cat", "--out", str(out))
        assert result.exit_code == 2 and message in result.stderr
