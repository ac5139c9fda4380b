"""Log records tagged with the run (and task) a request is about, so that one run's lines can be grepped across
the API, the orchestrators and the workers: ``... run=<run_id> task=<task_id> ...``."""

from __future__ import annotations

import logging
from contextvars import ContextVar

current_run: ContextVar[str] = ContextVar("mgmflow_run", default="-")
current_task: ContextVar[str] = ContextVar("mgmflow_task", default="-")

FORMAT = "%(asctime)s %(levelname)s %(name)s run=%(run_id)s task=%(task_id)s %(message)s"


class RunTagFilter(logging.Filter):
    """Adds ``run_id`` and ``task_id`` to every record (``-`` outside a run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id = getattr(record, "run_id", None) or current_run.get()
        record.task_id = getattr(record, "task_id", None) or current_task.get()
        return True


def configure_logging(level: str) -> None:
    """Root logging for ``mgmflow serve``: one line per record, tagged with its run and task."""
    handler = logging.StreamHandler()
    handler.addFilter(RunTagFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
