"""Fixtures of the orchestrator tests (helpers live in ``orch_helpers``)."""

from __future__ import annotations

import pytest


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=2):
            return True
    except Exception:
        return False


@pytest.fixture
def postgres_url():
    """A fresh schema in the machine's PostgreSQL (db ``test``), dropped afterwards."""
    import uuid

    import psycopg

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (db test); CI provides it")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    base = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    yield f"{base}?options=-csearch_path%3D{schema}"
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f"DROP SCHEMA {schema} CASCADE")


