"""WorkerPresence: a running worker's registration, heartbeats and deregistration.

The worker registers before it claims anything (retried with exponential backoff; after
``registration_attempts`` the worker stops with ``RegistrationFailed``), heartbeats every
``heartbeat_interval`` while it runs, and deregisters with its stop reason on the way out.
A heartbeat that fails is logged and retried sooner; it never stops the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import anyio

from tasker_worker.config.models import RegistryConfig
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff, retry_transient
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerStatus
from tasker_worker.errors import HeartbeatFailed, InvalidTransition, RegistrationFailed, WorkerNotFound, first_line
from tasker_worker.fleet.lifecycle import WorkerLifecycle

log = logging.getLogger(__name__)

#: How long one registry call may take before it counts as failed.
CALL_TIMEOUT_S = 10.0


class WorkerPresence:
    """Keeps one worker's row in ``tasker.workers`` true while the worker runs."""

    def __init__(
        self,
        lifecycle: WorkerLifecycle,
        describe: Callable[[], WorkerRegistration],
        config: RegistryConfig,
        sample: Callable[[], Heartbeat],
        *,
        peers_of: Sequence[str] = (),
        on_peers: Callable[[Mapping[str, list[str]]], None] | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        #: With each heartbeat, the live listening workers of these namespaces go to
        #: ``on_peers`` (the claim ranking of ``domain.herd``).
        self.peers_of = list(peers_of) if on_peers is not None else []
        self.on_peers = on_peers
        #: What to register: asked at each (re-)registration, so that it says the mode the
        #: worker runs then, not the one it started with.
        self.describe = describe
        self.config = config
        self.sample = sample
        #: The id the registry gave this worker (set by ``register``).
        self.worker_id: str | None = None
        self.heartbeats_sent = 0
        self.heartbeat_failures = 0
        self.last_status: WorkerStatus | None = None

    def follow_peers(self, namespaces: Sequence[str], on_peers: Callable[[Mapping[str, list[str]]], None]) -> None:
        """With each heartbeat, hand the live listening workers of ``namespaces`` to ``on_peers``
        (the claim ranking, which needs this worker's registered id first)."""
        self.peers_of = list(namespaces)
        self.on_peers = on_peers

    async def register(self) -> str:
        """Register, retrying transient failures; return the id given."""
        attempts = self.config.registration_attempts
        registration = self.describe()
        if self.worker_id is not None:  # registering again: under the id it already had
            registration = registration.model_copy(update={"worker_id": self.worker_id})

        async def once() -> str:
            with anyio.fail_after(CALL_TIMEOUT_S):
                return await self.lifecycle.register(registration, on_conflict="rename")

        backoff = Backoff(timedelta(milliseconds=200), self.config.registration_max_delay)
        try:
            worker_id = await retry_transient(once, what="registration", backoff=backoff, attempts=attempts)
        except TRANSIENT_DB_ERRORS as exc:
            raise RegistrationFailed(
                f"could not register worker {registration.worker_id or registration.name!r} "
                f"after {attempts} attempts: {first_line(exc)} (is the database reachable? "
                "[registry] registration_attempts sets the limit)"
            ) from exc
        if registration.worker_id and worker_id != registration.worker_id:
            log.warning(
                "worker id %r is held by a live worker; registered as %r instead", registration.worker_id, worker_id
            )
        self.worker_id = worker_id
        self.last_status = WorkerStatus.PENDING
        return worker_id

    async def beat(self) -> WorkerStatus:
        """Send one heartbeat now. A row that disappeared or was deregistered by an operator
        is registered again under the same id (the worker is still running, after all)."""
        assert self.worker_id is not None, "register() first"
        heartbeat = self.sample()

        async def once() -> WorkerStatus:
            assert self.worker_id is not None
            with anyio.fail_after(CALL_TIMEOUT_S):
                if self.on_peers is None or not self.peers_of:
                    return await self.lifecycle.heartbeat(self.worker_id, heartbeat)
                status, peers = await self.lifecycle.heartbeat_and_peers(
                    self.worker_id, heartbeat, self.peers_of, self.config.stale_timeout
                )
            self.on_peers(peers)
            return status

        try:
            status = await once()
        except (WorkerNotFound, InvalidTransition, HeartbeatFailed):
            log.warning(
                "worker %s was removed or deregistered from outside while running; registering again", self.worker_id
            )
            await self.register()
            status = await once()
        self.heartbeats_sent += 1
        self.last_status = status
        return status

    async def run(self) -> None:
        """Heartbeat until cancelled."""
        interval = self.config.heartbeat_interval.total_seconds()
        backoff = Backoff(timedelta(milliseconds=200), timedelta(seconds=5))
        while True:
            try:
                await self.beat()
                backoff.succeeded()
                delay = interval
            except TRANSIENT_DB_ERRORS as exc:
                self.heartbeat_failures += 1
                delay = min(interval, backoff.failed())
                log.warning("heartbeat of %s failed (%s); retrying in %.2fs", self.worker_id, first_line(exc), delay)
            except Exception:
                # A bug must not stop the worker's steps; it shows in the log and the heartbeat age.
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
            final = self.sample()
        except Exception:
            # Without its statistics the row still says the worker left, and why.
            log.exception("final statistics of %s not taken", self.worker_id)
            final = None
        try:
            with anyio.fail_after(CALL_TIMEOUT_S):
                await self.lifecycle.deregister(self.worker_id, reason, final)
        except (WorkerNotFound, InvalidTransition) as exc:
            log.info("worker %s not deregistered: %s", self.worker_id, exc)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning(
                "could not deregister %s (%s); the supervisor will mark it offline", self.worker_id, first_line(exc)
            )
