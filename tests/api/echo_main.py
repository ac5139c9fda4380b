"""`mgmflow` with the test-only ``echo`` workflow registered: how the distributed tests and the load benchmark
start API and worker subprocesses that know it (``python tests/api/echo_main.py serve ...``). It registers at import,
not under ``__main__``: ``serve --workers N`` spawns API processes that import this file again as ``__mp_main__``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from echo_workflow import register_echo  # noqa: E402

from mgmflow.orchestrator.cli import main  # noqa: E402

register_echo()
if __name__ == "__main__":
    main()
