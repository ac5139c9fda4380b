"""Request limits: body size (an ASGI middleware, checked before anything is parsed) and a per-key rate limit."""

from __future__ import annotations

import threading
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.api.errors import ApiError, error_response


class BodySizeLimit:
    """Refuses bodies over ``max_bytes`` with 413, whether announced by Content-Length or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = f"request body is over the limit of {self.max_bytes:,} bytes"
        too_large = HTTPException(413, message)
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.max_bytes):
                # Answered here, before the app: nothing of the body is read.
                status = 413 if value.isdigit() else 400
                text = message if value.isdigit() else "invalid Content-Length"
                response = error_response(Request(scope), status, text, "body_too_large" if status == 413 else "bad_request")
                return await response(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large
            return message

        await self.app(scope, limited_receive, send)


class RateLimiter:
    """A token bucket per scope: ``rate`` requests per second sustained, ``burst`` at once; 0 means no limit."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def check(self, scope: str) -> None:
        """Take one token for ``scope`` or raise a 429 saying when to retry."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(scope, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[scope] = (tokens, now)
                retry_after = max(1, round((1.0 - tokens) / self.rate))
                raise ApiError(429, "rate limit exceeded", code="rate_limited",
                               headers={"Retry-After": str(retry_after)})
            self._buckets[scope] = (tokens - 1.0, now)
