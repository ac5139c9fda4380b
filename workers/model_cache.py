"""The models one worker holds: loaded once, kept within a memory budget, least recently used evicted first.

Out-of-memory errors from a model call become ``ResourceExhaustedError`` (retryable): the step is retried
later, on this worker after freeing memory or on another one.
"""

from __future__ import annotations

import functools
import gc
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mgmflow.models.errors import ResourceExhaustedError
from mgmflow.workers.settings import Settings

logger = logging.getLogger(__name__)

# Task families share engines: text-to-image and edits run on the same diffusion engine class.
ENGINE_OF_FAMILY = {"vlm": "mgm", "diffusion": "diffusion", "edit": "diffusion"}


Loras = tuple[tuple[str, float], ...]  # (adapter path, weight): part of a diffusion engine's identity


def load_engine(engine: str, name: str, loras: Loras = (), *, vlm_placement: dict | None = None) -> Any:
    """Load one engine; the model packages are imported only by workers that use them.

    ``vlm_placement``: ``device_map`` / ``quantization`` / ``template`` of Mini-Gemini engines
    (``Settings.vlm_placement``).
    """
    if engine == "mgm":
        from mgmflow.models.mgm.engine import MGMEngine

        return MGMEngine.from_pretrained(name, **(vlm_placement or {}))
    from mgmflow.models.diffusion import DiffusionEngine, LoraSpec

    return DiffusionEngine.from_pretrained(name, loras=[LoraSpec(path, weight) for path, weight in loras])


def engine_bytes(engine: Any) -> int:
    """Parameter and buffer bytes of the torch modules an engine holds (found among its attributes)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return 0
    seen, total = set(), 0

    def visit(value: Any, depth: int) -> None:
        nonlocal total
        if id(value) in seen or depth > 3:
            return
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            for tensor in (*value.parameters(), *value.buffers()):
                if id(tensor) not in seen and not tensor.is_meta:  # meta: offloaded to disk, not in memory
                    seen.add(id(tensor))
                    total += tensor.numel() * tensor.element_size()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            for item in vars(value).values():
                visit(item, depth + 1)

    visit(engine, 0)
    return total


class ModelCache:
    def __init__(self, budget_bytes: int | None = None, loader: Callable[[str, str, Loras], Any] = load_engine):
        self.budget_bytes = budget_bytes
        self._loader = loader
        self._engines: OrderedDict[tuple[str, str, Loras], tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()  # held while loading: two threads never load the same weights twice

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelCache:
        """The cache a worker keeps: its memory budget and VLM placement from the settings."""
        budget = None if settings.model_memory_gb is None else int(settings.model_memory_gb * 2**30)
        return cls(budget, loader=functools.partial(load_engine, vlm_placement=settings.vlm_placement))

    def get(self, family: str, name: str, loras: Loras = ()) -> Any:
        """The engine for ``family``'s model ``name`` (with LoRA adapters), loading it (and evicting others)."""
        key = (ENGINE_OF_FAMILY[family], name, tuple(loras))
        with self._lock:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key][0]
            logger.info("loading %s model %r %s", *key)
            engine = self._loader(*key)
            size = engine_bytes(engine)
            self._make_room(size)
            self._engines[key] = (engine, size)
            return engine

    def loaded(self) -> list[tuple[str, str, Loras, int]]:
        with self._lock:
            return [(*key, size) for key, (_, size) in self._engines.items()]

    def _make_room(self, size: int) -> None:
        if self.budget_bytes is None:
            return
        while self._engines and sum(s for _, s in self._engines.values()) + size > self.budget_bytes:
            key, _ = self._engines.popitem(last=False)
            logger.info("evicting %s model %r %s to stay within %d bytes", *key, self.budget_bytes)
        free_memory()

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Turn an out-of-memory error inside a model call into a retryable ``ResourceExhaustedError``."""
        try:
            yield
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            free_memory()
            raise ResourceExhaustedError(f"out of memory during a model call: {error}") from error


def is_out_of_memory(error: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, (RuntimeError, MemoryError)) and (
        isinstance(error, MemoryError) or "out of memory" in str(error).lower())


def free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
