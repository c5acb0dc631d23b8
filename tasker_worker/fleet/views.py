"""Registry queries: read the fleet's state (nothing here writes)."""

from __future__ import annotations

import builtins
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from tasker_worker.db import queries
from tasker_worker.domain.workers import WorkerStatus, WorkerView
from tasker_worker.errors import WorkerNotFound

#: Upper bound of every list this module returns.
MAX_ROWS = 10_000


class FleetViews:
    """Read-only views of ``tasker.workers`` and its heartbeats."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    async def _rows(self, query: str, params: Any) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query, params)
            return await cur.fetchall()

    async def get(self, worker_id: str) -> WorkerView:
        """One worker; ``WorkerNotFound`` when the id is unknown."""
        rows = await self._rows(queries.GET_WORKER, (worker_id,))
        if not rows:
            raise WorkerNotFound(worker_id)
        return WorkerView.model_validate(rows[0])

    async def list(
        self, status: WorkerStatus | None = None, *, include_deregistered: bool = False, limit: int = 1000
    ) -> builtins.list[WorkerView]:
        """Workers, newest first; deregistered ones only when asked for."""
        params = {
            "status": status.value if status else None,
            "include_deregistered": include_deregistered,
            "limit": _bounded(limit),
        }
        return [WorkerView.model_validate(r) for r in await self._rows(queries.LIST_WORKERS, params)]

    async def live(self, *, limit: int = 1000) -> builtins.list[WorkerView]:
        """Pending and active workers (the ones believed to run), newest first."""
        return [
            WorkerView.model_validate(r) for r in await self._rows(queries.LIVE_WORKERS, {"limit": _bounded(limit)})
        ]

    async def healthy(self, at: datetime, stale_timeout: timedelta, *, limit: int = 1000) -> builtins.list[WorkerView]:
        """Active workers whose last heartbeat is within ``stale_timeout`` of ``at``."""
        params = {"at": at, "stale_s": stale_timeout.total_seconds(), "limit": _bounded(limit)}
        return [WorkerView.model_validate(r) for r in await self._rows(queries.HEALTHY_WORKERS, params)]

    async def heartbeats(self, worker_id: str, *, limit: int = 100) -> builtins.list[dict[str, Any]]:
        """The newest heartbeats of one worker (``WorkerNotFound`` for an unknown id)."""
        await self.get(worker_id)
        return await self._rows(queries.LIST_HEARTBEATS, (worker_id, _bounded(limit)))

    async def timeline(self, worker_id: str, *, limit: int = 50) -> builtins.list[dict[str, Any]]:
        """A worker's own events (registration, states, modes, supervision), newest first."""
        return await self._rows(queries.WORKER_TIMELINE, (worker_id, _bounded(limit)))

    async def stats(self) -> dict[str, Any]:
        """Counts by status, cores and memory of the live fleet, and throughput (steps/s, last minute)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries.WORKER_STATUS_COUNTS)
            rows = await cur.fetchall()
            cur = await conn.execute(queries.FLEET_THROUGHPUT)
            throughput_row = await cur.fetchone()
        by_status = dict.fromkeys((s.value for s in WorkerStatus), 0)
        cores = memory = active_steps = memory_used = 0
        cpu_percent = 0.0
        for status, count, status_cores, status_memory, steps, status_cpu, status_used in rows:
            by_status[status] = int(count)
            if status in ("pending", "active"):
                cores += int(status_cores)
                memory += int(status_memory)
                active_steps += int(steps)
                cpu_percent += float(status_cpu)
                memory_used += int(status_used)
        return {
            "by_status": by_status,
            "total": sum(by_status.values()),
            "live_cpu_cores": cores,
            "live_memory_total": memory,
            # As of each worker's last heartbeat. Workers sharing a host each count its cores and
            # memory, so these are each worker's share of its host, summed.
            "live_cpu_percent": round(cpu_percent, 2),
            "live_memory_used": memory_used,
            "cpu_utilization": round(cpu_percent / (100.0 * cores), 4) if cores else 0.0,
            "memory_utilization": round(memory_used / memory, 4) if memory else 0.0,
            "active_steps": active_steps,
            "throughput_per_s": round(float(throughput_row[0]), 3) if throughput_row else 0.0,
        }


def _bounded(limit: int) -> int:
    return max(1, min(int(limit), MAX_ROWS))
