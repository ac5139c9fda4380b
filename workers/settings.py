"""Settings of workers and of everything that dispatches to them, read from ``MGMFLOW_*`` environment variables.

One object describes a deployment: where the broker is (unset: the embedded, in-process mode), which model
each queue serves, where artifacts live, and the reliability knobs (leases, redelivery, retention).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# Families of task kinds that run a model; their queues are named "<family>.<model>".
MODEL_FAMILIES = ("vlm", "diffusion", "edit")
ORCHESTRATOR_QUEUE = "orchestrator"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MGMFLOW_", extra="ignore")

    # Where things are.
    broker_url: str | None = None  # redis://host:6379/0; unset → embedded mode (in-process transport)
    redis_url: str | None = None  # task records, events, cancel flags; defaults to broker_url
    home: Path = Field(default_factory=lambda: Path.home() / ".mgmflow")
    store_url: str | None = None  # file:///path, s3://bucket/prefix; unset → $home/artifacts
    s3_endpoint_url: str | None = None  # an S3-compatible server (MinIO, Ceph, moto); unset → AWS
    database_url: str | None = None  # the orchestrator's checkpoints; unset → SQLite under home

    # Which model each queue serves (preset names or paths).
    vlm_model: str = "tiny"
    diffusion_model: str = "tiny"
    edit_model: str = "tiny"  # img2img and inpaint
    instruct_model: str = "tiny-ip2p"  # instruction edits need an InstructPix2Pix UNet
    vlm_conv_mode: str | None = None  # Mini-Gemini's template (vicuna_v1, llama_3...); unset → from the checkpoint
    # How the VLM's LLM is placed: spread over the visible GPUs (a strategy, or JSON {LLM module: device} with a
    # CUDA index, "cpu" or "disk"), and/or quantized by bitsandbytes (CUDA only). Unset: one device, unquantized.
    vlm_device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | dict[str, int | str] | None = None
    vlm_quantization: Literal["4bit", "8bit"] | None = None

    # Dynamic batching: requests arriving within the window (up to the batch size) run as one model call.
    vlm_batch_size: int = Field(default=4, ge=1, le=64)
    diffusion_batch_size: int = Field(default=4, ge=1, le=64)
    batch_window_ms: float = Field(default=20.0, ge=0)
    model_memory_gb: float | None = None  # budget for the models one worker keeps; unset → no limit

    # Reliability.
    visibility_timeout_s: float | None = None  # unset → 15 s with tiny presets, 1 h otherwise
    lease_s: float = Field(default=10.0, gt=0)  # a running step's lease, renewed every lease_s / 3
    max_deliveries: int = Field(default=3, ge=1)  # executions started before a step is quarantined
    oom_retries: int = Field(default=3, ge=0)
    oom_backoff_s: float = Field(default=5.0, ge=0)
    record_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)  # task records live as long as runs
    result_expires_s: int = Field(default=3600, gt=0)  # Celery's own results (we keep ours in records)

    # Progress streams and affinity.
    events_maxlen: int = Field(default=10_000, gt=0)
    events_ttl_s: int = Field(default=24 * 3600, gt=0)
    affinity_ttl_s: int = Field(default=600, gt=0)

    # Artifacts.
    artifact_retention_s: int | None = None  # unset → artifacts are kept until deleted

    # Embedded mode: threads of the in-process worker.
    embedded_concurrency: int = Field(default=8, ge=1)

    @property
    def embedded(self) -> bool:
        return not self.broker_url

    @property
    def records_url(self) -> str | None:
        return self.redis_url or self.broker_url

    @property
    def artifacts_url(self) -> str:
        return self.store_url or (self.home / "artifacts").as_uri()

    @property
    def visibility_timeout(self) -> float:
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        models = (self.vlm_model, self.diffusion_model, self.edit_model, self.instruct_model)
        return 15.0 if all(name.startswith("tiny") for name in models) else 3600.0

    @property
    def vlm_placement(self) -> dict:
        """The VLM loading options (``MGMEngine.from_pretrained`` keywords): placement, quantization, template."""
        return {"device_map": self.vlm_device_map, "quantization": self.vlm_quantization,
                "template": self.vlm_conv_mode}

    def model_for(self, family: str) -> str:
        """The default model of a task family ("vlm", "diffusion", "edit")."""
        return {"vlm": self.vlm_model, "diffusion": self.diffusion_model, "edit": self.edit_model}[family]


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
