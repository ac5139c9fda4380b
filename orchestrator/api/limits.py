"""Request limits: body size (an ASGI middleware, checked before anything is parsed) and a per-key rate limit,
in this process (embedded) or in Redis, shared by every API process and host (distributed)."""

from __future__ import annotations

import asyncio
import threading
import time

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mgmflow.orchestrator.api.errors import ApiError, error_response


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


class BodyReadTimeout:
    """Answers 408 (and closes the connection) when a request's body has not fully arrived ``timeout_s`` after
    the app first asked for it: a client that announces a body and trickles it, or stops, holds nothing for long."""

    def __init__(self, app: ASGIApp, timeout_s: float):
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline: float | None = None
        complete = False

        async def timed_receive() -> Message:
            nonlocal deadline, complete
            if complete:  # later calls wait for the disconnect (streams): no deadline
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.timeout_s:g} s",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed_receive, send)


def _rate_limited(retry_after_s: float) -> ApiError:
    return ApiError(429, "rate limit exceeded", code="rate_limited",
                    headers={"Retry-After": str(max(1, round(retry_after_s)))})


class RateLimiter:
    """A token bucket per scope: ``rate`` requests per second sustained, ``burst`` at once; 0 means no limit."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    async def check(self, scope: str) -> None:
        """Take one token for ``scope`` or raise a 429 saying when to retry."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(scope, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[scope] = (tokens, now)
                raise _rate_limited((1.0 - tokens) / self.rate)
            self._buckets[scope] = (tokens - 1.0, now)


# The same bucket as a GCRA: one key per scope holds the time at which the bucket is full again ("theoretical
# arrival time"); a request is admitted while that time stays within ``burst`` intervals of now. Redis's clock
# serves every process alike. Returns "0", or the seconds to wait (a string: Lua numbers would be truncated).
_GCRA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local interval = 1 / rate
local full_at = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local wait = full_at + interval - now - burst * interval
if wait > 0 then return tostring(wait) end
redis.call('SET', KEYS[1], tostring(full_at + interval), 'PX', math.ceil((full_at + interval - now) * 1000) + 1000)
return '0'
"""


class RedisRateLimiter:
    """:class:`RateLimiter`'s bucket kept in Redis, so that several API processes or hosts share each key's limit."""

    def __init__(self, url: str, rate: float, burst: int):
        self.url, self.rate, self.burst = url, rate, burst
        self._loop: asyncio.AbstractEventLoop | None = None
        self._script = None

    async def check(self, scope: str) -> None:
        if self.rate <= 0:
            return
        wait = float(await self._gcra()(keys=[f"mgmflow:ratelimit:{scope}"], args=[self.rate, self.burst]))
        if wait > 0:
            raise _rate_limited(wait)

    def _gcra(self):
        # An asyncio client belongs to the loop that made it: a new one for each loop (tests start several).
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import redis.asyncio

            client = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
            self._loop, self._script = loop, client.register_script(_GCRA)
        return self._script


def rate_limiter(broker_url: str | None, rate: float, burst: int) -> RateLimiter | RedisRateLimiter:
    """Shared in Redis when the broker is Redis (several API processes); in this process otherwise (embedded)."""
    if broker_url and broker_url.startswith(("redis://", "rediss://")):
        return RedisRateLimiter(broker_url, rate, burst)
    return RateLimiter(rate, burst)
