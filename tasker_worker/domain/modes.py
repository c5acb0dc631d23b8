"""The deployment mode: which sources wake a worker's claims (docs/operations.md, "Choosing a deployment mode").

The mode a worker runs now lives in one place, its ``WorkerEventSystem.mode``; the configuration
only says which one it starts with.
"""

from __future__ import annotations

import enum


class DeploymentMode(enum.StrEnum):
    """Which sources feed the command processor."""

    POLLING_ONLY = "PollingOnly"
    HYBRID = "Hybrid"
    EVENT_DRIVEN_ONLY = "EventDrivenOnly"

    @property
    def uses_listener(self) -> bool:
        """Whether this mode runs the WorkerQueueListener."""
        return self is not DeploymentMode.POLLING_ONLY

    @property
    def uses_poller(self) -> bool:
        """Whether this mode runs the WorkerFallbackPoller."""
        return self is not DeploymentMode.EVENT_DRIVEN_ONLY
