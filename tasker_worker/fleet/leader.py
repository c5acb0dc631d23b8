"""LeaderElection: leader election for the supervision jobs.

Every candidate process (each ``run`` worker with ``supervision_enabled``, and ``api``) keeps
one dedicated connection and tries ``pg_try_advisory_lock(SUPERVISION_LOCK)`` on it every tick.
The one that holds the lock is the leader and runs the jobs that are due. The lock belongs to
the leader's session, so when the leader dies -- even by SIGKILL -- the server drops the lock
with the connection and another candidate takes it on its next tick, within one interval.
A leader whose connection breaks stops acting as leader before it reconnects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import anyio
import psycopg

from tasker_worker.db import queries
from tasker_worker.db.connection import connect
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff
from tasker_worker.fleet.supervision import Job

log = logging.getLogger(__name__)

#: The advisory lock key that makes a process the supervision leader.
SUPERVISION_LOCK = 0x7A5C0001

#: The longest a candidate waits between two lock attempts, whatever the job intervals.
MAX_TICK = timedelta(seconds=30)


class LeaderElection:
    """Runs ``jobs`` while this process is the fleet's leader."""

    def __init__(self, url: str, jobs: Sequence[Job], *, candidate_id: str) -> None:
        self.url = url
        self.jobs = list(jobs)
        self.candidate_id = candidate_id
        self.is_leader = False
        self.terms = 0  # how many times this process became leader
        self.runs: dict[str, int] = {job.name: 0 for job in self.jobs}
        self.last_error: str | None = None
        shortest = min((j.interval for j in self.jobs), default=MAX_TICK)
        self.tick = min(shortest, MAX_TICK).total_seconds()
        self._next_due: dict[str, float] = {}
        self.became_leader = anyio.Event()

    @property
    def application_name(self) -> str:
        """How the lock's session shows in ``pg_stat_activity``."""
        return f"tasker-supervisor:{self.candidate_id}"

    async def run(self) -> None:
        """Campaign, and lead when elected, until cancelled."""
        backoff = Backoff(timedelta(milliseconds=200), timedelta(seconds=self.tick))
        while True:
            try:
                conn = await connect(self.url, application_name=self.application_name)
            except TRANSIENT_DB_ERRORS as exc:
                self.last_error = str(exc)
                delay = backoff.failed()
                log.warning("supervision candidate cannot connect (%s); retrying in %.2fs", exc, delay)
                await anyio.sleep(delay)
                continue
            try:
                backoff.succeeded()
                await self._campaign(conn)
            except TRANSIENT_DB_ERRORS as exc:
                self._step_down(f"lost the supervision connection: {exc}")
                await anyio.sleep(backoff.failed())
            finally:
                self._step_down(None)
                with anyio.CancelScope(shield=True):
                    await conn.close()

    async def _campaign(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            if not self.is_leader:
                cur = await conn.execute(queries.TRY_LEADER_LOCK, (SUPERVISION_LOCK,))
                row = await cur.fetchone()
                if row and row[0]:
                    self.is_leader = True
                    self.terms += 1
                    self._next_due = {}
                    log.info("%s is now the supervision leader", self.candidate_id)
                    self.became_leader.set()
            else:
                # The round trip proves the session (and so the lock) is still there.
                await conn.execute(queries.PING)
            if self.is_leader:
                await self.run_due_jobs()
            await anyio.sleep(self.tick)

    async def run_due_jobs(self) -> None:
        """Run every job whose interval has passed since its last run."""
        for job in self.jobs:
            now = time.monotonic()
            if self._next_due.get(job.name, 0.0) > now:
                continue
            self._next_due[job.name] = now + job.interval.total_seconds()
            try:
                with anyio.fail_after(max(30.0, job.interval.total_seconds())):
                    changed = await job.run()
                self.runs[job.name] += 1
                if changed:
                    log.info("supervision job %s changed %d workers", job.name, changed)
            except Exception as exc:  # one failing job must not stop the others or the leader
                self.last_error = f"{job.name}: {exc}"
                log.warning("supervision job %s failed: %s", job.name, exc)

    def _step_down(self, reason: str | None) -> None:
        if self.is_leader:
            self.is_leader = False
            self.became_leader = anyio.Event()
            if reason:
                self.last_error = reason
                log.warning("%s stepped down as supervision leader: %s", self.candidate_id, reason)

    def status(self) -> dict[str, object]:
        """Leadership and job counters."""
        return {
            "candidate_id": self.candidate_id,
            "leader": self.is_leader,
            "terms": self.terms,
            "runs": dict(self.runs),
            "last_error": self.last_error,
        }
