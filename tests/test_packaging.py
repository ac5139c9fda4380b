"""The five folders install as one import namespace, ``mgmflow.models``, …: a user's own ``tools.py`` or
``models.py`` (usual in agent projects) cannot shadow them, and no other distribution's ``models`` clashes."""

import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("models", "workers", "tools", "orchestrator", "workflows")


def test_every_package_folder_is_installed_under_mgmflow():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = sorted(
        "mgmflow." + ".".join(init.parent.relative_to(REPO).parts)
        for folder in FOLDERS for init in (REPO / folder).rglob("__init__.py")
    )
    assert sorted(config["packages"]) == folders
    assert config["package-dir"] == {f"mgmflow.{name}": name for name in FOLDERS}


def test_user_modules_named_like_ours_do_not_shadow_them(tmp_path):
    # An agent project of a user: its own tools.py and models.py beside the script.
    (tmp_path / "tools.py").write_text("OWN = 'tools'\n")
    (tmp_path / "models.py").write_text("OWN = 'models'\n")
    script = (
        "import tools, models\n"
        "assert tools.OWN == 'tools' and models.OWN == 'models'\n"
        "from mgmflow.tools import MGMChatModel, make_tools\n"
        "from mgmflow.models.mgm import MGMEngine, load_pretrained\n"
        "from mgmflow.models.diffusion import DiffusionEngine\n"
        "from mgmflow.workers.client import TaskClient\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('workers') is None and importlib.util.find_spec('orchestrator') is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert done.stdout.strip() == "ok", done.stderr


def test_workflows_and_the_cli_are_registered_under_the_namespace():
    workflows = {ep.name: ep.value for ep in entry_points(group="mgmflow.workflows")}
    assert {"story", "batch", "visual_reasoning", "chat"} <= set(workflows)
    assert all(value.startswith("mgmflow.workflows.") for value in workflows.values())
    [cli] = [ep for ep in entry_points(group="console_scripts") if ep.name == "mgmflow"]
    assert cli.value == "mgmflow.orchestrator.cli:main"


def test_no_module_imports_a_bare_top_level_package():
    bare = []
    for folder in (*FOLDERS, "tests", "bench", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                words = line.split()
                if len(words) > 1 and words[0] in ("from", "import") and words[1].split(".")[0] in FOLDERS:
                    bare.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert bare == []
