"""Fixtures of the tool tests: a TaskClient in the embedded mode (in-process worker, tiny presets)."""

from __future__ import annotations

import pytest
from tool_helpers import png


@pytest.fixture(scope="session")
def client(mgmflow_home):
    from mgmflow.workers.client import TaskClient
    from mgmflow.workers.settings import Settings

    return TaskClient(Settings(home=mgmflow_home))


@pytest.fixture
def image_id(client):
    """A 64x48 PNG in the store, scope "tools-test"."""
    return client.store.put(png((64, 48)), scope="tools-test", media_type="image/png", metadata={}).id
