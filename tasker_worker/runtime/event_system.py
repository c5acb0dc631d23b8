"""WorkerEventSystem: runs the sources the DeploymentMode asks for and feeds the processor.

PollingOnly runs the fallback poller, EventDrivenOnly the listener, Hybrid both. Everything
after the bounded command channel is shared: one processor, one claim path. That is also what
makes a mode change at runtime cheap and safe: ``switch`` replaces only the sources; claimed
and running steps belong to the processor and never notice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tasker_worker.config.models import EventSystemConfig
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.steps import Source
from tasker_worker.errors import ListenerUnavailable, ModeChangeRefused, WorkerStartupError
from tasker_worker.runtime.commands import Nudge, WakeClaims, WorkerCommand
from tasker_worker.runtime.listener import ProbeSender, WorkerQueueListener
from tasker_worker.runtime.poller import WorkerFallbackPoller
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)


class WorkerEventSystem:
    """Owns the listener and the poller, and the channel they write commands into."""

    def __init__(
        self,
        url: str,
        namespaces: list[str],
        config: EventSystemConfig,
        stats: WorkerStats,
        mode: DeploymentMode | None = None,
        probe_sender: ProbeSender | None = None,
        *,
        follow_fleet: bool = False,
        control: bool = True,
        cluster: str | None = None,
    ) -> None:
        self.url = url
        #: Its listener also hears the control channel (mode requests; the primary cluster's
        #: event system: the registry lives there).
        self.control = control
        #: The cluster whose queues it watches (None: the one database of the worker).
        self.cluster = cluster
        self.namespaces = namespaces
        self.config = config
        self.mode = mode or config.deployment_mode
        self.stats = stats
        self.probe_sender = probe_sender
        #: Set when a notification arrives on the control channel (a mode was requested):
        #: ``WorkerControl`` waits on it.
        self.control_requested = Nudge()
        #: Set when the fleet changed (a worker came, went, or changed mode or namespaces), with
        #: ``follow_fleet``: the worker's claim ranking waits on it.
        self.fleet_changed = Nudge()
        self.follow_fleet = follow_fleet
        send, receive = anyio.create_memory_object_stream[WorkerCommand](config.command_buffer_size)
        self.send: MemoryObjectSendStream[WorkerCommand] = send
        self.receive: MemoryObjectReceiveStream[WorkerCommand] = receive
        self.listener_disabled_reason: str | None = None
        self.listening = anyio.Event()
        self._restart = anyio.Event()
        if self.mode is DeploymentMode.EVENT_DRIVEN_ONLY and not config.listener.enabled:
            raise WorkerStartupError("EventDrivenOnly needs [event_system.listener] enabled = true")
        self.listener, self.poller = self._sources(self.mode, None)

    def _sources(
        self, mode: DeploymentMode, listener: WorkerQueueListener | None
    ) -> tuple[WorkerQueueListener | None, WorkerFallbackPoller | None]:
        """The listener and poller ``mode`` runs (an existing listener is kept if still needed)."""
        if mode.uses_listener and self.config.listener.enabled:
            if listener is None:
                listener = WorkerQueueListener(
                    self.url,
                    self.namespaces,
                    self.config.listener,
                    self.stats,
                    self.send,
                    self._on_connected,
                    self.probe_sender,
                    on_control=self.control_requested.set if self.control else None,
                    on_fleet_changed=self.fleet_changed.set if self.follow_fleet else None,
                )
        else:
            listener = None
        poller = None
        if mode.uses_poller and self.config.fallback_poller.enabled:
            poller = WorkerFallbackPoller(self.config.fallback_poller, self._on_tick, listener)
        return listener, poller

    async def switch(self, mode: DeploymentMode) -> None:
        """Change the deployment mode of the running sources (claimed steps are untouched).

        A new listener proves delivery first, as at startup: EventDrivenOnly is refused
        (``ModeChangeRefused``, the old mode stays) when LISTEN does not deliver; Hybrid goes
        on with its poller alone, as it would have started.
        """
        if mode is self.mode:
            return
        if mode is DeploymentMode.EVENT_DRIVEN_ONLY and not self.config.listener.enabled:
            raise ModeChangeRefused(mode.value, "[event_system.listener] enabled = false")
        listener, poller = self._sources(mode, self.listener)
        disabled: str | None = None
        if listener is not None and listener is not self.listener:
            try:
                await listener.check_delivery()
            except ListenerUnavailable as exc:
                if mode is DeploymentMode.EVENT_DRIVEN_ONLY:
                    raise ModeChangeRefused(mode.value, str(exc)) from exc
                log.warning("Hybrid continues on polling only: %s", exc)
                disabled = str(exc)
                listener, poller = None, self._sources(DeploymentMode.POLLING_ONLY, None)[1]
        if listener is not self.listener:
            self.listening = anyio.Event()
        self.mode, self.listener, self.poller = mode, listener, poller
        self.listener_disabled_reason = disabled
        self._restart.set()

    def listener_healthy(self) -> bool:
        """Whether notifications are being received now."""
        return self.listener is not None and self.listener.healthy

    def listening_since(self) -> float | None:
        """Monotonic time since which the listener has been connected (None: not listening)."""
        return self.listener.healthy_since if self.listener is not None else None

    async def prepare(self) -> None:
        """Startup check of LISTEN delivery: fatal for EventDrivenOnly, a warning for Hybrid."""
        if self.listener is None:
            return
        try:
            await self.listener.check_delivery()
        except ListenerUnavailable as exc:
            if self.mode is DeploymentMode.EVENT_DRIVEN_ONLY:
                raise WorkerStartupError(f"EventDrivenOnly cannot start: {exc}") from exc
            log.warning("Hybrid continues on polling only: %s", exc)
            self.listener_disabled_reason = str(exc)
            self.listener = None
            if self.poller is not None:
                self.poller.listener = None

    async def wait_listening(self, timeout: float) -> bool:
        """Wait until the listener has connected once (immediately true without a listener)."""
        if self.listener is None:
            return True
        with anyio.move_on_after(timeout):
            await self.listening.wait()
        return self.listening.is_set()

    async def run(self) -> None:
        """Run the sources until cancelled; after ``switch``, stop the sources that went and
        start the new ones (a listener both modes use keeps its connection).

        A claim at start (and after each switch) covers messages already queued.
        """
        running: dict[str, tuple[object, anyio.CancelScope]] = {}
        async with anyio.create_task_group() as tg:
            while True:
                self._restart = anyio.Event()
                for name, source in (("listener", self.listener), ("poller", self.poller)):
                    current = running.get(name)
                    if current is not None and current[0] is source:
                        continue
                    if current is not None:
                        current[1].cancel()
                        del running[name]
                    if source is not None:
                        running[name] = (source, await tg.start(_run_in_scope, source.run))
                await self.send.send(WakeClaims(None, Source.POLL))
                await self._restart.wait()

    def status(self) -> dict[str, Any]:
        """Mode and the state of each source."""
        listener = self.listener
        return {
            **({"cluster": self.cluster} if self.cluster is not None else {}),
            "system_id": self.config.system_id,
            "deployment_mode": self.mode.value,
            "listener": None
            if listener is None
            else {
                "healthy": listener.healthy,
                "last_notification_age_s": None
                if listener.last_notification_at is None
                else round(time.monotonic() - listener.last_notification_at, 3),
                "last_error": listener.last_error,
            },
            "listener_disabled_reason": self.listener_disabled_reason,
            "poller": None
            if self.poller is None
            else {"interval_s": self.poller.current_interval(), "degraded": self.poller.degraded},
        }

    async def _on_connected(self) -> None:
        self.listening.set()
        # Catch up on anything sent while the listener was away.
        await self.send.send(WakeClaims(None, Source.POLL))

    async def _on_tick(self) -> None:
        await self.send.send(WakeClaims(None, Source.POLL))


async def _run_in_scope(
    func: Callable[[], Awaitable[None]], *, task_status: TaskStatus[anyio.CancelScope] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run ``func`` in a cancel scope of its own, handed to the starter (to stop it alone)."""
    with anyio.CancelScope() as scope:
        task_status.started(scope)
        await func()
