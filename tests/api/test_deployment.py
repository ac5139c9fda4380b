"""Static checks of the deployment files (no Docker engine here): services, commands, environment, image."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import click
import pytest
import yaml

from mgmflow.orchestrator.api.settings import ApiSettings
from mgmflow.orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
OURS = {name: spec for name, spec in SERVICES.items() if spec.get("image") == "mgmflow:latest"}
GPU_SERVICES = ("vlm-worker", "diffusion-worker", "edit-worker")


def test_compose_has_every_role():
    assert {"redis", "postgres", "api", "orchestrator-worker", "flower", *GPU_SERVICES} <= set(SERVICES)
    assert set(OURS) == {"api", "orchestrator-worker", *GPU_SERVICES}


def test_redis_persists_and_never_evicts():
    command = " ".join(SERVICES["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert any(volume.endswith(":/data") for volume in SERVICES["redis"]["volumes"])


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(name):
    assert SERVICES[name]["healthcheck"]["test"]


@pytest.mark.parametrize("name", GPU_SERVICES)
def test_gpu_workers_reserve_a_gpu(name):
    devices = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] == 1


@pytest.mark.parametrize("name", sorted(OURS))
def test_our_services_share_one_env_file_and_the_volumes(name):
    spec = OURS[name]
    assert spec["env_file"] == ".env"
    assert {"artifacts:/data", "model-weights:/models"} <= set(spec["volumes"])
    assert {"redis", "postgres"} <= set(spec["depends_on"])
    assert {"artifacts", "model-weights"} <= set(COMPOSE["volumes"])


@pytest.mark.parametrize("name", sorted(OURS))
def test_each_command_is_a_real_cli_command(name):
    """The image's entry point is `mgmflow`; the service's command must parse as one of its subcommands."""
    args = list(OURS[name]["command"])
    command = main.get_command(click.Context(main), args[0])
    assert command is not None, f"{name}: `mgmflow {args[0]}` does not exist"
    command.make_context(args[0], args[1:])  # raises on an unknown option or a bad value


@pytest.mark.parametrize("name", ["orchestrator-worker", *GPU_SERVICES])
def test_worker_healthchecks_ping_the_worker_they_start(name):
    """Celery names a worker <name>@<host>: the ping must target the --name the command gives."""
    command, test = OURS[name]["command"], OURS[name]["healthcheck"]["test"][1]
    worker_name = command[command.index("--name") + 1]
    # "$$" is compose's escape: the container's shell expands $HOSTNAME and $MGMFLOW_BROKER_URL (from .env).
    assert f"-d {worker_name}@$$HOSTNAME" in test and "--broker=$$MGMFLOW_BROKER_URL" in test


def _env_names(text: str) -> set[str]:
    return set(re.findall(r"^#?\s*(MGMFLOW_[A-Z0-9_]+)=", text, flags=re.M))


def test_env_example_matches_the_settings():
    fields = {f"MGMFLOW_{name.upper()}" for name in ApiSettings.model_fields}
    names = _env_names((ROOT / ".env.example").read_text())
    assert names, "no MGMFLOW_ variables in .env.example"
    assert names <= fields, f"not settings fields: {sorted(names - fields)}"
    assert {"MGMFLOW_STORE_URL", "MGMFLOW_API_KEYS"} <= names


def _compose_config(tmp_path) -> dict:
    """``docker-compose config`` of the compose file with ``.env.example`` as its ``.env``: the file is valid, and
    every variable resolves (no Docker engine needed)."""
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    done = subprocess.run(["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stderr
    return yaml.safe_load(done.stdout)


def test_compose_config_passes_with_the_example_env(tmp_path):
    """The example is a valid configuration: each of our services gets settings that parse, with the passwords
    of .env in its URLs; Redis requires that password and Flower uses the same broker URL."""
    services = _compose_config(tmp_path)["services"]
    env = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    for name in OURS:
        environment = services[name]["environment"]
        settings = ApiSettings(_env_file=None, **{key.removeprefix("MGMFLOW_").lower(): value
                                                  for key, value in environment.items() if value})
        assert settings.broker_url == f"redis://:{env['REDIS_PASSWORD']}@redis:6379/0"
        assert settings.database_url == f"postgresql://mgmflow:{env['POSTGRES_PASSWORD']}@postgres:5432/mgmflow"
        assert len(settings.api_keys) == 2
    assert services["redis"]["command"][-2:] == ["--requirepass", env["REDIS_PASSWORD"]]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]
    assert services["flower"]["command"][:3] == ["celery", "--broker", services["api"]["environment"]["MGMFLOW_BROKER_URL"]]


def test_compose_refuses_to_start_without_the_passwords(tmp_path):
    shutil.copy(ROOT / "docker-compose.yml", tmp_path / "docker-compose.yml")
    (tmp_path / ".env").write_text("".join(line + "\n" for line in (ROOT / ".env.example").read_text().splitlines()
                                           if not line.startswith("POSTGRES_PASSWORD=")))
    done = subprocess.run(["docker-compose", "config"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "set POSTGRES_PASSWORD in .env" in done.stderr


def test_dockerfile_installs_torch_first_then_the_project():
    text = (ROOT / "Dockerfile").read_text()
    lines = text.replace("\\\n", " ").splitlines()  # join continued lines
    runs = [shlex.split(line.removeprefix("RUN ")) for line in lines if line.startswith("RUN pip")]
    torch_pin = next(line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch=="))
    assert torch_pin in runs[0], "torch must be installed first, pinned like constraints.txt"
    assert runs[1][:4] == ["pip", "install", "-c", "constraints.txt"] and "." in runs[1]
    for package in ("models", "workers", "tools", "orchestrator", "workflows"):
        assert f"COPY {package} ./{package}" in text
    assert 'ENTRYPOINT ["mgmflow"]' in text
