"""Test-wide setup. Threads are pinned before torch is imported: two OpenMP threads on these 2-core
machines are intermittently 20x slower (see README, "Performance notes")."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mgmflow_home(tmp_path_factory):
    """A private MGMFLOW_HOME for the session: preset caches, artifacts and checkpoints land here."""
    home = tmp_path_factory.mktemp("mgmflow-home")
    os.environ["MGMFLOW_HOME"] = str(home)
    return home
