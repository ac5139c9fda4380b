"""Fixtures of the API tests: an embedded app (TestClient) and a live server (uvicorn in a thread) for real
clients: ``langgraph-sdk``, ``openai``, chromium."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from echo_workflow import register_echo


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def api_env(mgmflow_home):
    """One embedded deployment for the session (the in-process driver finds it by the environment)."""
    for name in [n for n in os.environ if n.startswith("MGMFLOW_") and n != "MGMFLOW_HOME"]:
        del os.environ[name]
    from workers.settings import get_settings

    get_settings.cache_clear()
    register_echo()
    return mgmflow_home


def make_app(**overrides):
    from orchestrator.api import create_app
    from orchestrator.api.settings import ApiSettings

    return create_app(ApiSettings(**overrides))


@pytest.fixture(scope="session")
def client(api_env):
    """An open (key-less) app."""
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as test_client:
        yield test_client


KEYS = ("key-alice", "key-bob")


@pytest.fixture(scope="session")
def keyed_client(api_env):
    """An app with two API keys; requests carry no key unless given ``headers=auth(key)``."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(api_keys=list(KEYS))) as test_client:
        yield test_client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class LiveServer:
    """uvicorn serving an app in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def live_server(api_env):
    with LiveServer(make_app()) as server:
        yield server


def wait_until(predicate, timeout: float = 30, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")
