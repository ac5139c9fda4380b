"""Seeds derived from a run's seed and a position (item, round, draft), never from the order work happens to run.

Then the number of workers, a redelivery or the execution mode cannot change a single pixel.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *position: int) -> int:
    """A 32-bit seed for ``position`` under the run's ``seed``: sha256 of ``"seed:p1:p2…"``, stable across machines."""
    key = ":".join(str(part) for part in (seed, *position)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "big")
