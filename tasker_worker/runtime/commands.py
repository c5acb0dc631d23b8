"""WorkerCommand: what the sources (and the worker) ask the CommandProcessor to do."""

from __future__ import annotations

from dataclasses import dataclass

from tasker_worker.domain.notifications import MessageReady, StepsClaimed
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
class Shutdown:
    """Stop claiming; in-flight steps finish within the shutdown budget."""

    reason: str = "requested"


WorkerCommand = WakeClaims | MessagesAnnounced | ClaimsSeen | Shutdown
