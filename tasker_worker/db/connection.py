"""Connections: resolving the database URL, single connections and the async pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from tasker_worker.config.models import DatabaseConfig
from tasker_worker.errors import ConfigError, DatabaseError, first_line

#: How pooled connections show in ``pg_stat_activity`` (operators find the worker's sessions by it).
POOL_APPLICATION_NAME = "tasker-worker"
#: How the producer's (``AsyncClient`` / ``Client``) pooled connections show there.
CLIENT_APPLICATION_NAME = "tasker-client"
#: How the connections of the reads on ``[database] read_url`` show there.
READ_APPLICATION_NAME = "tasker-reads"
#: How long a pool keeps re-trying a lost connection in the background before it gives up and
#: connects again only when asked (the next call that needs a connection tries at once).
#: psycopg_pool's default, 5 minutes, doubles its wait each time (1, 2, 4, 8 s...): a primary
#: promoted after a 10 s outage was found up to 4 s late, and a promotion within a second waited
#: for the first retry, a second after the loss.
POOL_RECONNECT_WINDOW_S = 0.5


def resolve_database_url(config: DatabaseConfig) -> str:
    """The configured URL, or the embedded server's: attached to when it runs, else started
    and left running for whoever comes next (``db/embedded.py``: only ``db stop`` stops it)."""
    if config.url:
        return config.url
    from tasker_worker.db.embedded import ensure_embedded

    return ensure_embedded(config.embedded_data_dir).url


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "<unparsable database URL>"
    info.pop("password", None)
    host = info.get("host", "localhost")
    return f"{info.get('dbname', '')}@{host}:{info.get('port', 5432)}"


async def connect(
    url: str,
    *,
    autocommit: bool = True,
    timeout: float = 10.0,
    application_name: str | None = None,
    prepared: bool = True,
) -> psycopg.AsyncConnection[Any]:
    """One async connection, with a clear error when the server cannot be reached.

    ``prepared=False``: psycopg never prepares a statement on it (safe behind a transaction pooler).
    """
    extra: dict[str, Any] = {}
    if application_name is not None and not _names_itself(url):
        extra["application_name"] = application_name[:63]
    if not prepared:
        extra["prepare_threshold"] = None
    try:
        return await psycopg.AsyncConnection.connect(
            url, autocommit=autocommit, connect_timeout=max(1, int(timeout)), **extra
        )
    except psycopg.OperationalError as exc:
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}: {first_line(exc)}") from exc


@asynccontextmanager
async def connection(url: str, *, timeout: float = 10.0) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """``async with connection(url) as conn``: an autocommit connection closed on exit."""
    conn = await connect(url, timeout=timeout)
    try:
        yield conn
    finally:
        await conn.close()


def _pool_kwargs(url: str, config: DatabaseConfig, application_name: str) -> dict[str, Any]:
    """The connection settings of a pool (async or not) for ``config``."""
    kwargs: dict[str, Any] = {"autocommit": True}
    if not _names_itself(url):
        kwargs["application_name"] = application_name
    if config.pooler == "transaction":
        kwargs["prepare_threshold"] = None
    else:
        kwargs["options"] = "-c plan_cache_mode=force_custom_plan"
    return kwargs


async def open_pool(
    url: str,
    config: DatabaseConfig,
    *,
    max_size: int | None = None,
    application_name: str = POOL_APPLICATION_NAME,
) -> AsyncConnectionPool:
    """An opened pool of autocommit connections; the first connection is checked at once.

    Direct connections plan every prepared statement with the parameters and statistics of the
    moment (``plan_cache_mode = force_custom_plan``, see ``queries``). Behind a transaction
    pooler (``[database] pooler = "transaction"``) nothing is prepared and no session setting
    is sent: the pooler would mix both up between clients.
    """
    kwargs = _pool_kwargs(url, config, application_name)
    # One connection first: a server that refuses us says why at once (a pool would retry for
    # connect_timeout and then only say that it is incomplete).
    try:
        probe = await psycopg.AsyncConnection.connect(
            url, connect_timeout=max(1, int(config.connect_timeout.total_seconds())), **kwargs
        )
    except psycopg.OperationalError as exc:
        raise _connect_error(url, exc) from exc
    await probe.close()
    pool = AsyncConnectionPool(
        url,
        min_size=config.pool_min_size,
        max_size=max_size or config.pool_max_size,
        kwargs=kwargs,
        timeout=config.connect_timeout.total_seconds(),
        reconnect_timeout=POOL_RECONNECT_WINDOW_S,
        open=False,
        name="tasker",
        # No check on checkout: it would cost a round trip per operation. A connection that
        # breaks fails its operation, the caller retries, and the pool discards it.
    )
    try:
        await pool.open(wait=True, timeout=config.connect_timeout.total_seconds())
    except Exception as exc:
        await pool.close()
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}: {exc}") from exc
    return pool


async def open_read_pool(config: DatabaseConfig, *, max_size: int = 4) -> AsyncConnectionPool | None:
    """A pool on ``[database] read_url`` for what only reads (None when no read URL is set): its
    sessions show as ``tasker-reads``; nothing is ever migrated or written through it."""
    if not config.read_url:
        return None
    try:
        return await open_pool(config.read_url, config, max_size=max_size, application_name=READ_APPLICATION_NAME)
    except DatabaseError as exc:
        raise DatabaseError(f"the read replica (database.read_url): {exc.message}") from exc


def open_sync_pool(
    url: str,
    config: DatabaseConfig,
    *,
    max_size: int | None = None,
    application_name: str = CLIENT_APPLICATION_NAME,
) -> ConnectionPool:
    """``open_pool`` for code without an event loop (the blocking ``Client``): the same
    settings, the same first check."""
    kwargs = _pool_kwargs(url, config, application_name)
    try:
        psycopg.Connection.connect(
            url, connect_timeout=max(1, int(config.connect_timeout.total_seconds())), **kwargs
        ).close()
    except psycopg.OperationalError as exc:
        raise _connect_error(url, exc) from exc
    pool = ConnectionPool(
        url,
        min_size=config.pool_min_size,
        max_size=max_size or config.pool_max_size,
        kwargs=kwargs,
        timeout=config.connect_timeout.total_seconds(),
        reconnect_timeout=POOL_RECONNECT_WINDOW_S,
        open=False,
        name="tasker-client",
    )
    try:
        pool.open(wait=True, timeout=config.connect_timeout.total_seconds())
    except Exception as exc:
        pool.close()
        raise DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}: {exc}") from exc
    return pool


def _connect_error(url: str, exc: psycopg.OperationalError) -> DatabaseError | ConfigError:
    reason = first_line(exc)
    if "unsupported startup parameter" in reason:
        # PgBouncer refuses the session setting that direct connections get.
        return ConfigError(
            f"cannot connect to PostgreSQL at {describe(url)}: {reason}: the URL goes through a pooler; "
            'with PgBouncer in transaction mode set [database] pooler = "transaction" '
            "(TASKER__DATABASE__POOLER=transaction) and run PollingOnly",
            key="database.pooler",
        )
    stopped = _stopped_embedded(url)
    if stopped is not None:
        return DatabaseError(
            f"cannot connect to PostgreSQL at {describe(url)}: {reason}: the embedded server in {stopped} is not "
            f"running (`tasker-worker db stop` stops it); start it again with `tasker-worker db url` "
            f"(TASKER__DATABASE__EMBEDDED_DATA_DIR={stopped} when it is not the default directory)"
        )
    return DatabaseError(f"cannot connect to PostgreSQL at {describe(url)}: {reason}")


def _stopped_embedded(url: str) -> Path | None:
    """The data directory of an embedded server that ``url`` points to and that is stopped
    (its socket lives in its data directory), else None."""
    try:
        host = psycopg.conninfo.conninfo_to_dict(url).get("host")
    except psycopg.ProgrammingError:
        return None
    if not isinstance(host, str) or not host.startswith("/"):
        return None
    data_dir = Path(host)
    if (data_dir / "PG_VERSION").is_file() and not (data_dir / "postmaster.pid").exists():
        return data_dir
    return None


def _names_itself(url: str) -> bool:
    """Whether the URL sets its own application_name (which then wins over ours)."""
    try:
        return "application_name" in psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return False
