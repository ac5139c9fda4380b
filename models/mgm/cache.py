"""Caches the official code lacks: visual features by image content, and a thread's KV prefix.

Both are least-recently-used maps bounded in bytes. The visual cache skips both vision encoders for an image
already seen (same pixels, same model); the prefix cache lets the next turn of a conversation prefill only
what is new since the last turn, instead of the whole history and its images again.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch
from PIL import Image

from mgmflow.models.mgm.generation import PastKV

Value = TypeVar("Value")
# One prompt position group: a token id, or an image's content hash standing for all its visual tokens.
PromptItem = int | str


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class ByteLRU(Generic[Value]):
    """A map that evicts its least recently used entries to stay within ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[Value, int]] = OrderedDict()
        self._stats = CacheStats()

    def get(self, key: Hashable) -> Value | None:
        entry = self._entries.get(key)
        if entry is None:
            self._stats.misses += 1
            return None
        self._stats.hits += 1
        self._entries.move_to_end(key)
        return entry[0]

    def put(self, key: Hashable, value: Value, nbytes: int) -> None:
        """Store ``value``; an entry larger than the whole budget is not kept."""
        self.pop(key)
        if nbytes > self.max_bytes:
            return
        while self._stats.bytes + nbytes > self.max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._stats.bytes -= evicted
            self._stats.evictions += 1
        self._entries[key] = (value, nbytes)
        self._stats.bytes += nbytes

    def pop(self, key: Hashable) -> Value | None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return None
        self._stats.bytes -= entry[1]
        return entry[0]

    def stats(self) -> CacheStats:
        return CacheStats(**{**vars(self._stats), "entries": len(self._entries)})


def image_digest(image: Image.Image) -> str:
    """Content hash of a decoded image: equal pixels give equal digests, whatever file they came from."""
    digest = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def tensor_bytes(*tensors: torch.Tensor) -> int:
    """Bytes the tensors keep alive: each distinct storage, whole (a view pins all of its base)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class VisualFeatureCache:
    """Projected visual tokens [n_tokens, H] per (model, geometry, image digest)."""

    def __init__(self, max_bytes: int, model_key: Hashable) -> None:
        self._lru: ByteLRU[torch.Tensor] = ByteLRU(max_bytes)
        self._model_key = model_key

    def get(self, digest: str) -> torch.Tensor | None:
        return self._lru.get((self._model_key, digest))

    def put(self, digest: str, features: torch.Tensor) -> None:
        """Keep a copy of ``features``: a row of an encoding batch would pin the whole batch."""
        features = features.clone()
        self._lru.put((self._model_key, digest), features, tensor_bytes(features))

    def stats(self) -> CacheStats:
        return self._lru.stats()


@dataclass
class _PrefixEntry:
    items: tuple[PromptItem, ...]
    ends: tuple[int, ...]  # ends[k] = KV positions covered by items[: k + 1]
    past: PastKV


class PrefixCache:
    """The KV cache of each conversation thread's last turn, keyed by the request's ``cache_key``.

    A turn stores the KV of its prompt and answer; the next turn of the same thread reuses the longest
    common prefix of prompt items (token ids, and image digests for whole images), at least one item short of
    the new prompt so that the model still computes the logits of its last position.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[_PrefixEntry] = ByteLRU(max_bytes)

    def lookup(self, key: str, items: Sequence[PromptItem]) -> tuple[int, PastKV | None]:
        """(number of leading items covered, their KV) — (0, None) on a miss."""
        entry = self._lru.get(key)
        if entry is None:
            return 0, None
        limit = min(len(entry.items), len(items) - 1)
        matched = 0
        while matched < limit and entry.items[matched] == items[matched]:
            matched += 1
        if matched == 0:
            return 0, None
        length = entry.ends[matched - 1]
        return matched, tuple((k[..., :length, :], v[..., :length, :]) for k, v in entry.past)

    def store(self, key: str, items: Sequence[PromptItem], item_lengths: Sequence[int], past: PastKV) -> None:
        ends = tuple(itertools.accumulate(item_lengths))
        if ends and ends[-1] != past[0][0].shape[-2]:
            raise ValueError(f"prefix of {ends[-1]} positions does not match a KV cache of {past[0][0].shape[-2]}")
        entry = _PrefixEntry(tuple(items), ends, past)
        self._lru.put(key, entry, tensor_bytes(*(t for layer in past for t in layer)))

    def stats(self) -> CacheStats:
        return self._lru.stats()
