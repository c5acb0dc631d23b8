"""Supervision jobs: the periodic sweeps that move workers through their lifecycle.

Each job reads its candidates, then moves each one in its own short transaction through
``WorkerLifecycle.transition(only_from=...)``, so a worker that changed meanwhile (it
deregistered, another sweep got there first) is skipped, never forced. Only the fleet's leader
runs them (``fleet.leader``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from tasker_worker.config.models import EventsConfig, RegistryConfig, RetentionConfig
from tasker_worker.db import flow, queries
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.workers import WorkerStatus
from tasker_worker.errors import WorkerNotFound
from tasker_worker.fleet import eventlog, retention
from tasker_worker.fleet.lifecycle import WorkerLifecycle

log = logging.getLogger(__name__)

#: Workers one sweep handles at most; the rest wait for the next run.
SWEEP_LIMIT = 1000


@dataclass(frozen=True)
class Job:
    """A named sweep and how often it runs."""

    name: str
    interval: timedelta
    run: Callable[[], Awaitable[int]]


class SupervisionJobs:
    """The sweeps, bound to one registry and one clock."""

    def __init__(
        self,
        lifecycle: WorkerLifecycle,
        config: RegistryConfig,
        events_config: EventsConfig,
        retention_config: RetentionConfig | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.config = config
        self.events_config = events_config
        self.retention_config = retention_config or RetentionConfig()
        #: The flow indexes known to exist (built, or found): not asked for again.
        self._flow_indexes: set[str] = set()

    def jobs(self) -> list[Job]:
        """Every job with its configured interval."""
        return [
            Job("activate_pending", self.config.activate_interval, self.activate_pending),
            Job("mark_stale_offline", self.config.stale_check_interval, self.mark_stale_offline),
            Job("reactivate_offline", self.config.reactivate_interval, self.reactivate_offline),
            Job("compact_events", self.events_config.compaction_interval, self.compact_events),
            Job("flow_indexes", self.config.reactivate_interval, self.flow_indexes),
            *(
                [Job("prune_history", self.retention_config.interval, self.prune_history)]
                if self.retention_config.enabled
                else []
            ),
        ]

    def cluster_jobs(self) -> list[Job]:
        """The jobs about a cluster's own tables, for a cluster that holds namespaces but not the
        registry (``[queues.namespaces.<ns>] database``): its events, its flow indexes, and its
        outcome rows, step keys and progress past ``[retention]``."""
        return [
            Job("compact_events", self.events_config.compaction_interval, self.compact_events),
            Job("flow_indexes", self.config.reactivate_interval, self.flow_indexes),
            *(
                [Job("prune_outcomes", self.retention_config.interval, self.prune_outcomes)]
                if self.retention_config.enabled
                else []
            ),
        ]

    async def _candidates(self, query: str, params: tuple[object, ...]) -> list[str]:
        async with self.lifecycle.pool.connection() as conn:
            cur = await conn.execute(query, params)
            return [row[0] for row in await cur.fetchall()]

    async def _move(self, worker_ids: list[str], target: WorkerStatus, only_from: tuple[WorkerStatus, ...]) -> int:
        moved = 0
        for worker_id in worker_ids:
            try:
                if await self.lifecycle.transition(worker_id, target, only_from=only_from):
                    moved += 1
            except WorkerNotFound:
                continue  # deleted meanwhile
        return moved

    async def activate_pending(self) -> int:
        """pending -> active for workers that have heartbeated."""
        ids = await self._candidates(queries.PENDING_WITH_HEARTBEAT, (SWEEP_LIMIT,))
        return await self._move(ids, WorkerStatus.ACTIVE, (WorkerStatus.PENDING,))

    async def mark_stale_offline(self) -> int:
        """pending/active -> offline when no heartbeat came within ``stale_timeout``."""
        now = self.lifecycle.clock.now()
        ids = await self._candidates(
            queries.STALE_WORKERS, (now, self.config.stale_timeout.total_seconds(), SWEEP_LIMIT)
        )
        return await self._move(ids, WorkerStatus.OFFLINE, (WorkerStatus.PENDING, WorkerStatus.ACTIVE))

    async def reactivate_offline(self) -> int:
        """offline -> active when heartbeats resumed (a fresh one after going offline)."""
        now = self.lifecycle.clock.now()
        ids = await self._candidates(
            queries.REVIVED_WORKERS, (now, self.config.stale_timeout.total_seconds(), SWEEP_LIMIT)
        )
        return await self._move(ids, WorkerStatus.ACTIVE, (WorkerStatus.OFFLINE,))

    async def compact_events(self) -> int:
        """Fold events older than the retention into a snapshot and delete them."""
        cutoff = self.lifecycle.clock.now() - self.events_config.retention
        return await eventlog.compact(self.lifecycle.pool, cutoff)

    async def prune_history(self) -> int:
        """Delete outcome and heartbeat rows past ``[retention]`` (in bounded batches)."""
        now = self.lifecycle.clock.now()
        pool = self.lifecycle.pool
        return await retention.prune_outcomes(pool, self.retention_config, now) + await retention.prune_heartbeats(
            pool, self.retention_config, now
        )

    async def prune_outcomes(self) -> int:
        """Delete outcome rows (and step keys, progress, cancel requests) past ``[retention]``."""
        return await retention.prune_outcomes(self.lifecycle.pool, self.retention_config, self.lifecycle.clock.now())

    async def flow_indexes(self) -> int:
        """Build the indexes a namespace's flow control came to need (its steps began to carry
        priorities or groups: the worker that saw the first one said so); how many were built."""
        pool = self.lifecycle.pool
        built = 0
        for found in await flow.read_flow(pool):
            wanted = {flow.index_name(queue_name(found.namespace), k) for k in flow.needed_indexes(found)}
            if wanted <= self._flow_indexes:
                continue
            done = await flow.ensure_indexes(pool, found.namespace, found)
            built += len(set(done) - self._flow_indexes)
            self._flow_indexes.update(done)
        return built
