"""Workers as the registry sees them: status lifecycle, registration data, events, projection.

Pure types and functions, no I/O: the registry commands check transitions here before they
write, and ``events replay`` folds the event log through ``apply_event`` to rebuild the same
state the live tables hold.

Lifecycle::

    pending ──(heartbeat seen)──► active ◄──(heartbeats resume)──┐
       │                           │                             │
       └──────(no heartbeat)───────┴──(stale)──────────────► offline
    any of them ──(graceful shutdown)──► deregistered (final)
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.names import (
    NAMESPACE_MAX_LEN,
    NAMESPACE_PATTERN,
    TEXT_PATTERN,
    WORKER_ID_PATTERN,
    checked_namespaces,
    is_text,
    is_worker_id,
)
from tasker_worker.errors import InvalidTransition


class WorkerStatus(enum.StrEnum):
    """Where a worker is in its lifecycle."""

    PENDING = "pending"
    ACTIVE = "active"
    OFFLINE = "offline"
    DEREGISTERED = "deregistered"


_ALLOWED: dict[WorkerStatus, frozenset[WorkerStatus]] = {
    WorkerStatus.PENDING: frozenset({WorkerStatus.ACTIVE, WorkerStatus.OFFLINE, WorkerStatus.DEREGISTERED}),
    WorkerStatus.ACTIVE: frozenset({WorkerStatus.OFFLINE, WorkerStatus.DEREGISTERED}),
    WorkerStatus.OFFLINE: frozenset({WorkerStatus.ACTIVE, WorkerStatus.DEREGISTERED}),
    WorkerStatus.DEREGISTERED: frozenset(),
}

#: Statuses of a worker that is (as far as anyone knows) running.
LIVE_STATUSES = (WorkerStatus.PENDING, WorkerStatus.ACTIVE)


def check_transition(worker_id: str, current: WorkerStatus, target: WorkerStatus) -> None:
    """Raise ``InvalidTransition`` unless ``current -> target`` is allowed."""
    if target not in _ALLOWED[current]:
        allowed = ", ".join(sorted(s.value for s in _ALLOWED[current])) or "none (final)"
        raise InvalidTransition(worker_id, current.value, target.value, allowed)


class WorkerEventType(enum.StrEnum):
    """Every event the log holds."""

    WORKER_REGISTERED = "WorkerRegistered"
    WORKER_READY = "WorkerReady"
    WORKER_BUSY = "WorkerBusy"
    WORKER_OFFLINE = "WorkerOffline"
    WORKER_DEREGISTERED = "WorkerDeregistered"
    DEPLOYMENT_MODE_CHANGED = "DeploymentModeChanged"
    STEP_ASSIGNED = "StepAssigned"
    STEP_ASSIGNMENT_ACCEPTED = "StepAssignmentAccepted"
    STEP_ASSIGNMENT_REJECTED = "StepAssignmentRejected"
    STEP_ASSIGNMENT_TIMED_OUT = "StepAssignmentTimedOut"
    STEP_COMPLETED = "StepCompleted"
    STEP_FAILED = "StepFailed"
    STEP_DEAD_LETTERED = "StepDeadLettered"


WORKER_EVENTS = frozenset(
    {
        WorkerEventType.WORKER_REGISTERED,
        WorkerEventType.WORKER_READY,
        WorkerEventType.WORKER_BUSY,
        WorkerEventType.WORKER_OFFLINE,
        WorkerEventType.WORKER_DEREGISTERED,
        WorkerEventType.DEPLOYMENT_MODE_CHANGED,
    }
)


#: Largest values of the registry's integer columns (``integer`` and ``bigint``).
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1


def _rule(pattern: str, check: Callable[[str], bool], message: str) -> Any:
    """A string rule stated once: validated with ``check``, published as ``pattern`` (the API's
    OpenAPI document says exactly what is enforced)."""

    def checked(value: str) -> str:
        if not check(value):
            raise ValueError(message)
        return value

    return (AfterValidator(checked), Field(json_schema_extra={"pattern": pattern}))


def whole_number(value: Any) -> Any:
    """``86.0`` as ``86`` (a validator: anything else passes unchanged)."""
    # JSON has one number type: 86.0 is the integer 86 (JSON Schema's "integer" agrees), and the
    # API reads bodies strictly otherwise (no "86", no true).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer that may arrive as a number with no fractional part (``86.0``).
WholeNumber = Annotated[int, BeforeValidator(whole_number)]

_PRINTABLE = "must be printable text without surrounding whitespace"
#: Printable text, no space at either end (``domain.names.TEXT_PATTERN``).
Text = Annotated[str, *_rule(TEXT_PATTERN, is_text, _PRINTABLE)]
#: A worker id: ``Text`` without ``/`` (the id is a URL path segment of the API).
WorkerId = Annotated[
    str, *_rule(WORKER_ID_PATTERN, is_worker_id, _PRINTABLE + " and without '/' (the id is a URL path segment)")
]
#: A namespace (``domain.names.NAMESPACE_PATTERN``, at most 30 characters).
Namespace = Annotated[
    str,
    AfterValidator(lambda value: checked_namespaces([value])[0]),
    Field(max_length=NAMESPACE_MAX_LEN, json_schema_extra={"pattern": NAMESPACE_PATTERN}),
]


class WorkerRegistration(BaseModel):
    """What a worker says about itself when it registers (also the API's request body)."""

    model_config = ConfigDict(extra="forbid")

    worker_id: WorkerId | None = Field(default=None, min_length=1, max_length=200)
    name: Text = Field(min_length=1, max_length=200)
    hostname: Text = Field(min_length=1, max_length=255)
    pid: WholeNumber = Field(ge=0, le=INT4_MAX)
    endpoint: Text | None = Field(default=None, max_length=500)
    namespaces: list[Namespace] = Field(default_factory=list, max_length=1000)
    capabilities: list[Annotated[Text, Field(max_length=200)]] = Field(default_factory=list, max_length=10_000)
    version: Text = Field(default="unknown", max_length=100)
    deployment_mode: str = Field(
        default="Hybrid", max_length=50, json_schema_extra={"enum": [m.value for m in DeploymentMode]}
    )
    cpu_cores: WholeNumber = Field(default=1, ge=0, le=1_000_000)
    memory_total: WholeNumber = Field(default=0, ge=0, le=INT8_MAX)

    @field_validator("deployment_mode")
    @classmethod
    def _known_mode(cls, value: str) -> str:
        try:
            return DeploymentMode(value).value
        except ValueError:
            allowed = ", ".join(m.value for m in DeploymentMode)
            raise ValueError(f"must be one of {allowed}") from None


class Heartbeat(BaseModel):
    """One heartbeat: how the worker is doing."""

    model_config = ConfigDict(extra="forbid")

    cpu_percent: float | None = Field(default=None, ge=0, le=1_000_000, allow_inf_nan=False)
    # Bounds before the validator, inside the optional type: put on the field, pydantic would
    # publish them as "ge"/"le" (no JSON Schema keywords) for a type with a validator of its own.
    memory_used: Annotated[int, Field(ge=0, le=INT8_MAX), BeforeValidator(whole_number)] | None = None
    active_steps: WholeNumber = Field(default=0, ge=0, le=INT4_MAX)
    processed: WholeNumber = Field(default=0, ge=0, le=INT8_MAX)
    #: The worker is saturated (every concurrency slot taken): recorded as WorkerBusy.
    busy: bool = False
    stats: dict[str, Any] | None = None


#: The fields of a worker that the event log determines (replay compares exactly these).
PROJECTED_FIELDS = (
    "status",
    "name",
    "hostname",
    "pid",
    "endpoint",
    "namespaces",
    "capabilities",
    "version",
    "deployment_mode",
    "busy",
    "deregister_reason",
)


def apply_event(state: dict[str, dict[str, Any]], event_type: str, worker_id: str, data: dict[str, Any]) -> None:
    """Fold one worker event into ``state`` (worker_id -> projected fields), in place.

    Deterministic and total: replaying the same events always gives the same state, and an
    event for an unknown worker (its registration compacted away without a snapshot) is
    ignored rather than guessed at.
    """
    if event_type == WorkerEventType.WORKER_REGISTERED:
        state[worker_id] = {
            "status": WorkerStatus.PENDING.value,
            "name": data.get("name"),
            "hostname": data.get("hostname"),
            "pid": data.get("pid"),
            "endpoint": data.get("endpoint"),
            "namespaces": list(data.get("namespaces") or []),
            "capabilities": list(data.get("capabilities") or []),
            "version": data.get("version"),
            "deployment_mode": data.get("deployment_mode"),
            "busy": False,
            "deregister_reason": None,
        }
        return
    worker = state.get(worker_id)
    if worker is None:
        return
    if event_type == WorkerEventType.WORKER_READY:
        worker["status"] = WorkerStatus.ACTIVE.value
    elif event_type == WorkerEventType.WORKER_OFFLINE:
        worker["status"] = WorkerStatus.OFFLINE.value
    elif event_type == WorkerEventType.WORKER_BUSY:
        worker["busy"] = bool(data.get("busy", True))
    elif event_type == WorkerEventType.WORKER_DEREGISTERED:
        worker["status"] = WorkerStatus.DEREGISTERED.value
        worker["busy"] = False
        worker["deregister_reason"] = data.get("reason")
    elif event_type == WorkerEventType.DEPLOYMENT_MODE_CHANGED:
        worker["deployment_mode"] = data.get("to", worker.get("deployment_mode"))


def project(row: dict[str, Any]) -> dict[str, Any]:
    """The projected fields of a live ``tasker.workers`` row."""
    return {key: (list(row[key]) if isinstance(row[key], list | tuple) else row[key]) for key in PROJECTED_FIELDS}


def diff_projections(replayed: dict[str, dict[str, Any]], live: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Differences between a replayed and the live projection, one entry per field."""
    out: list[dict[str, Any]] = []
    for worker_id in sorted(set(replayed) | set(live)):
        a, b = replayed.get(worker_id), live.get(worker_id)
        if a is None or b is None:
            out.append({"worker_id": worker_id, "field": None, "replayed": a is not None, "live": b is not None})
            continue
        for key in PROJECTED_FIELDS:
            if a.get(key) != b.get(key):
                out.append({"worker_id": worker_id, "field": key, "replayed": a.get(key), "live": b.get(key)})
    return out


class WorkerView(BaseModel):
    """A worker as queries return it."""

    worker_id: str
    name: str
    hostname: str
    pid: int
    endpoint: str | None
    namespaces: list[str]
    capabilities: list[str]
    version: str
    deployment_mode: str
    cpu_cores: int
    memory_total: int
    status: WorkerStatus
    busy: bool
    registered_at: datetime
    status_changed_at: datetime
    last_heartbeat_at: datetime | None
    deregistered_at: datetime | None
    deregister_reason: str | None
    cpu_percent: float | None
    memory_used: int | None
    active_steps: int
    processed: int
    stats: dict[str, Any] = Field(default_factory=dict)
    #: A deployment mode asked for (``mode set``) that the worker has not applied yet.
    requested_mode: str | None = None
