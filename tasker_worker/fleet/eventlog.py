"""The event log: append, replay into the worker projection, compact.

Replay starts from the newest snapshot (if compaction made one) and folds every later worker
event through ``domain.workers.apply_event``. Compaction stores the projection up to a cutoff as
a snapshot and deletes the events up to it in the same transaction, so the log stays bounded
and a replay after compaction gives exactly the state a replay before it gave.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tasker_worker.db import queries
from tasker_worker.domain.workers import WORKER_EVENTS, apply_event, diff_projections, project

AsyncConn = psycopg.AsyncConnection[Any]

#: The advisory lock that keeps two compactions from interleaving.
_COMPACTION_LOCK = 0x7A5C0002


async def append_event(conn: AsyncConn, event_type: str, worker_id: str, data: dict[str, Any], at: datetime) -> None:
    """Append one worker event in the caller's transaction."""
    await conn.execute(queries.APPEND_EVENT, (str(event_type), worker_id, Jsonb(_jsonable(data)), at))


@dataclass
class ReplayReport:
    """What ``events replay`` found."""

    snapshot_event_id: int
    last_event_id: int
    events_applied: int
    workers: dict[str, dict[str, Any]]
    differences: list[dict[str, Any]] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """True when the replayed projection equals the live tables."""
        return not self.differences


async def replay(conn: AsyncConn, *, up_to: int | None = None) -> tuple[int, int, int, dict[str, dict[str, Any]]]:
    """Fold snapshot + worker events up to ``up_to`` (default: all); return
    ``(snapshot_id, last_event_id, applied, projection)``."""
    cur = await conn.execute(queries.LATEST_SNAPSHOT)
    snap = await cur.fetchone()
    snapshot_id = int(snap[0]) if snap else 0
    state: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (snap[1] if snap else {}).items()}
    if up_to is None:
        cur = await conn.execute(queries.MAX_EVENT_ID)
        row = await cur.fetchone()
        up_to = int(row[0]) if row else 0
    applied = 0
    cur = await conn.execute(queries.WORKER_EVENTS_AFTER, (snapshot_id, up_to, [str(e) for e in WORKER_EVENTS]))
    async for _event_id, event_type, worker_id, data in cur:
        apply_event(state, event_type, worker_id, data or {})
        applied += 1
    return snapshot_id, max(up_to, snapshot_id), applied, state


async def replay_and_compare(pool: AsyncConnectionPool) -> ReplayReport:
    """Replay the log and compare it with ``tasker.workers`` in one consistent snapshot."""
    async with pool.connection() as conn:
        async with conn.transaction():
            # REPEATABLE READ: the log and the live rows are read as of one moment.
            await conn.execute(queries.CONSISTENT_READ)
            snapshot_id, last_id, applied, state = await replay(conn)
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(queries.LIVE_PROJECTION)
            live = {row["worker_id"]: project(row) for row in await cur.fetchall()}
    return ReplayReport(snapshot_id, last_id, applied, state, diff_projections(state, live))


async def compact(pool: AsyncConnectionPool, older_than: datetime) -> int:
    """Snapshot the projection up to the newest event older than ``older_than`` and delete
    every event up to it (step events included). Returns the number of events deleted."""
    async with pool.connection() as conn, conn.transaction():
        cur = await conn.execute(queries.TRY_COMPACTION_LOCK, (_COMPACTION_LOCK,))
        row = await cur.fetchone()
        if not row or not row[0]:
            return 0
        cur = await conn.execute(queries.COMPACTION_CUTOFF, (older_than,))
        row = await cur.fetchone()
        cutoff = int(row[0]) if row else 0
        cur = await conn.execute(queries.LATEST_SNAPSHOT)
        snap = await cur.fetchone()
        if cutoff <= (int(snap[0]) if snap else 0):
            return 0
        _, _, _, state = await replay(conn, up_to=cutoff)
        await conn.execute(queries.INSERT_SNAPSHOT, (cutoff, Jsonb(state)))
        cur = await conn.execute(queries.DELETE_EVENTS_UPTO, (cutoff,))
        deleted = cur.rowcount
        await conn.execute(queries.DELETE_OLD_SNAPSHOTS, (cutoff,))
        return deleted


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value
