"""WorkerFallbackPoller: wakes every queue on an interval.

It never holds a connection while waiting (no server-side sleeping reads): each tick only asks
the processor to claim, and the claim is a single short statement. In Hybrid mode it adapts:
``polling_interval`` while the listener is healthy, ``degraded_interval`` while it is down
(switching at once when the listener's state changes).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from tasker_worker.config.models import FallbackPollerConfig
from tasker_worker.runtime.listener import WorkerQueueListener


class WorkerFallbackPoller:
    """Calls ``tick()`` every interval."""

    def __init__(
        self,
        config: FallbackPollerConfig,
        tick: Callable[[], Awaitable[None]],
        listener: WorkerQueueListener | None = None,
    ) -> None:
        self.config = config
        self.tick = tick
        self.listener = listener

    @property
    def degraded(self) -> bool:
        """Hybrid with the listener down: poll fast."""
        return self.listener is not None and not self.listener.healthy

    def current_interval(self) -> float:
        """Seconds until the next tick."""
        if self.degraded:
            return self.config.degraded_interval.total_seconds()
        return self.config.polling_interval.total_seconds()

    async def run(self) -> None:
        """Tick until cancelled."""
        while True:
            changed = self.listener.state_changed if self.listener is not None else None
            with anyio.move_on_after(self.current_interval()):
                if changed is not None:
                    await changed.wait()
                    continue  # the listener went up or down: recompute the interval now
                await anyio.sleep_forever()
            await self.tick()
