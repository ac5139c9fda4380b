"""Run webhooks, delivered at least once.

A run created with ``webhook`` records the URL as *pending* in its own row (one commit with the run). Every API
process whose settings allow webhook hosts runs :class:`WebhookSender` in its lifespan: it polls the runs store for
pending webhooks of runs that have ended, claims each for one attempt (so API processes sharing a database do not
post the same one at once), POSTs the run's public shape and records the outcome: delivered, retried later with
exponential backoff, or failed after ``webhook_max_attempts``. A process that dies mid-attempt leaves a claim that
lapses after ``CLAIM_S``; a restarted API delivers what was pending. Receivers may see a delivery more than once
and drop copies by its ``webhook-id`` (also sent as ``Idempotency-Key``), the same on every attempt.

Each POST is signed the Standard Webhooks way (https://www.standardwebhooks.com), so that receivers can check it
with that project's libraries: ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``
(``v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">``) under the deployment's secret. The id is an HMAC too:
stable across attempts and processes, unguessable without the secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import ApiContext
from mgmflow.orchestrator.api.errors import ApiError, redact
from mgmflow.orchestrator.api.streaming import run_public
from mgmflow.orchestrator.api.submission import check_webhook
from mgmflow.orchestrator.records import PendingWebhook

logger = logging.getLogger(__name__)

POLL_S = 0.5  # how often the store is asked for due webhooks (one indexed query)
TIMEOUT_S = 10.0  # one POST
CLAIM_S = 60.0  # an attempt's claim: longer than a POST; after a crash, the webhook is due again this much later
MAX_BACKOFF_S = 600.0
MAX_IN_FLIGHT = 32  # attempts at once; a slow receiver holds one slot, not the loop


SECRET_PREFIX = "whsec_"


def signing_key(settings) -> bytes:
    """The deployment's signing key: ``MGMFLOW_WEBHOOK_SECRET`` (``whsec_<base64>``), else the one kept in
    ``$MGMFLOW_HOME/webhook-secret``, made on first use (24 random bytes, a file only its owner can read)."""
    if settings.webhook_secret is not None:
        secret = settings.webhook_secret.get_secret_value()
    else:
        path = Path(settings.home) / "webhook-secret"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made before, or by another API process a moment ago
            secret = ""
            for _ in range(50):  # the maker writes right after creating it
                if secret := path.read_text().strip():
                    break
                time.sleep(0.01)
        else:
            secret = SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()
            with os.fdopen(fd, "w") as file:
                file.write(secret + "\n")
            logger.warning("webhook signing secret made and kept in %s: give it to your receivers", path)
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)


def delivery_id(key: bytes, run_id: str, url: str) -> str:
    """The id of a run's webhook delivery: the same on every attempt and in every process, unguessable."""
    digest = hmac.new(key, f"mgmflow-webhook:{run_id}:{url}".encode(), hashlib.sha256).digest()
    return "msg_" + base64.urlsafe_b64encode(digest[:18]).decode()


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of Standard Webhooks, version 1."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def backoff_s(attempts: int, base_s: float) -> float:
    """The wait after the ``attempts``-th failed attempt: base, 2·base, 4·base, … at most ten minutes."""
    return min(base_s * 2 ** (attempts - 1), MAX_BACKOFF_S)


class WebhookSender:
    """The delivery loop of one API process (started by the app's lifespan)."""

    def __init__(self, context: ApiContext) -> None:
        self.context = context
        self.store = context.runs.runs  # the RunStore: webhook state lives in the run records
        self.settings = context.settings
        self.http = httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False)
        self.key = signing_key(context.settings)

    async def run(self) -> None:
        """Deliver due webhooks until cancelled."""
        while True:
            try:
                await self.start_due()
            except Exception:  # a database hiccup: the next poll tries again
                logger.exception("webhook delivery pass failed")
            await asyncio.sleep(POLL_S)

    async def stop(self, loop_task: asyncio.Task) -> None:
        """Stop the loop, then the attempts in flight (their claims go back: still pending for the next start)."""
        loop_task.cancel()
        await asyncio.gather(loop_task, return_exceptions=True)
        for task in list(self.context.background):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.http.aclose()

    async def start_due(self) -> int:
        """Claim the due webhooks (as many as there are free slots) and start an attempt for each."""
        in_flight = self.context.background
        free = MAX_IN_FLIGHT - len(in_flight)
        if free <= 0:
            return 0
        started = 0
        for webhook in await run_in_threadpool(self.store.due_webhooks, limit=free):
            if not await run_in_threadpool(self.store.claim_webhook, webhook, for_s=CLAIM_S):
                continue  # another API process took it
            task = asyncio.get_running_loop().create_task(self.attempt(webhook))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            started += 1
        return started

    async def attempt(self, webhook: PendingWebhook) -> None:
        """POST the finished run once; record delivered, a retry time, or failure for good."""
        attempt = webhook.attempts + 1
        try:
            error, final = await self._post(webhook, attempt)
        except asyncio.CancelledError:
            # The API is stopping: give the claim back so that the next process retries at once.
            self.store.release_webhook(webhook.run_id)
            raise
        except Exception as unexpected:  # e.g. the store unreachable: counts as a failed attempt
            logger.exception("webhook of run %s: attempt %d broke", webhook.run_id, attempt)
            error, final = f"{type(unexpected).__name__}: {redact(str(unexpected))}", False
        if error is None:
            logger.info("webhook of run %s delivered (attempt %d)", webhook.run_id, attempt)
            retry_at = None
        elif final or attempt >= self.settings.webhook_max_attempts:
            logger.error("webhook of run %s failed for good after %d attempts: %s", webhook.run_id, attempt, error)
            self.context.metrics.errors.labels("webhook").inc()
            retry_at = None
        else:
            delay = backoff_s(attempt, self.settings.webhook_backoff_s)
            logger.warning("webhook of run %s failed (attempt %d), next in %.1f s: %s", webhook.run_id, attempt,
                           delay, error)
            retry_at = time.time() + delay
        await run_in_threadpool(self.store.webhook_attempted, webhook.run_id, error=error, retry_at=retry_at)

    async def _post(self, webhook: PendingWebhook, attempt: int) -> tuple[str | None, bool]:
        """One POST: (None, _) when delivered, else (the error, whether retrying is pointless)."""
        try:
            check_webhook(webhook.url, self.settings)  # the allow-list may have shrunk since the run was admitted
        except ApiError as refused:
            return refused.message, True
        run = await run_in_threadpool(self.context.runs.get_run, webhook.run_id)
        delivery = delivery_id(self.key, webhook.run_id, webhook.url)
        payload: dict[str, Any] = run_public(run).model_dump(mode="json")
        body = json.dumps(payload, separators=(",", ":")).encode()  # the bytes signed are the bytes sent
        sent_at = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "webhook-id": delivery,
            "webhook-timestamp": str(sent_at),
            "webhook-signature": signature(self.key, delivery, sent_at, body),
            "Idempotency-Key": f"{webhook.run_id}:{delivery}",
            "X-Mgmflow-Run-Id": webhook.run_id,
            "X-Mgmflow-Delivery": delivery,
            "X-Mgmflow-Attempt": str(attempt),
        }
        try:
            response = await self.http.post(webhook.url, content=body, headers=headers)
            response.raise_for_status()
        except httpx.HTTPError as error:
            # The status or the exception's name, never the URL: its path or query may hold the receiver's token.
            status = getattr(getattr(error, "response", None), "status_code", None)
            return (f"answered {status}" if status else f"{type(error).__name__}: {redact(str(error))}"), False
        return None, False
