"""Silencing transformers where its messages are wrong for us, and only there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Errors only, no progress bars: transformers calls the towers' keys 'unexpected' (we account for every key
    ourselves), warns about Gemma's "gelu" (which we pin on purpose) and draws bars while saving tiny presets."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
