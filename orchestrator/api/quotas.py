"""What a key may ask of the deployment, set by the operator per key (``MGMFLOW_KEY_POLICIES``) over the defaults:
how many unfinished runs and chat completions it may have at once, the most urgent priority it may use, and the
compute one run may ask for (pages × rounds × drafts × megapixels × denoising steps)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mgmflow.orchestrator.api.errors import ApiError

# What the compute of a run counts when its input leaves a factor unset (the diffusion defaults of the presets).
DEFAULT_SIDE, DEFAULT_STEPS = 1024, 30


class KeyPolicy(BaseModel):
    """One key's limits; a field left out takes the deployment's default (``MGMFLOW_MAX_ACTIVE_RUNS_PER_KEY``,
    ``MGMFLOW_KEY_TOP_PRIORITY``, ``MGMFLOW_MAX_RUN_COMPUTE``)."""

    model_config = ConfigDict(extra="forbid")

    max_active_runs: int | None = Field(None, ge=0)
    top_priority: int | None = Field(None, ge=0, le=9)
    max_run_compute: float | None = Field(None, ge=0)


def policy_for(settings: Any, scope: str) -> KeyPolicy:
    """The limits of ``scope``: the operator's policy for it over the defaults. The open (key-less) server's one
    user may use every priority."""
    given = settings.key_policies.get(scope) or KeyPolicy()
    return KeyPolicy(
        max_active_runs=given.max_active_runs if given.max_active_runs is not None else settings.max_active_runs_per_key,
        top_priority=given.top_priority if given.top_priority is not None else
        (0 if settings.open_access else settings.key_top_priority),
        max_run_compute=given.max_run_compute if given.max_run_compute is not None else settings.max_run_compute,
    )


def _number(value: Any, default: float) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default


def run_compute(run_input: dict[str, Any]) -> float:
    """Megapixel-steps a run may ask for: pages × rounds × drafts × width × height / 10⁶ × steps; a batch's is the
    sum of its items'."""
    if isinstance(run_input.get("items"), list):
        return sum(run_compute(item) for item in run_input["items"] if isinstance(item, dict))
    factors = [_number(run_input.get(name), 1) for name in ("pages", "rounds", "drafts")]
    pixels = _number(run_input.get("width"), DEFAULT_SIDE) * _number(run_input.get("height"), DEFAULT_SIDE)
    return factors[0] * factors[1] * factors[2] * pixels / 1e6 * _number(run_input.get("steps"), DEFAULT_STEPS)


class ChatsInFlight:
    """Chat completions of each key being answered now, in this process (embedded) or in Redis, shared by every API
    process (distributed). A process that dies leaves its count to expire."""

    TTL_S = 900

    def __init__(self, broker_url: str | None):
        self.url = broker_url if broker_url and broker_url.startswith(("redis://", "rediss://")) else None
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis = None

    def _client(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # an asyncio client belongs to the loop that made it
            import redis.asyncio

            self._loop = loop
            self._redis = redis.asyncio.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=2)
        return self._redis

    async def count(self, scope: str) -> int:
        if self.url is None:
            return self._counts.get(scope, 0)
        return int(await self._client().get(f"mgmflow:chats:{scope}") or 0)

    async def _add(self, scope: str, delta: int) -> None:
        if self.url is None:
            with self._lock:
                self._counts[scope] = self._counts.get(scope, 0) + delta
            return
        key = f"mgmflow:chats:{scope}"
        async with self._client().pipeline(transaction=True) as pipe:
            await pipe.incrby(key, delta).expire(key, self.TTL_S).execute()

    @asynccontextmanager
    async def holding(self, scope: str):
        await self._add(scope, 1)
        try:
            yield
        finally:
            await self._add(scope, -1)


class Quotas:
    """The checks a submission passes before anything is created."""

    def __init__(self, settings: Any, runs: Any):
        self.settings, self.runs = settings, runs
        self.chats = ChatsInFlight(settings.broker_url)

    def check_priority(self, scope: str, priority: int) -> None:
        top = policy_for(self.settings, scope).top_priority
        if priority < top:
            raise ApiError(403, f"this key may use priorities {top}..9 (0 is the most urgent); ask the operator for "
                                "more (MGMFLOW_KEY_POLICIES)", code="priority_not_allowed")

    def check_compute(self, scope: str, run_input: dict[str, Any]) -> None:
        ceiling = policy_for(self.settings, scope).max_run_compute
        needed = run_compute(run_input)
        if ceiling and needed > ceiling:
            raise ApiError(413, f"the run asks for {needed:,.0f} megapixel-steps (pages × rounds × drafts × "
                                f"megapixels × steps); this key's limit is {ceiling:,.0f}", code="compute_exceeded")

    def check_active(self, scope: str, adding: int = 1, chats: int = 0) -> None:
        """The key's unfinished runs and chat completions, with ``adding`` more, stay within its quota."""
        limit = policy_for(self.settings, scope).max_active_runs
        room = limit - chats - adding  # unfinished runs the key may have now
        if limit and (room < 0 or self.runs.active_at_least(scope, room + 1)):
            raise ApiError(429, f"this key has reached its quota of {limit:,} unfinished runs and chat completions",
                           code="quota_exceeded", headers={"Retry-After": "10"})
