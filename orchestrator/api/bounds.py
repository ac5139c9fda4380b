"""Bounds on free-form JSON a client stores with its runs and threads (``metadata``): checked while the body is
validated, before anything is created. Deeply nested JSON is refused too: it costs every later reader (lists,
searches, webhooks) a recursion that may not fit."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import AfterValidator

MAX_METADATA_BYTES = 16 * 1024
MAX_JSON_DEPTH = 16


def json_depth(value: Any) -> int:
    """How deeply ``value`` nests dicts and lists (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((child, depth + 1) for child in item)
    return deepest


def _bounded_metadata(value: dict[str, Any]) -> dict[str, Any]:
    depth = json_depth(value)
    if depth > MAX_JSON_DEPTH:
        raise ValueError(f"metadata nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
    size = len(json.dumps(value, separators=(",", ":")).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size:,} bytes as JSON; the limit is {MAX_METADATA_BYTES:,}")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_bounded_metadata)]
