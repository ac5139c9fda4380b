"""Fixtures of the API tests: an embedded app (TestClient) and a live server (uvicorn in a thread) for real
clients: ``langgraph-sdk``, ``openai``, chromium."""

from __future__ import annotations

import os

import pytest

from api_support import KEYS, LiveServer, make_app
from echo_workflow import register_echo


@pytest.fixture(scope="session")
def api_env(mgmflow_home):
    """One embedded deployment for the session (the in-process driver finds it by the environment)."""
    for name in [n for n in os.environ if n.startswith("MGMFLOW_") and n != "MGMFLOW_HOME"]:
        del os.environ[name]
    from mgmflow.workers.settings import get_settings

    get_settings.cache_clear()
    register_echo()
    return mgmflow_home


@pytest.fixture(scope="session")
def client(api_env):
    """An open (key-less) app."""
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def keyed_client(api_env):
    """An app with two API keys; requests carry no key unless given ``headers=auth(key)``."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(api_keys=list(KEYS))) as test_client:
        yield test_client




@pytest.fixture(scope="session")
def live_server(api_env):
    with LiveServer(make_app()) as server:
        yield server
