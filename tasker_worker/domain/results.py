"""What a producer gets back: the identity of a step it sent, and a step's recorded outcome."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from tasker_worker.domain.steps import OutcomeStatus

#: What ``cancel`` found: taken off the queue; held by a live claim, which is asked to stop
#: (``cancelling``; ``running`` from a database before migration 0019); already finished; absent.
CancelState = Literal["cancelled", "cancelling", "running", "finished", "not_found"]


@dataclass(frozen=True)
class StepProgress:
    """The last progress a running step reported (``ctx.progress``)."""

    step_uuid: uuid.UUID
    fraction: float | None
    note: str | None
    data: Any
    worker_id: str | None
    updated_at: datetime

    def as_json(self) -> dict[str, Any]:
        """JSON-able form (CLI ``--json``, HTTP)."""
        return {
            "fraction": self.fraction,
            "note": self.note,
            "data": self.data,
            "worker_id": self.worker_id,
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True)
class StepRef:
    """A step as sent: its ``step_uuid``, the ``msg_id`` of its message, and whether this send
    created it (``False``: the step_uuid was already sent or done, and this is that step)."""

    step_uuid: uuid.UUID
    msg_id: int
    namespace: str
    created: bool = True

    def as_json(self) -> dict[str, Any]:
        """JSON-able form (CLI ``--json``, HTTP)."""
        return {
            "step_uuid": str(self.step_uuid),
            "msg_id": self.msg_id,
            "namespace": self.namespace,
            "created": self.created,
        }


@dataclass(frozen=True)
class StepResult:
    """A step's outcome row (``tasker.step_results``)."""

    step_uuid: uuid.UUID
    namespace: str
    handler: str | None
    status: OutcomeStatus
    result: Any
    error: dict[str, Any] | None
    attempts: int
    worker_id: str
    msg_id: int
    task_uuid: uuid.UUID | None
    correlation_id: uuid.UUID | None
    enqueued_at: datetime | None
    claimed_at: datetime | None
    started_at: datetime | None
    finished_at: datetime

    #: The columns, in the order the queries select them.
    COLUMNS = (
        "step_uuid, namespace, handler, status, result, error, attempts, worker_id, msg_id, task_uuid, "
        "correlation_id, enqueued_at, claimed_at, started_at, finished_at"
    )

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> StepResult:
        """From a row selected with :attr:`COLUMNS`."""
        values = list(row)
        values[3] = OutcomeStatus(values[3])
        return cls(*values)

    @property
    def succeeded(self) -> bool:
        """Whether the handler succeeded."""
        return self.status is OutcomeStatus.SUCCEEDED

    def as_json(self) -> dict[str, Any]:
        """JSON-able form (CLI ``--json``, HTTP)."""
        out: dict[str, Any] = {}
        for name in self.COLUMNS.split(", "):
            value = getattr(self, name)
            if isinstance(value, uuid.UUID):
                value = str(value)
            elif isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, OutcomeStatus):
                value = value.value
            out[name] = value
        return out
