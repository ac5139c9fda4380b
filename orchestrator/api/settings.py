"""Settings of the HTTP API: the workers' settings plus keys, limits and allow-lists, all from ``MGMFLOW_*``."""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from mgmflow.orchestrator.api.allowlist import entry_origin
from mgmflow.orchestrator.api.quotas import KeyPolicy
from mgmflow.workers.artifacts import GC_GRACE_S
from mgmflow.workers.settings import Settings

LOOPBACK = "127.0.0.1"


class ApiSettings(Settings):
    """What the API adds to :class:`mgmflow.workers.settings.Settings`; every field is ``MGMFLOW_<NAME>`` in the env."""

    # Bearer keys, comma-separated. None configured: open, single-user, loopback by default.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Open mode answers only to loopback Host names; these are answered too (a LAN name, with serve's
    # --insecure-open-access). Ignored once keys are set.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Origins (scheme://host[:port]; a bare host is https on 443, see api.allowlist) whose image URLs chat
    # requests may reference; nothing else is ever fetched.
    image_url_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Origins that run webhooks may be sent to, as image_url_hosts. None: no webhooks (and no delivery loop).
    webhook_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A webhook is retried until delivered, at most this many attempts; the waits double from the backoff
    # (1, 2, 4 … s, at most 10 minutes apart: the default gives up after about an hour).
    # The Standard Webhooks signing secret, "whsec_<base64>", the same for every API process of a deployment.
    # Unset: one is made once and kept in $MGMFLOW_HOME/webhook-secret (readable by its owner only).
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(15, ge=1, le=100)
    webhook_backoff_s: float = Field(1.0, gt=0, le=600)

    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # A connection has this long to send a request's headers (from opening, or from the previous response), and
    # a request this long to deliver its whole body; then it is closed (headers) or answered 408 (body).
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    body_timeout_s: float = Field(60.0, gt=0, le=3600)
    # Open connections per API process; a request beyond answers 503 at once.
    max_connections: int = Field(1000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # Memory decoding one image may take (its header's size × bytes per pixel, plus the RGB copy), and all the
    # images of one request together; both checked from the headers, before any pixel is decoded.
    max_image_bytes: int = Field(320 * 1024 * 1024, ge=1024)
    max_request_image_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_images_per_request: int = Field(16, ge=1)  # counted across all the messages of a chat request
    image_decode_threads: int = Field(2, ge=1, le=64)  # images are decoded in a pool of this many threads
    max_prompt_chars: int = Field(32_768, ge=1)
    max_pages: int = Field(64, ge=1)
    max_batch_items: int = Field(10_000, ge=1)
    # Token bucket per key: sustained requests per second and burst size; 0 turns it off.
    rate_limit_per_second: float = Field(200.0, ge=0)
    rate_limit_burst: int = Field(2_000, ge=1)
    # Requests without a valid key (none, an unknown one), per client address; 0 turns it off.
    unauthenticated_per_second: float = Field(2.0, ge=0)
    unauthenticated_burst: int = Field(20, ge=1)
    # The artifact sweeper: how often each API process removes expired artifacts and unreferenced blobs (0: never;
    # `mgmflow gc` does it once), and how old an unreferenced blob must be (a put may be about to reference it).
    gc_interval_s: float = Field(3600.0, ge=0)
    gc_grace_s: float = Field(GC_GRACE_S, ge=0)
    # Threads whose runs all ended longer ago than this are deleted by the sweeper (unset: kept). Keep it above the
    # longest batch: a batch's finished items are read from their runs.
    run_retention_s: float | None = Field(None, gt=0)
    # A bearer key /metrics asks for (a scraper's, distinct from the API keys); unset: /metrics is open.
    metrics_key: str | None = None
    # Unfinished runs (waiting, running, interrupted; a batch counts its concurrency too) and chat completions a
    # key may have at once: a quota; 0 turns it off.
    max_active_runs_per_key: int = Field(5_000, ge=0)
    # The most urgent priority a key may use (0 is the most urgent; an open server's user may use them all), and
    # the compute one run may ask for, in megapixel-steps (pages × rounds × drafts × width × height / 10⁶ × steps;
    # a 64-page story at the defaults is about 4,000). Per key: MGMFLOW_KEY_POLICIES.
    key_top_priority: int = Field(3, ge=0, le=9)
    max_run_compute: float = Field(25_000, ge=0)
    # Per-key overrides, JSON keyed by scope ("key-" + the first 16 hex digits of the key's sha256):
    # {"key-0123456789abcdef": {"max_active_runs": 50, "top_priority": 0, "max_run_compute": 100000}}
    key_policies: dict[str, KeyPolicy] = Field(default_factory=dict)

    @field_validator("api_keys", "allowed_hosts", "image_url_hosts", "webhook_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("image_url_hosts", "webhook_hosts")
    @classmethod
    def _check_origins(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            entry_origin(entry)  # a ValueError here: a typo fails at start, not at the first request
        return entries

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value  # MGMFLOW_WEBHOOK_SECRET= in an .env file

    @field_validator("webhook_secret")
    @classmethod
    def _check_secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None:
            value = secret.get_secret_value()
            try:
                key = base64.b64decode(value.removeprefix("whsec_"), validate=True)
            except ValueError:
                key = b""
            if not value.startswith("whsec_") or len(key) < 16:
                raise ValueError("MGMFLOW_WEBHOOK_SECRET must be whsec_<base64 of at least 16 random bytes>")
        return secret

    @property
    def open_access(self) -> bool:
        """No keys configured: a single-user server."""
        return not self.api_keys

    def scope_of(self, api_key: str | None) -> str | None:
        """The scope (owner) of a key; ``None`` when the key is unknown. Keys never appear in stored data."""
        if self.open_access:
            return "default"
        # Bytes, not str: compare_digest refuses non-ASCII strings. A header arrives as latin-1 text, i.e. its bytes.
        try:
            sent = api_key.encode("latin-1") if api_key is not None else None
        except UnicodeEncodeError:  # not from a header: no key is made of such text
            return None
        if sent is None or not any(hmac.compare_digest(sent, key.encode()) for key in self.api_keys):
            return None
        return "key-" + hashlib.sha256(sent).hexdigest()[:16]
