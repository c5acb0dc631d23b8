"""WorkerControl: changes to a running worker that need no restart.

Two ways in:

- ``tasker-worker mode set <Mode> [--worker ID | --namespace N]`` (or ``tasker.request_mode``
  in SQL) stores the request in the worker's registry row and notifies
  ``tasker_worker_control``. A listening worker checks at once; every worker also checks once
  per heartbeat interval, so PollingOnly workers (which hold no LISTEN connection) follow too.
- SIGHUP re-reads the configuration: ``[logging]`` and the deployment mode apply at once;
  other changed keys are named in the log as needing a restart.

A mode change swaps only the event sources (``WorkerEventSystem.switch``): claimed and running
steps belong to the processor and go on. Each change is logged, counted and recorded as a
DeploymentModeChanged event (which also updates the registry row that ``status`` shows).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import anyio

from tasker_worker import logs
from tasker_worker.config.models import DatabaseConfig, TaskerConfig
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.errors import ModeChangeRefused, TaskerError, WorkerNotFound, first_line
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.runtime.event_system import WorkerEventSystem
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)

#: Failures of recording a change that leave the change itself standing.
_RECORD_ERRORS: tuple[type[BaseException], ...] = (WorkerNotFound, *TRANSIENT_DB_ERRORS)


class WorkerControl:
    """Applies requested mode changes and configuration reloads to one running worker."""

    def __init__(
        self,
        event_system: WorkerEventSystem,
        config: TaskerConfig,
        stats: WorkerStats,
        *,
        worker_id: str,
        lifecycle: WorkerLifecycle | None,
        check_interval: float,
        reload_config: Callable[[], TaskerConfig] | None = None,
        others: Sequence[WorkerEventSystem] = (),
        databases: Sequence[DatabaseConfig] = (),
    ) -> None:
        self.event_system = event_system
        #: The event systems of the worker's other clusters: a mode applies to every one.
        self.others = list(others)
        #: The settings of the clusters they watch (beside ``[database]``): a mode that one of
        #: them cannot run (LISTEN behind a transaction pooler) is refused for all.
        self.databases = list(databases)
        self.config = config
        self.stats = stats
        self.worker_id = worker_id
        self.lifecycle = lifecycle
        self.check_interval = check_interval
        self.reload_config = reload_config
        self.last_change: dict[str, Any] | None = None
        self.last_error: str | None = None
        #: Set by a notification on the control channel (the event system's) and by SIGHUP.
        self._wake = event_system.control_requested
        self._reload_requested = False

    def request_reload(self) -> None:
        """Re-read the configuration soon (SIGHUP; the signal handler must not block)."""
        self._reload_requested = True
        self._wake.set()

    async def run(self) -> None:
        """Check on every wakeup and at least once per interval, until cancelled."""
        while True:
            with anyio.move_on_after(self.check_interval if self.lifecycle is not None else float("inf")):
                await self._wake.wait()
            if self._reload_requested:
                self._reload_requested = False
                await self.reload()
            if self.lifecycle is not None:
                await self.check_requested()

    async def check_requested(self) -> None:
        """Apply the mode requested for this worker in the registry, if any."""
        assert self.lifecycle is not None
        try:
            requested = await self.lifecycle.requested_mode(self.worker_id)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning("control check failed; trying again later", extra=logs.error_fields(exc))
            return
        if requested is None:
            return
        await self.set_mode(DeploymentMode(requested), source="control")

    async def set_mode(self, mode: DeploymentMode, *, source: str) -> bool:
        """Switch to ``mode``; return whether the worker runs it now (already did: True)."""
        old = self.event_system.mode
        if mode is old:
            # Nothing to switch or to record; a request for it is answered all the same.
            await self._record(lambda c: c.clear_requested_mode(self.worker_id, mode.value))
            return True
        try:
            for database in (self.config.database, *self.databases):
                why = database.refuses(mode)
                if why is not None:
                    raise ModeChangeRefused(mode.value, f"the worker runs behind {why}")
            await self._switch_all(mode, old)
        except ModeChangeRefused as exc:
            self.last_error = str(exc)
            log.error("deployment mode stays %s: %s", old.value, exc, extra={"deployment_mode": old.value})
            await self._record(lambda c: c.clear_requested_mode(self.worker_id, mode.value))
            return False
        self.stats.incr("mode_changes")
        self.last_change = {"from": old.value, "to": mode.value, "source": source}
        log.warning(
            "deployment mode changed from %s to %s (%s)",
            old.value,
            mode.value,
            source,
            extra={"deployment_mode": mode.value, "command_type": "DeploymentModeChanged"},
        )
        await self._record(lambda c: c.mode_changed(self.worker_id, old.value, mode.value, source=source))
        return True

    async def _switch_all(self, mode: DeploymentMode, old: DeploymentMode) -> None:
        """Switch every cluster's event system to ``mode``, or none: when one refuses (its
        LISTEN does not deliver for EventDrivenOnly), those already switched go back to ``old``
        (which cannot be refused: only EventDrivenOnly is, and it is not the one left)."""
        switched: list[WorkerEventSystem] = []
        try:
            for system in (self.event_system, *self.others):
                await system.switch(mode)
                switched.append(system)
        except ModeChangeRefused:
            for system in switched:
                await system.switch(old)
            raise

    async def reload(self) -> None:
        """SIGHUP: re-read the configuration and apply what can change while running."""
        if self.reload_config is None:
            log.warning("SIGHUP: this worker was not started from a configuration it can re-read")
            return
        try:
            new = await anyio.to_thread.run_sync(self.reload_config)
        except TaskerError as exc:
            # A broken file must not take a running worker down: keep the config in force.
            self.last_error = str(exc)
            log.error("SIGHUP: configuration not reloaded: %s", exc, extra=logs.error_fields(exc))
            return
        restart = sorted(_changed_sections(self.config, new) - {"logging", "event_system"})
        if _event_system_without_mode(self.config) != _event_system_without_mode(new):
            restart.append("event_system")
        settings = new.logging
        logs.configure_logging(settings.level, settings.format)
        self.config.logging = settings
        log.info("SIGHUP: configuration re-read (logging level %s, format %s)", settings.level, settings.format)
        if restart:
            log.warning("SIGHUP: changes to %s take effect at the next restart", ", ".join(restart))
        wanted = new.event_system.deployment_mode
        if await self.set_mode(wanted, source="sighup"):
            self.config.event_system.deployment_mode = wanted

    async def _record(self, call: Callable[[WorkerLifecycle], Any]) -> None:
        if self.lifecycle is None:
            return
        try:
            await call(self.lifecycle)
        except _RECORD_ERRORS as exc:
            # The switch itself happened; only its record is missing (the log has it).
            log.warning("could not record the mode change: %s", first_line(exc), extra=logs.error_fields(exc))

    def status(self) -> dict[str, Any]:
        """The last change and the last refusal."""
        return {"last_change": self.last_change, "last_error": self.last_error}


def _changed_sections(old: TaskerConfig, new: TaskerConfig) -> set[str]:
    a, b = old.model_dump(), new.model_dump()
    return {key for key in a if a[key] != b.get(key)}


def _event_system_without_mode(config: TaskerConfig) -> dict[str, Any]:
    return config.event_system.model_dump(exclude={"deployment_mode"})


__all__ = ["WorkerControl"]
