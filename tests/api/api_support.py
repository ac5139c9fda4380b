"""Helpers of the API tests: app factory, keys, a live uvicorn server."""

from __future__ import annotations

import threading
import time

from testkit import free_port


def make_app(**overrides):
    from mgmflow.orchestrator.api import create_app
    from mgmflow.orchestrator.api.settings import ApiSettings

    # TestClient sends "Host: testserver": an open app answers it as it answers a loopback name.
    return create_app(ApiSettings(**{"allowed_hosts": ["testserver"], **overrides}))


KEYS = ("key-alice", "key-bob")


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
