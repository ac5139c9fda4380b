"""The HTTP API: Agent-Server-shaped runs and threads, batches, artifacts, OpenAI-compatible chat, a playground."""

from mgmflow.orchestrator.api.main import create_app

__all__ = ["create_app"]
