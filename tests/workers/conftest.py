"""Fixtures of the worker tests; the real parts themselves live in ``worker_support``."""

from __future__ import annotations

import pytest

from worker_support import Services


@pytest.fixture
def services(tmp_path, mgmflow_home):
    started = Services(tmp_path, mgmflow_home)
    yield started
    started.close()
