"""WorkerCommand: what the sources (and the worker) ask the CommandProcessor to do."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import anyio

from tasker_worker.domain.events import MessageReady
from tasker_worker.domain.steps import Source


@dataclass(frozen=True, slots=True)
class ExecuteStep:
    """Claim ready steps from ``queue`` (``None``: every queue of the worker)."""

    queue: str | None = None
    source: Source = Source.POLL


@dataclass(frozen=True, slots=True)
class ExecuteStepFromEvent:
    """A notification said ``event.queue_name`` has (or soon has) ready steps."""

    event: MessageReady


@dataclass(slots=True)
class Reply:
    """A one-shot answer slot for query commands."""

    value: Any = None
    done: anyio.Event = field(default_factory=anyio.Event)

    def set(self, value: Any) -> None:
        """Answer the command."""
        self.value = value
        self.done.set()

    async def wait(self) -> Any:
        """Wait for the answer."""
        await self.done.wait()
        return self.value


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Report the processor's health (answered through ``reply``)."""

    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class GetWorkerStatus:
    """Report statistics and in-flight work (answered through ``reply``)."""

    reply: Reply = field(default_factory=Reply)


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop claiming; in-flight steps finish within the shutdown budget."""

    reason: str = "requested"


WorkerCommand = ExecuteStep | ExecuteStepFromEvent | HealthCheck | GetWorkerStatus | Shutdown
