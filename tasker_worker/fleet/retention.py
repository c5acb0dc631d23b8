"""Retention: the maintenance job that keeps history bounded (River's cleaner, Oban's pruner).

Run by the fleet's elected supervisor (``supervision.SupervisionJobs``). Outcome rows older than
``[retention] outcomes`` (per namespace where configured) and heartbeat rows older than
``[retention] heartbeats`` are deleted in batches of ``batch_size`` rows, each batch its own
short transaction with a pause after it, so the job never holds many locks or a long snapshot
and the step path keeps its pace while it runs. A run stops after ``MAX_BATCHES_PER_RUN``
batches per group; the next run goes on.

The outcome horizon is also the dedup horizon: a step re-sent after its outcome row is gone
runs again (the configuration refuses a horizon shorter than ``TaskerConfig.retry_horizon``).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

import anyio
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import RetentionConfig
from tasker_worker.db import queries

log = logging.getLogger(__name__)

#: At most this many batches per group and run (the rest waits for the next run).
MAX_BATCHES_PER_RUN = 200
#: Pause after each full batch: the pruner takes turns with the step path, never the server.
BATCH_PAUSE_S = 0.02


async def prune_outcomes(pool: AsyncConnectionPool, config: RetentionConfig, now: datetime) -> int:
    """Delete outcome rows past their namespace's horizon; return how many."""
    overridden = sorted(config.namespaces)
    groups: list[tuple[list[str], list[str], timedelta]] = [([], overridden, config.outcomes)]
    groups += [([ns], [], config.outcomes_for(ns)) for ns in overridden]
    deleted = 0
    for only, others, keep in groups:
        params = {"cutoff": now - keep, "only": only, "others": others, "batch": config.batch_size}
        deleted += await _in_batches(pool, queries.PRUNE_OUTCOMES, params, config.batch_size)
    if deleted:
        log.info("retention: deleted %d outcome rows", deleted)
    # A step_uuid is answered as already sent (tasker.enqueue_step) for as long as any outcome
    # horizon: after that a re-send is a new step, as after its outcome row is gone.
    longest = max([config.outcomes, *(config.outcomes_for(ns) for ns in overridden)])
    params = {"cutoff": now - longest, "batch": config.batch_size}
    await _in_batches(pool, queries.PRUNE_STEP_KEYS, params, config.batch_size)
    await _in_batches(pool, queries.PRUNE_STEP_PROGRESS, params, config.batch_size)
    await _in_batches(pool, queries.PRUNE_CANCELLATIONS, params, config.batch_size)
    await _in_batches(pool, queries.PRUNE_UNIQUE_KEYS, {"batch": config.batch_size}, config.batch_size)
    return deleted


async def prune_heartbeats(pool: AsyncConnectionPool, config: RetentionConfig, now: datetime) -> int:
    """Delete heartbeat rows older than ``[retention] heartbeats``; return how many."""
    params = {"cutoff": now - config.heartbeats, "batch": config.batch_size}
    return await _in_batches(pool, queries.PRUNE_HEARTBEATS, params, config.batch_size)


async def _in_batches(pool: AsyncConnectionPool, statement: str, params: dict[str, object], batch: int) -> int:
    deleted = 0
    for _ in range(MAX_BATCHES_PER_RUN):
        async with pool.connection() as conn:
            cur = await conn.execute(statement, params)
            n = cur.rowcount
        deleted += n
        if n < batch:
            break
        await anyio.sleep(BATCH_PAUSE_S)
    return deleted
