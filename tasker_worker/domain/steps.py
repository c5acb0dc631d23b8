"""Step messages, claimed messages and outcomes.

``StepMessage`` is the JSON contract producers write (DESIGN.md "Step message").
``ClaimedMessage`` is one row a claim returned; ``Outcome`` is what the runtime records.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasker_worker.domain.names import validate_handler_name
from tasker_worker.errors import InvalidName, StepValidationError

MAX_ATTEMPT_LIMIT = 100
MAX_STEP_TIMEOUT_S = 24 * 3600.0


class StepMessage(BaseModel):
    """One unit of work as stored in a pgmq message."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    step_uuid: uuid.UUID
    task_uuid: uuid.UUID
    correlation_id: uuid.UUID
    namespace: str
    handler: str
    inputs: dict[str, Any] = Field(default_factory=dict)
    attempt_limit: int | None = Field(default=None, ge=1, le=MAX_ATTEMPT_LIMIT)
    #: Seconds; overrides the handler's timeout for this step.
    timeout: float | None = Field(default=None, gt=0, le=MAX_STEP_TIMEOUT_S)

    @field_validator("handler")
    @classmethod
    def _handler_name(cls, value: str) -> str:
        try:
            return validate_handler_name(value)
        except InvalidName as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def parse(cls, payload: Any) -> StepMessage:
        """Validate a decoded message body, raising ``StepValidationError`` with a readable
        reason (never pydantic's multi-line dump)."""
        if not isinstance(payload, dict):
            raise StepValidationError(
                f"step message must be a JSON object, got {type(payload).__name__}",
                reason="malformed_message",
            )
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '<message>'}: {err['msg']}" for err in exc.errors()[:5]
            )
            raise StepValidationError(f"invalid step message: {problems}", reason="malformed_message") from None

    @staticmethod
    def build(
        namespace: str,
        handler: str,
        inputs: dict[str, Any] | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """A new valid message body with fresh ids (what ``tasker.send_step`` builds in SQL)."""
        body: dict[str, Any] = {
            "step_uuid": str(uuid.uuid4()),
            "task_uuid": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
            "namespace": namespace,
            "handler": handler,
            "inputs": inputs or {},
        }
        body.update({k: v for k, v in extra.items() if v is not None})
        return body


class Source(enum.StrEnum):
    """How a message was found: announced by a notification, or found by looking."""

    EVENT = "event"
    POLL = "poll"


class OutcomeStatus(enum.StrEnum):
    """Final status of a step in ``tasker.step_results``."""

    SUCCEEDED = "succeeded"
    #: A definitive failure (``StepFailed``, or retries exhausted then dead-lettered).
    FAILED = "failed"
    #: Not runnable at all (malformed, unknown handler, non-retryable): dead-lettered.
    DEAD_LETTERED = "dead_lettered"


@dataclass(slots=True)
class ClaimedMessage:
    """One message as returned by a claim, plus what this worker knows about it."""

    queue: str
    msg_id: int
    read_ct: int
    enqueued_at: datetime
    vt: datetime
    body: Any
    headers: dict[str, Any] | None
    #: The outcome of this step_uuid is already recorded (dedup).
    already_done: bool
    #: Server time of the claim, so latency needs no clock agreement between hosts.
    claimed_at: datetime
    source: Source
    #: Monotonic time when the claim returned (local clock).
    received_mono: float = 0.0
    step: StepMessage | None = field(default=None)

    @property
    def step_uuid(self) -> str | None:
        """The step_uuid from the body, if there is a usable one."""
        if self.step is not None:
            return str(self.step.step_uuid)
        if isinstance(self.body, dict):
            value = self.body.get("step_uuid")
            if isinstance(value, str):
                return value
        return None


@dataclass(slots=True)
class Outcome:
    """What the runtime records for one finished claim (one row of ``record_outcomes``)."""

    msg: ClaimedMessage
    status: OutcomeStatus | None  # None: archive only (outcome already recorded)
    result: Any = None
    error: dict[str, Any] | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
