"""Dynamic batching: task threads hand their requests to one batcher thread that owns the model call.

The batcher takes the first waiting request, gathers compatible ones (equal ``key``) arriving within a short
window, up to a batch size, and runs them as one model call; each task thread gets its own result back.
Requests that do not fit the current batch wait for the next one, in arrival order. Where any requests can share a
call and the key only says which share it best (``mix_keys``: the VLM, whose key is the number of images), a batch
that is not full after the window takes the waiting requests of other keys too: a pipelined run sends a few requests
of each kind at a time, and one call decoding all of them beats one call per kind. And where a call is long (a VLM
decoding hundreds of tokens), a request that just misses it waits a whole call: ``wait_share`` stretches the window
to that share of the previous call's duration (up to ``MAX_WAIT_S``) while requests are waiting, so that the
requests a finished batch sets off (a page's next prompt after its critique, a few hops later) still join the next
one; a request that finds the model idle starts after the plain window.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mgmflow.models.errors import Cancelled

logger = logging.getLogger(__name__)

MAX_WAIT_S = 1.0  # the longest a batch waits for more requests


@dataclass
class BatchItem:
    request: Any
    key: Hashable
    check: Callable[[], None] = lambda: None  # raises to stop this request (cancel, deadline)
    on_progress: Callable[..., None] = lambda *args: None  # this request's share of the batch's progress
    future: Future = field(default_factory=Future)
    stopped: bool = False

    def probe(self) -> bool:
        """Run this request's check; a request that must stop gets its error now. True while it is live."""
        if self.stopped:
            return False
        try:
            self.check()
        except Exception as error:  # noqa: BLE001 — the request's own stop reason, handed back to its thread
            self.stopped = True
            self.future.set_exception(error)
        return not self.stopped


class BatchStopped(Cancelled):
    """Every request of the batch was stopped; the model call ends early."""


class Batcher:
    """Runs ``run(items, check)`` with lists of compatible items; ``run`` returns one result per item."""

    def __init__(self, run: Callable[[list[BatchItem], Callable[[], None]], Sequence[Any]], *,
                 max_size: int, window_s: float, mix_keys: bool = False, wait_share: float = 0.0,
                 name: str = "batcher"):
        self._run = run
        self.max_size = max_size
        self.window_s = window_s
        self.mix_keys = mix_keys
        self.wait_share = wait_share
        self._last_call_s = 0.0
        self._incoming: queue.Queue[BatchItem] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batch sizes, for tests and metrics

    def __call__(self, item: BatchItem, timeout: float | None = None) -> Any:
        """Submit ``item`` and block until its own result (or its error)."""
        self._incoming.put(item)
        return item.future.result(timeout)

    def _gather(self, pending: deque[BatchItem]) -> list[BatchItem]:
        # Requests waiting already: the model is the bottleneck, and a longer wait fills its next call. Otherwise
        # it was idle, and a lone request (a chat turn) starts after the plain window.
        busy = bool(pending) or not self._incoming.empty()
        first = pending.popleft() if pending else self._incoming.get()
        batch = [first]
        for item in list(pending):  # earlier arrivals that did not fit the previous batch
            if len(batch) < self.max_size and item.key == first.key:
                pending.remove(item)
                batch.append(item)
        stretch = min(self.wait_share * self._last_call_s, MAX_WAIT_S) if busy else 0.0
        end = time.monotonic() + max(self.window_s, stretch)
        while len(batch) + (len(pending) if self.mix_keys else 0) < self.max_size:
            try:
                item = self._incoming.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            (batch if item.key == first.key else pending).append(item)
        while self.mix_keys and pending and len(batch) < self.max_size:
            batch.append(pending.popleft())  # arrival order
        return batch

    def _loop(self) -> None:
        pending: deque[BatchItem] = deque()
        while True:
            batch = [item for item in self._gather(pending) if item.probe()]
            if not batch:
                continue

            def check() -> None:
                if not any([item.probe() for item in batch]):  # probe all: each stopped one is answered now
                    raise BatchStopped()

            self.batch_sizes.append(len(batch))
            started = time.monotonic()
            try:
                results = self._run(batch, check)
            except BatchStopped:
                continue
            except BaseException as error:  # noqa: BLE001 — the batch's failure is each live request's failure
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            finally:
                self._last_call_s = time.monotonic() - started
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
