"""Fixtures of the workflow tests: an embedded run service on the tiny presets, real services, a store.
Helpers live in ``wf_helpers``."""

from __future__ import annotations

import pytest

from worker_support import Services


@pytest.fixture(scope="session")
def embedded(mgmflow_home):
    """A RunService in the embedded mode (in-process worker, SQLite), shared by the session's tests."""
    from mgmflow.orchestrator.runs import RunService
    from mgmflow.workers.settings import Settings

    return RunService(Settings(home=mgmflow_home))


@pytest.fixture
def private_home(tmp_path, mgmflow_home):
    """A home of its own (runs, checkpoints, artifacts, task records) for processes a test starts: the session's
    embedded service keeps sweeping its home and must not drive their runs. The tiny presets are shared, not
    rebuilt."""
    home = tmp_path / "home"
    home.mkdir()
    (mgmflow_home / "presets").mkdir(exist_ok=True)
    (home / "presets").symlink_to(mgmflow_home / "presets")
    return home


@pytest.fixture
def services(tmp_path, private_home):
    """Real redis-servers and `mgmflow worker` subprocesses on a private home, all killed afterwards."""
    started = Services(tmp_path, private_home)
    yield started
    started.close()


@pytest.fixture
def store(tmp_path):
    """A real artifact store in a private folder."""
    from mgmflow.workers.artifacts import open_store
    from mgmflow.workers.settings import Settings

    return open_store(Settings(home=tmp_path))
