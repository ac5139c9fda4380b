"""The retention sweeper of an API process: every ``MGMFLOW_GC_INTERVAL_S`` it deletes the threads whose runs all
ended over ``MGMFLOW_RUN_RETENTION_S`` ago (records, checkpoints, the artifacts their runs made), then removes expired
artifacts and the blobs no artifact references any more (``ArtifactStore.cleanup``). ``mgmflow gc`` runs one sweep.
Several API processes may sweep the same stores: a sweep only removes what has expired, whoever does it."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)


def sweep(runs, store, *, run_retention_s: float | None, grace_s: float) -> tuple[int, int, int]:
    """One sweep: (threads, expired artifacts, blobs) removed."""
    threads = 0
    if run_retention_s is not None:
        while batch := runs.delete_ended_before(time.time() - run_retention_s):
            threads += batch
    return (threads, *store.cleanup(grace_s=grace_s))


async def sweep_forever(runs, store, *, interval_s: float, run_retention_s: float | None, grace_s: float) -> None:
    """Sweep every ``interval_s`` seconds until cancelled; a failed sweep is logged and tried again later."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            removed = await run_in_threadpool(sweep, runs, store, run_retention_s=run_retention_s, grace_s=grace_s)
        except Exception:  # the database or the store may be away for a while; the next sweep tries again
            logger.warning("retention sweep failed", exc_info=True)
            continue
        if any(removed):
            logger.info("retention sweep: %d threads, %d expired artifacts and %d unreferenced blobs removed", *removed)
