"""Registry commands: everything that changes a worker's state.

Each command is one transaction that locks the worker's row, checks the transition against the
lifecycle in ``domain.workers``, writes the change and appends its event, so the live tables and
the event log can never disagree. Reads live in ``fleet.views``; the periodic supervision
jobs in ``fleet.supervision``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, Literal

from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tasker_worker.db import queries
from tasker_worker.domain.clock import Clock, SystemClock
from tasker_worker.domain.workers import (
    LIVE_STATUSES,
    Heartbeat,
    WorkerEventType,
    WorkerRegistration,
    WorkerStatus,
    check_transition,
)
from tasker_worker.errors import HeartbeatFailed, WorkerConflict, WorkerNotFound
from tasker_worker.fleet.eventlog import AsyncConn, append_event

#: Attempts at finding a free id when the requested one is held by a live worker.
_RENAME_ATTEMPTS = 5


class WorkerLifecycle:
    """Register, heartbeat, deregister and move workers through their lifecycle."""

    def __init__(self, pool: AsyncConnectionPool, clock: Clock | None = None, *, heartbeat_history: int = 100) -> None:
        self.pool = pool
        self.clock = clock or SystemClock()
        self.heartbeat_history = heartbeat_history

    async def register(
        self, registration: WorkerRegistration, *, on_conflict: Literal["rename", "error"] = "rename"
    ) -> str:
        """Register a worker (status ``pending``) and return the id it was given.

        A requested id held by a live worker (pending or active) is refused with
        ``WorkerConflict`` (``on_conflict="error"``, the API) or replaced by a unique variant
        (``"rename"``, a starting worker, which reports the id it got). An id whose worker is
        offline or deregistered is taken over: the row starts a new life as ``pending``.
        """
        requested = registration.worker_id or _generated_id(registration)
        candidate = requested
        for attempt in range(_RENAME_ATTEMPTS):
            async with self.pool.connection() as conn, conn.transaction():
                # Serialises registrations of one id, including one whose row does not exist yet.
                await conn.execute(queries.LOCK_WORKER_ID, (candidate,))
                current = await _lock(conn, candidate)
                if current is not None and current[0] in LIVE_STATUSES:
                    if on_conflict == "error":
                        raise WorkerConflict(candidate, current[0].value)
                    candidate = f"{requested}-{uuid.uuid4().hex[:8]}"
                    continue
                at = self.clock.now()
                row = registration.model_dump()
                row.update(worker_id=candidate, at=at)
                await conn.execute(queries.INSERT_WORKER, row)
                data = registration.model_dump(exclude={"worker_id"})
                if candidate != requested:
                    data["requested_id"] = requested
                data["attempt"] = attempt + 1
                await append_event(conn, WorkerEventType.WORKER_REGISTERED, candidate, data, at)
                return candidate
        raise WorkerConflict(requested, "pending or active (no free variant found)")

    async def heartbeat(self, worker_id: str, heartbeat: Heartbeat) -> WorkerStatus:
        """Record a heartbeat; return the worker's status.

        A change of the ``busy`` flag is appended as WorkerBusy. The status itself is the
        supervisor's to change (pending -> active once it sees this heartbeat).
        """
        status, _ = await self.heartbeat_and_peers(worker_id, heartbeat)
        return status

    async def heartbeat_and_peers(
        self,
        worker_id: str,
        heartbeat: Heartbeat,
        namespaces: Sequence[str] = (),
        stale_after: timedelta | None = None,
    ) -> tuple[WorkerStatus, dict[str, list[str]]]:
        """``heartbeat``, and in the same transaction the live listening workers of each of
        ``namespaces`` (heartbeat within ``stale_after``)."""
        async with self.pool.connection() as conn, conn.transaction():
            current = await _lock(conn, worker_id)
            if current is None:
                raise WorkerNotFound(worker_id)
            status, was_busy = current
            if status is WorkerStatus.DEREGISTERED:
                raise HeartbeatFailed(worker_id, status.value)
            at = self.clock.now()
            row: dict[str, Any] = heartbeat.model_dump(exclude={"stats"})
            row.update(
                worker_id=worker_id,
                at=at,
                stats=Jsonb(heartbeat.stats) if heartbeat.stats is not None else None,
                keep=self.heartbeat_history,
            )
            await conn.execute(queries.RECORD_HEARTBEAT, row)
            await conn.execute(queries.INSERT_HEARTBEAT, row)
            await conn.execute(queries.TRIM_HEARTBEATS, row)
            if heartbeat.busy != was_busy:
                await append_event(
                    conn,
                    WorkerEventType.WORKER_BUSY,
                    worker_id,
                    {"busy": heartbeat.busy, "active_steps": heartbeat.active_steps},
                    at,
                )
            peers = await _listening_peers(conn, namespaces, stale_after, at) if namespaces else {}
            return status, peers

    async def listening_peers(
        self, namespaces: Sequence[str], stale_after: timedelta | None = None
    ) -> dict[str, list[str]]:
        """The live listening workers of each of ``namespaces`` (heartbeat within ``stale_after``)."""
        async with self.pool.connection() as conn:
            return await _listening_peers(conn, namespaces, stale_after, self.clock.now())

    async def deregister(self, worker_id: str, reason: str, final: Heartbeat | None = None) -> None:
        """Mark a worker ``deregistered`` (graceful shutdown) with the reason; with ``final``,
        its last statistics go into the row in the same transaction, so that the registry shows
        what the worker did, not what it had done at its last heartbeat."""
        await self.transition(worker_id, WorkerStatus.DEREGISTERED, reason=reason, final=final)

    async def request_mode(self, mode: str, *, worker_id: str | None = None, namespace: str | None = None) -> list[str]:
        """Ask live workers (one, those of a namespace, or all) to switch deployment mode;
        return the ids asked. Listening workers act at once, the others at their next control
        check (every heartbeat interval)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(queries.REQUEST_MODE, (mode, worker_id, namespace))
            return [str(r[0]) for r in await cur.fetchall()]

    async def requested_mode(self, worker_id: str) -> str | None:
        """The mode requested for ``worker_id`` and not applied yet."""
        async with self.pool.connection() as conn:
            row = await (await conn.execute(queries.REQUESTED_MODE, (worker_id,))).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    async def mode_changed(self, worker_id: str, old: str, new: str, *, source: str) -> None:
        """Record that a worker now runs ``new``: the row, the request cleared and a
        DeploymentModeChanged event, in one transaction."""
        async with self.pool.connection() as conn, conn.transaction():
            if await _lock(conn, worker_id) is None:
                raise WorkerNotFound(worker_id)
            await conn.execute(queries.APPLY_MODE, {"to": new, "worker_id": worker_id})
            data = {"from": old, "to": new, "source": source}
            await append_event(conn, WorkerEventType.DEPLOYMENT_MODE_CHANGED, worker_id, data, self.clock.now())

    async def clear_requested_mode(self, worker_id: str, mode: str) -> None:
        """Drop a request for ``mode`` the worker has answered without a change (it already ran
        that mode, or cannot run it and said why in its log); a newer request stays."""
        async with self.pool.connection() as conn:
            await conn.execute(queries.CLEAR_REQUESTED_MODE, (worker_id, mode))

    async def transition(
        self,
        worker_id: str,
        target: WorkerStatus,
        *,
        reason: str | None = None,
        only_from: tuple[WorkerStatus, ...] | None = None,
        final: Heartbeat | None = None,
    ) -> bool:
        """Move a worker to ``target`` and append the matching event.

        ``only_from`` makes the move conditional (a supervision job that raced with another
        change skips the worker and returns False instead of failing). Without it a transition
        the lifecycle forbids raises ``InvalidTransition``.
        """
        async with self.pool.connection() as conn, conn.transaction():
            current = await _lock(conn, worker_id)
            if current is None:
                raise WorkerNotFound(worker_id)
            status = current[0]
            if only_from is not None and status not in only_from:
                return False
            check_transition(worker_id, status, target)
            at = self.clock.now()
            if final is not None:
                row: dict[str, Any] = final.model_dump(exclude={"stats"})
                row.update(worker_id=worker_id, stats=Jsonb(final.stats) if final.stats is not None else None)
                await conn.execute(queries.RECORD_FINAL_STATS, row)
            await conn.execute(
                queries.SET_WORKER_STATUS,
                {"worker_id": worker_id, "status": target.value, "at": at, "reason": reason},
            )
            data: dict[str, Any] = {"from": status.value}
            if reason is not None:
                data["reason"] = reason
            await append_event(conn, _EVENT_OF_STATUS[target], worker_id, data, at)
            return True


_EVENT_OF_STATUS = {
    WorkerStatus.ACTIVE: WorkerEventType.WORKER_READY,
    WorkerStatus.OFFLINE: WorkerEventType.WORKER_OFFLINE,
    WorkerStatus.DEREGISTERED: WorkerEventType.WORKER_DEREGISTERED,
}


async def _lock(conn: AsyncConn, worker_id: str) -> tuple[WorkerStatus, bool] | None:
    cur = await conn.execute(queries.LOCK_WORKER, (worker_id,))
    row = await cur.fetchone()
    if row is None:
        return None
    return WorkerStatus(row[0]), bool(row[1])


def _generated_id(registration: WorkerRegistration) -> str:
    return f"{registration.name}-{registration.hostname}-{registration.pid}-{uuid.uuid4().hex[:6]}"


async def _listening_peers(
    conn: AsyncConn, namespaces: Sequence[str], stale_after: timedelta | None, at: Any
) -> dict[str, list[str]]:
    cur = await conn.execute(
        queries.LISTENING_PEERS,
        {
            "at": at,
            "stale_s": (stale_after or timedelta(minutes=2)).total_seconds(),
            "namespaces": list(namespaces),
        },
    )
    return {str(r[0]): list(r[1]) for r in await cur.fetchall()}
