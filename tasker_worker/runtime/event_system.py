"""WorkerEventSystem: runs the sources the DeploymentMode asks for and feeds the processor.

PollingOnly runs the fallback poller, EventDrivenOnly the listener, Hybrid both. Everything
after the bounded command channel is shared: one processor, one claim path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from tasker_worker.config.models import DeploymentMode, EventSystemConfig
from tasker_worker.domain.events import MessageReady
from tasker_worker.domain.steps import Source
from tasker_worker.errors import ListenerUnavailable, WorkerStartupError
from tasker_worker.runtime.commands import ExecuteStep, ExecuteStepFromEvent, WorkerCommand
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
    ) -> None:
        self.config = config
        self.mode = mode or config.deployment_mode
        self.stats = stats
        send, receive = anyio.create_memory_object_stream[WorkerCommand](config.command_buffer_size)
        self.send: MemoryObjectSendStream[WorkerCommand] = send
        self.receive: MemoryObjectReceiveStream[WorkerCommand] = receive
        self.listener: WorkerQueueListener | None = None
        self.poller: WorkerFallbackPoller | None = None
        self.listener_disabled_reason: str | None = None
        self.listening = anyio.Event()
        if self.mode.uses_listener and config.listener.enabled:
            self.listener = WorkerQueueListener(
                url, namespaces, config.listener, stats, self._on_event, self._on_connected, probe_sender
            )
        elif self.mode is DeploymentMode.EVENT_DRIVEN_ONLY:
            raise WorkerStartupError("EventDrivenOnly needs [event_system.listener] enabled = true")
        if self.mode.uses_poller and config.fallback_poller.enabled:
            self.poller = WorkerFallbackPoller(config.fallback_poller, self._on_tick, self.listener)

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
        """Run the sources until cancelled. An initial claim covers messages already queued."""
        await self.send.send(ExecuteStep(None, Source.POLL))
        async with anyio.create_task_group() as tg:
            if self.listener is not None:
                tg.start_soon(self.listener.run)
            if self.poller is not None:
                tg.start_soon(self.poller.run)

    def status(self) -> dict[str, Any]:
        """Mode and the state of each source."""
        listener = self.listener
        return {
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

    async def _on_event(self, event: MessageReady) -> None:
        await self.send.send(ExecuteStepFromEvent(event))

    async def _on_connected(self) -> None:
        self.listening.set()
        # Catch up on anything sent while the listener was away.
        await self.send.send(ExecuteStep(None, Source.POLL))

    async def _on_tick(self) -> None:
        await self.send.send(ExecuteStep(None, Source.POLL))
