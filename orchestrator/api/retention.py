"""The retention sweeper of an API process: every ``MGMFLOW_GC_INTERVAL_S`` it removes expired artifacts and the
blobs no artifact references any more (``ArtifactStore.cleanup``, which ``mgmflow gc`` runs once). Several API
processes may sweep the same store: a sweep only removes what is expired or unreferenced, whoever does it."""

from __future__ import annotations

import asyncio
import logging

from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)


async def sweep_forever(store, *, interval_s: float, grace_s: float) -> None:
    """Sweep ``store`` every ``interval_s`` seconds until cancelled; a failed sweep is logged and retried later."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            expired, blobs = await run_in_threadpool(store.cleanup, grace_s=grace_s)
        except Exception:  # the store may be away for a while; the next sweep tries again
            logger.warning("artifact sweep failed", exc_info=True)
            continue
        if expired or blobs:
            logger.info("artifact sweep: %d expired artifacts and %d unreferenced blobs removed", expired, blobs)
