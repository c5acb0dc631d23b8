"""Fixtures: every integration test gets its own database on a real PostgreSQL server.

The server and the per-test databases come from ``tasker_worker.testing.pytest_plugin``:
``TASKER_TEST_DATABASE_URL`` when set, testcontainers when ``TASKER_TEST_CONTAINERS=1`` and a
Docker engine answers (skipped cleanly otherwise), else the embedded PostgreSQL in a temporary
directory, started once per session and removed by the fixture that started it. Each test
database is a copy of a template migrated once per session; ``blank_db_url`` is empty.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql as pgsql

REPO = Path(__file__).resolve().parent.parent

# The databases come from the testing toolkit's pytest plugin (tasker_worker.testing.pytest_plugin,
# loaded through its entry point): the project's tests use what users' tests get.


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (``pytest.mark.anyio``) run on asyncio, as the worker does."""
    return "asyncio"


@pytest.fixture(scope="session")
def pg_admin_url(tasker_pg_admin_url: str) -> str:
    """URL of a maintenance database on the test server."""
    return tasker_pg_admin_url


@pytest.fixture
def db_url(tasker_db_url: str) -> str:
    """A fresh, fully migrated database for one test."""
    return tasker_db_url


@pytest.fixture
def url(db_url: str, request: pytest.FixtureRequest) -> str:
    """``db_url`` with the queue of the test module's ``NS`` namespace created."""
    namespace = getattr(request.module, "NS", None)
    if namespace:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT tasker.create_namespace_queue(%s)", (namespace,))
    return db_url


@pytest.fixture
def no_day_partitions(db_url: str) -> None:
    """``db_url`` without the outcome table's day partitions that its migration created (today's
    and the days after it, empty): for tests that create, fill and drop their own."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for (name,) in conn.execute("SELECT name FROM tasker.history_partitions() WHERE kind = 'day'").fetchall():
            conn.execute(pgsql.SQL("DROP TABLE {}").format(pgsql.Identifier("tasker", name)))


@pytest.fixture
def blank_db_url(tasker_blank_db_url: str) -> str:
    """A fresh empty database (nothing installed) for one test."""
    return tasker_blank_db_url


@pytest.fixture
def conn(db_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the test database."""
    with psycopg.connect(db_url, autocommit=True) as c:
        yield c


@pytest.fixture
def cli_env(db_url: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the CLI in a subprocess against the test database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    env["TASKER_DATABASE_URL"] = db_url
    env["TASKER_CONFIG_DIR"] = str(REPO / "config")
    env["TASKER_ENV"] = "test"
    env["HOME"] = str(tmp_path)
    return env
