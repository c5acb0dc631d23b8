"""WorkerCommand: what the sources (and the worker) ask the CommandProcessor to do."""

from __future__ import annotations

from dataclasses import dataclass

import anyio

from tasker_worker.domain.notifications import CancelRequested, MessageReady, StepsClaimed
from tasker_worker.domain.steps import Source


@dataclass(frozen=True, slots=True)
class WakeClaims:
    """Wake the claim loop of ``queue`` (``None``: every queue of the worker), which claims as
    many steps as it has room for. (tasker-core's ``ExecuteStep``: it executes nothing itself.)"""

    queue: str | None = None
    source: Source = Source.POLL


@dataclass(frozen=True, slots=True)
class MessagesAnnounced:
    """A notification said ``event.queue_name`` has (or soon has) ready steps (tasker-core's
    ``ExecuteStepFromEvent``)."""

    event: MessageReady


@dataclass(frozen=True, slots=True)
class ClaimsSeen:
    """Another worker claimed these messages (a ``tasker_claimed.<ns>`` notice)."""

    notice: StepsClaimed


@dataclass(frozen=True, slots=True)
class CancelStep:
    """Someone asked a running step to stop (a ``tasker_cancel.<ns>`` notice)."""

    request: CancelRequested


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop claiming; in-flight steps finish within the shutdown budget."""

    reason: str = "requested"


class Nudge:
    """A wakeup remembered until waited for: ``set`` any number of times, and the next ``wait``
    returns (and consumes it). The sources hand control notices and fleet changes to the loops
    that act on them so, with nothing attached after construction."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        """Wake the waiter (now, or at its next ``wait``)."""
        self._event.set()

    async def wait(self) -> None:
        """Until set; consumes it."""
        await self._event.wait()
        self._event = anyio.Event()


WorkerCommand = WakeClaims | MessagesAnnounced | ClaimsSeen | CancelStep | Shutdown
