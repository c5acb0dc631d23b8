"""Retention: the maintenance job that keeps history bounded (River's cleaner, Oban's pruner).

Run by the fleet's elected supervisor (``supervision.SupervisionJobs``). ``tasker.step_results``
is partitioned by the time in each step's step_uuid, one partition per UTC day (migration 0021):

- ``ensure_partitions`` creates today's partition and ``[retention] partitions_ahead`` days more
  (a step_uuid whose day has none lands in the default partition: no settle fails for want of
  one, and creating the day moves such rows in);
- ``prune_outcomes`` drops each day partition whole once nothing in it can still be needed
  (``tasker.drop_history_partition`` checks: its day ended before the longest outcome horizon,
  every row in it finished before it, and no worker queue holds a message of a step of that
  day, whose outcome row would be its dedup). Rows of the unstamped partition (step_uuids that
  are no UUIDv7, and every row from before 0021) and of the default partition, and rows of a
  namespace whose horizon is shorter than the longest anywhere, are deleted as before: in
  batches of ``batch_size`` rows, each batch its own short transaction with a pause after it,
  so the job never holds many locks or a long snapshot and the step path keeps its pace. A run
  stops after ``MAX_BATCHES_PER_RUN`` batches per group and partition; the next run goes on.

Heartbeat rows older than ``[retention] heartbeats`` are deleted in batches the same way.

The outcome horizon is also the dedup horizon: a step re-sent after its outcome row is gone
runs again (the configuration refuses a horizon shorter than ``TaskerConfig.retry_horizon``;
a day partition also stays while a queued message of its day could still need it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio
from psycopg import sql as pgsql
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import RetentionConfig
from tasker_worker.db import queries

log = logging.getLogger(__name__)

#: At most this many batches per group and run (the rest waits for the next run).
MAX_BATCHES_PER_RUN = 200
#: Pause after each full batch: the pruner takes turns with the step path, never the server.
BATCH_PAUSE_S = 0.02
#: The longest a partition change (creating a day, dropping one) waits for the table's
#: exclusive lock, which it then holds for a moment: past it the change is left to the next
#: run, and the step path queued behind it goes on.
PARTITION_LOCK_TIMEOUT_MS = 500


@dataclass(frozen=True)
class HistoryPartition:
    """One partition of ``tasker.step_results`` (``tasker.history_partitions()``)."""

    name: str
    #: 'unstamped', 'default' or 'day'.
    kind: str
    from_time: datetime | None
    to_time: datetime | None
    estimated_rows: int


async def history_partitions(pool: AsyncConnectionPool) -> list[HistoryPartition]:
    """The partitions of ``tasker.step_results``, oldest first."""
    async with pool.connection() as conn:
        rows = await (await conn.execute(queries.HISTORY_PARTITIONS)).fetchall()
    return [HistoryPartition(*row) for row in rows]


async def ensure_partitions(pool: AsyncConnectionPool, config: RetentionConfig, now: datetime) -> list[str]:
    """Create the day partitions of today and ``partitions_ahead`` days after it that are
    missing (each its own transaction); return the days created (``YYYY-MM-DD``)."""
    today = now.astimezone(UTC).date()
    created = []
    for ahead in range(config.partitions_ahead + 1):
        day = today + timedelta(days=ahead)
        async with pool.connection() as conn:
            row = await (
                await conn.execute(queries.CREATE_HISTORY_PARTITION, (day, PARTITION_LOCK_TIMEOUT_MS))
            ).fetchone()
        if row and row[0]:
            created.append(day.isoformat())
    if created:
        log.info("history: created the partitions of %s", ", ".join(created))
    return created


async def prune_outcomes(pool: AsyncConnectionPool, config: RetentionConfig, now: datetime) -> int:
    """Drop the day partitions past the longest horizon and delete the outcome rows past their
    namespace's horizon elsewhere; return how many rows went (a dropped partition counted by
    its estimate)."""
    overridden = sorted(config.namespaces)
    groups: list[tuple[list[str], list[str], timedelta]] = [([], overridden, config.outcomes)]
    groups += [([ns], [], config.outcomes_for(ns)) for ns in overridden]
    # A day partition holds every namespace's rows: it goes when the longest horizon has passed.
    longest = max(keep for _, _, keep in groups)
    deleted = 0
    for part in await history_partitions(pool):
        if part.kind != "day" or part.to_time is None or part.to_time > now - longest:
            continue
        async with pool.connection() as conn:
            row = await (
                await conn.execute(
                    queries.DROP_HISTORY_PARTITION, (part.name, now - longest, PARTITION_LOCK_TIMEOUT_MS)
                )
            ).fetchone()
        answer = row[0] if row else None
        if answer == "dropped":
            deleted += part.estimated_rows
            log.info("retention: dropped history partition %s (about %d rows)", part.name, part.estimated_rows)
        else:
            log.info("retention: history partition %s kept for now: %s", part.name, answer)
    for part in await history_partitions(pool):
        statement = pgsql.SQL(queries.PRUNE_OUTCOMES).format(partition=pgsql.Identifier("tasker", part.name))
        for only, others, keep in groups:
            if part.kind == "day" and keep >= longest:
                continue  # dropped whole when its day is past the horizon
            params = {"cutoff": now - keep, "only": only, "others": others, "batch": config.batch_size}
            deleted += await _in_batches(pool, statement, params, config.batch_size)
    if deleted:
        log.info("retention: removed %d outcome rows", deleted)
    # A step_uuid is answered as already sent (tasker.enqueue_step) for as long as any outcome
    # horizon: after that a re-send is a new step, as after its outcome row is gone.
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


async def _in_batches(
    pool: AsyncConnectionPool, statement: str | pgsql.Composed, params: dict[str, object], batch: int
) -> int:
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
