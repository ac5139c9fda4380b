"""What ``mgmflow serve`` checks before it starts (where to bind, that the broker and database answer), and how its
API processes end with it."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
from typing import Any
from urllib.parse import urlsplit

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from mgmflow.models.errors import MGMFlowError
from mgmflow.orchestrator.api.settings import LOOPBACK, ApiSettings


logger = logging.getLogger(__name__)


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


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol plus a deadline for each request's headers: ``header_timeout_s`` from the
    connection's opening (or from the first byte of a keep-alive request), else the connection is closed.
    uvicorn has none: a client that sends nothing, or half a header line, held its connection for ever."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        logger.debug("closing a connection that sent no complete request headers in %.0f s", self.header_timeout_s)
        self.transport.close()


def uvicorn_options(settings: ApiSettings) -> dict[str, Any]:
    """The options of ``mgmflow serve``'s uvicorn that bound what one client can hold: header deadline,
    connection cap (the body deadline is :class:`mgmflow.orchestrator.api.limits.BodyReadTimeout`, in the app)."""
    return {
        "http": functools.partial(HeaderTimeoutProtocol, header_timeout_s=settings.header_timeout_s),
        "limit_concurrency": settings.max_connections,
        "timeout_keep_alive": 5,
        # serve --workers: an API process imports torch and transformers before it answers the supervisor's
        # health check; on a busy machine that takes longer than uvicorn's 5 s, and it killed and respawned them.
        "timeout_worker_healthcheck": 60,
    }
