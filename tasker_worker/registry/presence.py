"""WorkerPresence: a running worker's registration, heartbeats and deregistration.

The worker registers before it claims anything (retried with exponential backoff; after
``registration_attempts`` the worker stops with ``RegistrationFailed``), heartbeats every
``heartbeat_interval`` while it runs, and deregisters with its stop reason on the way out.
A heartbeat that fails is logged and retried sooner; it never stops the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import anyio

from tasker_worker.config.models import RegistryConfig
from tasker_worker.db.connection import TRANSIENT_DB_ERRORS
from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerStatus
from tasker_worker.errors import InvalidTransition, RegistrationFailed, WorkerNotFound, first_line
from tasker_worker.registry.commands import RegistryCommands

log = logging.getLogger(__name__)

#: How long one registry call may take before it counts as failed.
CALL_TIMEOUT_S = 10.0


class WorkerPresence:
    """Keeps one worker's row in ``tasker.workers`` true while the worker runs."""

    def __init__(
        self,
        commands: RegistryCommands,
        registration: WorkerRegistration,
        config: RegistryConfig,
        sample: Callable[[], Heartbeat],
    ) -> None:
        self.commands = commands
        self.registration = registration
        self.config = config
        self.sample = sample
        #: The id the registry gave this worker (set by ``register``).
        self.worker_id: str | None = None
        self.heartbeats_sent = 0
        self.heartbeat_failures = 0
        self.last_status: WorkerStatus | None = None

    async def register(self) -> str:
        """Register, retrying transient failures; return the id given."""
        attempts = self.config.registration_attempts
        cap = self.config.registration_max_delay
        for attempt in range(1, attempts + 1):
            try:
                with anyio.fail_after(CALL_TIMEOUT_S):
                    worker_id = await self.commands.register(self.registration, on_conflict="rename")
            except TRANSIENT_DB_ERRORS as exc:
                if attempt == attempts:
                    raise RegistrationFailed(
                        f"could not register worker {self.registration.worker_id or self.registration.name!r} "
                        f"after {attempts} attempts: {first_line(exc)} (is the database reachable? "
                        "[registry] registration_attempts sets the limit)"
                    ) from exc
                delay = backoff_delay(attempt, timedelta(milliseconds=200), cap)
                log.warning(
                    "registration attempt %d/%d failed (%s); retrying in %.2fs",
                    attempt,
                    attempts,
                    first_line(exc),
                    delay,
                )
                await anyio.sleep(delay)
                continue
            if self.registration.worker_id and worker_id != self.registration.worker_id:
                log.warning(
                    "worker id %r is held by a live worker; registered as %r instead",
                    self.registration.worker_id,
                    worker_id,
                )
            self.worker_id = worker_id
            self.last_status = WorkerStatus.PENDING
            return worker_id
        raise AssertionError("unreachable")  # pragma: no cover

    async def beat(self) -> WorkerStatus:
        """Send one heartbeat now. A row that disappeared or was deregistered by an operator
        is registered again under the same id (the worker is still running, after all)."""
        assert self.worker_id is not None, "register() first"
        heartbeat = self.sample()
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                status = await self.commands.heartbeat(self.worker_id, heartbeat)
        except (WorkerNotFound, InvalidTransition):
            log.warning(
                "worker %s was removed or deregistered from outside while running; registering again", self.worker_id
            )
            self.registration = self.registration.model_copy(update={"worker_id": self.worker_id})
            await self.register()
            with anyio.fail_after(CALL_TIMEOUT_S):
                status = await self.commands.heartbeat(self.worker_id, heartbeat)
        self.heartbeats_sent += 1
        self.last_status = status
        return status

    async def run(self) -> None:
        """Heartbeat until cancelled."""
        interval = self.config.heartbeat_interval.total_seconds()
        failures = 0
        while True:
            try:
                await self.beat()
                failures = 0
                delay = interval
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                self.heartbeat_failures += 1
                delay = min(interval, backoff_delay(failures, timedelta(milliseconds=200), timedelta(seconds=5)))
                log.warning("heartbeat of %s failed (%s); retrying in %.2fs", self.worker_id, first_line(exc), delay)
            except Exception:
                # A bug must not stop the worker's steps; it shows in the log and the heartbeat age.
                failures += 1
                self.heartbeat_failures += 1
                delay = interval
                log.exception("heartbeat of %s failed", self.worker_id)
            await anyio.sleep(delay)

    async def deregister(self, reason: str) -> None:
        """Mark this worker deregistered (best effort: a worker that cannot reach the database
        is marked offline by the supervisor instead)."""
        if self.worker_id is None:
            return
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                await self.commands.deregister(self.worker_id, reason)
        except (WorkerNotFound, InvalidTransition) as exc:
            log.info("worker %s not deregistered: %s", self.worker_id, exc)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning(
                "could not deregister %s (%s); the supervisor will mark it offline", self.worker_id, first_line(exc)
            )
