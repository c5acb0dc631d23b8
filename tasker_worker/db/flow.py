"""Flow control as an operator changes and reads it: pause, resume, limits, and their indexes.

The claim applies what ``tasker.queue_flow`` holds (migration 0016; ``db/queries.py``), so a
change here takes effect at every worker's next claim. The indexes that keep a
flow-controlled claim proportional to what it claims on a long queue are built here too,
``CONCURRENTLY`` (producers keep sending while they build), by ``queue limit`` and by a worker
whose namespace first needs them.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg_pool import AsyncConnectionPool

from tasker_worker.db import queries
from tasker_worker.db.queue_client import translate_error
from tasker_worker.domain.flow import QueueFlow, Rate
from tasker_worker.domain.names import queue_name, validate_namespace
from tasker_worker.errors import first_line

log = logging.getLogger(__name__)


async def read_flow(pool: AsyncConnectionPool, namespace: str | None = None) -> list[QueueFlow]:
    """The flow control of every namespace that has any (or of ``namespace``)."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(queries.QUEUE_FLOW)).fetchall()
    found = [QueueFlow.from_row(r) for r in rows]
    return [f for f in found if namespace is None or f.namespace == namespace]


async def pause(pool: AsyncConnectionPool, namespace: str, by: str | None) -> bool:
    """Pause ``namespace``: no worker starts a new step of it. False: it was paused already."""
    validate_namespace(namespace)
    return bool(await _one(pool, queries.PAUSE_QUEUE, (namespace, by)))


async def resume(pool: AsyncConnectionPool, namespace: str, by: str | None) -> bool:
    """Resume ``namespace`` (and wake its listening workers). False: it was not paused."""
    validate_namespace(namespace)
    return bool(await _one(pool, queries.RESUME_QUEUE, (namespace, by)))


async def set_limits(
    pool: AsyncConnectionPool,
    namespace: str,
    *,
    max_running: int | None = None,
    key_max_running: int | None = None,
    rate: Rate | None = None,
    burst: int | None = None,
    remove_rate: bool = False,
    by: str | None = None,
) -> QueueFlow | None:
    """Change ``namespace``'s limits (None leaves one as it is, 0 removes it; ``remove_rate``
    removes the rate; ``burst`` alone changes the burst of the rate in force) and build the
    indexes they need; the flow in force afterwards."""
    validate_namespace(namespace)
    rate_count = 0 if remove_rate else (rate.count if rate else None)
    await _one(
        pool,
        queries.SET_QUEUE_LIMITS,
        {
            "namespace": namespace,
            "max_running": max_running,
            "key_max_running": key_max_running,
            "rate_count": rate_count,
            "rate_period_s": rate.period_s if rate else None,
            "rate_burst": burst if burst is not None else (rate.burst if rate else None),
            "by": by,
        },
    )
    found = await read_flow(pool, namespace)
    if found:
        await ensure_indexes(pool, namespace, found[0])
    return found[0] if found else None


def index_name(queue: str, kind: str) -> str:
    """The name of a flow index of ``queue``: within PostgreSQL's 63 characters whatever the
    namespace (its hash keeps two long names apart)."""
    digest = hashlib.sha1(queue.encode()).hexdigest()[:8]
    return f"tasker_flow_{kind}_{queue[:32]}_{digest}"


def needed_indexes(flow: QueueFlow) -> list[str]:
    """The kinds of index (``queries.FLOW_INDEXES``) a namespace's flow control reads."""
    kinds = []
    if flow.max_running is not None or flow.key_max_running is not None:
        kinds.append("claimed")
    if flow.uses_groups:
        kinds.append("group")
    elif flow.uses_priority or flow.key_max_running is not None:
        kinds.append("priority")
    return kinds


async def ensure_indexes(pool: AsyncConnectionPool, namespace: str, flow: QueueFlow) -> list[str]:
    """Build (concurrently, if missing) the indexes ``flow`` needs on ``namespace``'s queue;
    the names built or found. Best effort: a role that may not build them (a least-privilege
    worker) leaves the claim correct, only slower on a long queue, and says so once here."""
    queue = queue_name(namespace)
    table = pgsql.Identifier("pgmq", "q_" + queue.lower())
    done = []
    for kind in needed_indexes(flow):
        name = index_name(queue, kind)
        statement = pgsql.SQL(queries.FLOW_INDEXES[kind]).format(name=pgsql.Identifier(name), table=table)
        try:
            # The pool's connections are autocommit: outside a transaction, as CONCURRENTLY needs.
            async with pool.connection() as conn:
                invalid = await (await conn.execute(queries.INVALID_INDEX, (name,))).fetchone()
                if invalid is not None:  # a build that failed half-way: start again
                    await conn.execute(
                        pgsql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(pgsql.Identifier("pgmq", name))
                    )
                await conn.execute(statement)
            done.append(name)
        except psycopg.Error as exc:
            log.warning(
                "could not build index %s for the flow control of %s (%s): claims stay correct, but "
                "slower on a long queue; build it as the queue's owner: %s",
                name,
                namespace,
                first_line(exc),
                statement.as_string(None),
            )
    return done


async def _one(pool: AsyncConnectionPool, query: str, params: Any) -> Any:
    try:
        async with pool.connection() as conn:
            row = await (await conn.execute(query, params)).fetchone()
    except (psycopg.errors.RaiseException, psycopg.errors.InvalidParameterValue) as exc:
        raise translate_error(exc) from exc
    return row[0] if row else None


__all__ = ["ensure_indexes", "index_name", "needed_indexes", "pause", "read_flow", "resume", "set_limits"]
