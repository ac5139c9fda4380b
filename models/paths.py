"""Where mgmflow keeps things on disk, for every model family.

``$MGMFLOW_HOME`` (default ``~/.mgmflow``) holds the tiny presets, artifacts and checkpoints;
``$MGMFLOW_MODELS_DIR`` (default ``$MGMFLOW_HOME/models``) is where real weights are looked for first,
then the local Hugging Face cache. Nothing here ever downloads.
"""

from __future__ import annotations

import os
from pathlib import Path


def mgmflow_home() -> Path:
    return Path(os.environ.get("MGMFLOW_HOME") or "~/.mgmflow").expanduser()


def models_dir() -> Path:
    return Path(os.environ.get("MGMFLOW_MODELS_DIR") or mgmflow_home() / "models").expanduser()


def hub_cache(repo_id: str) -> Path | None:
    """The local Hugging Face cache snapshot of ``repo_id``, or None: never a network call."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):  # not cached, or not a repo id at all
        return None
