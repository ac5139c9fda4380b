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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (``CI`` set) a test of real services may not skip: a skipped durability test is a failure there."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") and item.get_closest_marker("services") is not None:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"a services test may not skip in CI: {reason}"
