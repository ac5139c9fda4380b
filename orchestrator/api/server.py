"""What ``mgmflow serve`` checks before it starts (where to bind, that the broker and database answer), and how its
API processes end with it."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from urllib.parse import urlsplit

from models.errors import MGMFlowError
from orchestrator.api.settings import LOOPBACK, ApiSettings


class ServiceUnreachable(MGMFlowError):
    """A service the settings name (broker, database) does not answer."""

    code = "unreachable"


def default_host(settings: ApiSettings) -> str:
    """Loopback for an open (key-less) server; every interface once keys protect it."""
    return LOOPBACK if settings.open_access else "0.0.0.0"


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"  # never the password


def check_reachable(settings: ApiSettings) -> None:
    """Fail fast, in one line, when the broker or the database of a distributed setup is down."""
    if settings.broker_url and settings.broker_url.startswith(("redis://", "rediss://")):
        import redis

        try:
            redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3, socket_timeout=3).ping()
        except redis.RedisError as error:
            raise ServiceUnreachable(f"cannot reach the broker at {_where(settings.broker_url)}: {error}") from None
    if settings.database_url and settings.database_url.startswith(("postgres://", "postgresql://")):
        import psycopg

        try:
            psycopg.connect(settings.database_url, connect_timeout=3).close()
        except psycopg.Error as error:
            raise ServiceUnreachable(
                f"cannot reach the database at {_where(settings.database_url)}: {str(error).strip()}") from None


def stop_with_supervisor() -> None:
    """In an API process of ``serve --workers N``: stop (SIGTERM, a graceful shutdown) when the supervising process
    dies, even by SIGKILL. Uvicorn's worker processes otherwise outlive it and keep serving the port on their own.
    Linux only; a no-op in a process nobody supervises."""
    supervisor = multiprocessing.parent_process()
    if supervisor is None or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != supervisor.pid:  # it died before the call above
        os.kill(os.getpid(), signal.SIGTERM)
