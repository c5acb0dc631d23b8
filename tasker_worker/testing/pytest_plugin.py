"""pytest fixtures for integration tests of handlers: a real migrated database and a worker.

Installed with tasker-worker and loaded by pytest automatically (entry point ``pytest11``);
nothing starts until a test asks for a fixture. The server, in order of preference:

- ``TASKER_TEST_DATABASE_URL`` (a role allowed to ``CREATE DATABASE``);
- testcontainers, when ``TASKER_TEST_CONTAINERS=1`` (an error, not a skip, when no Docker
  engine answers: a run asked to test against a container must not pass having tested nothing);
- an embedded PostgreSQL in a temporary directory, started once per session and removed by
  the fixture that started it.

Each test gets its own database, copied from a template migrated once per session. The
configuration of ``tasker_config`` and ``tasker_worker`` is resolved as by every other entry point
(``load_config``: your ``config/`` or ``TASKER_CONFIG_DIR`` layers, ``TASKER__*`` variables), in
the environment ``TASKER_ENV`` or else ``test`` (an overlay it may lack), with the test's
database on top::

    async def test_resize(tasker_worker):
        async with tasker_worker(namespaces=["media"], handlers=register) as run:
            [step] = await run.send("media", "resize", [{"path": "a.png"}])
            outcome = await run.outcome(step)
            assert outcome["status"] == "succeeded"

(with ``pytest.mark.anyio``; ``register`` is your module's ``register(worker)``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tasker_worker.config.loader import LoadedConfig
    from tasker_worker.runtime.worker import Worker

#: How the plugin's own settings show among the origins of ``config show`` and ``tasker_config``.
PLUGIN_ORIGIN = "pytest plugin"

# The runtime is imported inside the fixtures: pytest loads this plugin in every session of an
# environment where tasker-worker is installed, and most sessions never use it.


def _with_db(url: str, dbname: str) -> str:
    from psycopg import conninfo

    return conninfo.make_conninfo(url, dbname=dbname)


def _docker_unavailable() -> str | None:
    """Why no Docker engine answers (None: one does)."""
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return None
    except ImportError:
        return "testcontainers is not installed (pip install 'tasker-worker[test]')"
    except Exception as exc:
        return f"no Docker engine answers ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"


def _create_database(admin_url: str, name: str, template: str) -> None:
    import psycopg
    from psycopg import sql

    from tasker_worker.db import queries

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL(queries.CREATE_DATABASE_FROM).format(sql.Identifier(name), sql.Identifier(template)))


def _drop_database(admin_url: str, name: str) -> None:
    import psycopg
    from psycopg import sql

    from tasker_worker.db import queries

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL(queries.DROP_DATABASE).format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def tasker_pg_admin_url() -> Iterator[str]:
    """URL of a maintenance database on the test server (see the module's docstring)."""
    explicit = os.environ.get("TASKER_TEST_DATABASE_URL")
    if explicit:
        yield explicit
        return
    if os.environ.get("TASKER_TEST_CONTAINERS") == "1":
        # Asked for and unavailable is an error: a skip would let a run that tests nothing pass.
        reason = _docker_unavailable()
        if reason is not None:
            pytest.fail(f"TASKER_TEST_CONTAINERS=1 but {reason}; unset it to use the embedded server", pytrace=False)
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:17") as container:
            yield container.get_connection_url(driver=None)
        return
    from tasker_worker.db.embedded import temporary_embedded

    with temporary_embedded(prefix="tasker-test-pg-") as (url, _):
        yield url


@pytest.fixture(scope="session")
def tasker_template_db(tasker_pg_admin_url: str) -> Iterator[str]:
    """Name of a database migrated once per session, the template of every test database."""
    import anyio

    from tasker_worker.db import migrations

    name = f"tasker_tpl_{os.getpid()}"
    _drop_database(tasker_pg_admin_url, name)
    _create_database(tasker_pg_admin_url, name, "template0")
    anyio.run(migrations.migrate, _with_db(tasker_pg_admin_url, name))
    try:
        yield name
    finally:
        _drop_database(tasker_pg_admin_url, name)


@pytest.fixture
def tasker_db_url(tasker_pg_admin_url: str, tasker_template_db: str) -> Iterator[str]:
    """A fresh, fully migrated database for one test (dropped afterwards)."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _create_database(tasker_pg_admin_url, name, tasker_template_db)
    try:
        yield _with_db(tasker_pg_admin_url, name)
    finally:
        _drop_database(tasker_pg_admin_url, name)


@pytest.fixture
def tasker_blank_db_url(tasker_pg_admin_url: str) -> Iterator[str]:
    """A fresh empty database (nothing installed) for one test."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    _create_database(tasker_pg_admin_url, name, "template0")
    try:
        yield _with_db(tasker_pg_admin_url, name)
    finally:
        _drop_database(tasker_pg_admin_url, name)


def resolve_test_config(url: str, overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """The configuration of a test on the database ``url``: the one resolution of every entry
    point (``load_config``), in the environment ``TASKER_ENV`` or else ``test``, with ``url``
    (not migrated again: the template was) and ``overrides`` (dotted keys) on top."""
    from tasker_worker.config.loader import load_config

    explicit_env = "TASKER_ENV" in os.environ
    flags: dict[str, Any] = {"database.url": url, "database.auto_migrate": False, **(overrides or {})}
    return load_config(
        None,
        None if explicit_env else "test",
        flags,
        # A project without a `test` overlay runs its tests on the base settings; an environment
        # named in TASKER_ENV must exist, as for every other entry point.
        allow_missing_env=not explicit_env,
        overrides_origin=PLUGIN_ORIGIN,
    )


@pytest.fixture
def tasker_config(tasker_db_url: str) -> LoadedConfig:
    """The configuration a test's worker and clients use, with where each value came from
    (``tasker_config.origin("retry.max_attempts")``): see ``resolve_test_config``."""
    return resolve_test_config(tasker_db_url)


class RunningWorker:
    """A worker running in the test's event loop, with helpers to feed it and wait for it."""

    def __init__(self, url: str, worker: Worker) -> None:
        self.url = url
        self.worker = worker

    async def send(self, namespace: str, handler: str, inputs: list[dict[str, Any]], **extra: Any) -> list[str]:
        """Send steps; return their step_uuids."""
        from tasker_worker.testing.db import send_steps

        bodies = await send_steps(self.url, namespace, handler, inputs, **extra)
        return [str(b["step_uuid"]) for b in bodies]

    async def outcome(self, step_uuid: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Wait (bounded) for the step's outcome row and return it as a dict."""
        from tasker_worker.testing.db import fetch, wait_until

        async def row() -> dict[str, Any] | None:
            from tasker_worker.db import queries

            rows = await fetch(self.url, queries.OUTCOME_OF_STEP, (step_uuid,))
            if not rows:
                return None
            status, result, error, attempts, handler = rows[0]
            return {"status": status, "result": result, "error": error, "attempts": attempts, "handler": handler}

        found: dict[str, Any] = await wait_until(row, timeout=timeout)
        return found


WorkerFactory = Callable[..., Any]


@pytest.fixture
def tasker_worker(tasker_db_url: str) -> WorkerFactory:
    """Start workers on the test's database: ``async with tasker_worker(...) as run``.

    Keywords: ``namespaces``, ``mode`` (default: the configuration's, see ``tasker_config``),
    ``handlers`` (a ``register(worker)`` function), ``overrides`` (dotted config keys),
    ``state``. The worker stops gracefully when the block ends.
    """

    @asynccontextmanager
    async def start(
        *,
        namespaces: list[str] | None = None,
        mode: str | None = None,
        handlers: Callable[[Worker], Any] | None = None,
        overrides: dict[str, Any] | None = None,
        state: Any = None,
    ) -> AsyncIterator[RunningWorker]:
        from tasker_worker.testing.db import running_worker

        flags = {"event_system.deployment_mode": mode, "worker.namespaces": namespaces, **(overrides or {})}
        config = resolve_test_config(tasker_db_url, flags).config
        async with running_worker(tasker_db_url, config, state=state, setup=handlers) as worker:
            yield RunningWorker(tasker_db_url, worker)

    return start
