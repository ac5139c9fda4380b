"""Fixtures of the orchestrator tests (helpers live in ``orch_helpers``)."""

from __future__ import annotations

import contextlib

import pytest


def postgres_available() -> bool:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/test", connect_timeout=2):
            return True
    except Exception:
        return False


@contextlib.contextmanager
def postgres_schema():
    """A fresh schema in the machine's PostgreSQL (db ``test``), dropped afterwards: its URL."""
    import uuid

    import psycopg

    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432 (db test); CI provides it")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    base = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(base, autocommit=True) as connection:
        connection.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(base, autocommit=True) as connection:
            connection.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def postgres_url():
    with postgres_schema() as url:
        yield url


@pytest.fixture(scope="module")
def module_postgres_url():
    """``postgres_url`` shared by a module's tests (one long-lived stack of workers)."""
    with postgres_schema() as url:
        yield url
