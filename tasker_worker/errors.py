"""The ``TaskerError`` hierarchy.

Every error the runtime raises on purpose is a ``TaskerError``. Each carries a message a user can
act on; the CLI prints it as one line and maps the class to an exit code (``exit_code``).

Handler authors raise the *step* errors (``RetryableError``, ``NonRetryableError``,
``StepFailed``, ``DependencyUnavailable``) to tell the runtime what to do with a step.
"""

from __future__ import annotations

from typing import Any


class TaskerError(Exception):
    """Base class of every error raised on purpose by tasker-worker."""

    #: Exit code the CLI uses when this error ends a command.
    exit_code: int = 1

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message


# --- configuration and usage (exit code 2) --------------------------------------------------


class ConfigError(TaskerError):
    """The configuration is invalid: names the file (or variable) and the key path."""

    exit_code = 2

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        prefix = ""
        if source:
            prefix += f"{source}: "
        if key:
            prefix += f"{key}: "
        super().__init__(prefix + message, source=source, key=key)
        self.source = source
        self.key = key


class UsageError(TaskerError):
    """A command was called with arguments that cannot work."""

    exit_code = 2


class InvalidName(UsageError):
    """A queue, namespace or handler name breaks the naming rules."""


# --- database and runtime (exit code 1) -----------------------------------------------------


class DatabaseError(TaskerError):
    """The database could not be reached or refused an operation."""


class MigrationError(DatabaseError):
    """A migration failed; the database is left as it was before (pending migrations apply in one transaction)."""


class EmbeddedDatabaseError(DatabaseError):
    """The embedded PostgreSQL server could not be started."""


class QueueNotFound(TaskerError):
    """A queue named by the user does not exist."""


class ListenerUnavailable(TaskerError):
    """LISTEN does not deliver notifications on this connection (e.g. transaction pooling)."""


class WorkerStartupError(TaskerError):
    """The worker could not start (nothing was half-started)."""


class ModeChangeRefused(TaskerError):
    """A running worker cannot switch to the requested deployment mode; it keeps its mode."""

    def __init__(self, mode: str, why: str) -> None:
        super().__init__(f"cannot switch to {mode}: {why}")
        self.mode = mode
        self.why = why


# --- the worker registry ------------------------------------------------------------------


class RegistryError(TaskerError):
    """Base of the worker registry's errors."""


class WorkerNotFound(RegistryError):
    """No worker is registered under this id."""

    def __init__(self, worker_id: str) -> None:
        super().__init__(f"no worker is registered as {worker_id!r}", worker_id=worker_id)


class WorkerConflict(RegistryError):
    """A live worker already holds the requested id."""

    def __init__(self, worker_id: str, status: str) -> None:
        super().__init__(
            f"worker id {worker_id!r} is held by a live worker (status {status}); "
            "choose another id or deregister that worker first",
            worker_id=worker_id,
            status=status,
        )


class InvalidTransition(RegistryError):
    """A status change the worker lifecycle does not allow."""

    def __init__(self, worker_id: str, current: str, target: str, allowed: str) -> None:
        super().__init__(
            f"worker {worker_id!r} cannot go from {current} to {target} (allowed from {current}: {allowed})",
            worker_id=worker_id,
            current=current,
            target=target,
        )


class HeartbeatFailed(RegistryError):
    """A heartbeat the registry refused: the worker was deregistered (by itself, an operator or
    the API). A running worker registers again under its id; an HTTP client gets 409."""

    def __init__(self, worker_id: str, status: str) -> None:
        super().__init__(
            f"heartbeat of {worker_id!r} refused: the worker is {status} (register it again to report as live)",
            worker_id=worker_id,
            status=status,
        )


class RegistrationFailed(WorkerStartupError):
    """The worker could not register after the configured number of attempts."""


class StepWaitTimeout(TaskerError, TimeoutError):
    """``wait_for`` gave up: the step has no outcome yet (it may still be queued or running)."""

    def __init__(self, step_uuid: str, timeout: float) -> None:
        super().__init__(
            f"step {step_uuid} has no outcome after {timeout:g}s (it may still be queued or running; "
            "`tasker-worker steps show` tells)",
            step_uuid=step_uuid,
        )


# --- step outcomes, raised by handlers or the runtime ---------------------------------------


class StepError(TaskerError):
    """Base of the errors that decide what happens to a step."""

    #: Short machine-readable reason recorded in the outcome row and DLQ headers.
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None, **detail: Any) -> None:
        super().__init__(message, **detail)
        if reason is not None:
            self.reason = reason

    def to_json(self) -> dict[str, Any]:
        """The error as recorded in ``tasker.step_results.error`` and DLQ headers."""
        out: dict[str, Any] = {
            "type": type(self).__name__,
            "reason": self.reason,
            "message": self.message,
        }
        if self.detail:
            out["detail"] = _jsonable(self.detail)
        return out


class RetryableError(StepError):
    """A transient failure: the step goes back to its queue with backoff."""

    reason = "retryable_error"


class NonRetryableError(StepError):
    """A failure no retry can fix: the message is dead-lettered at once."""

    reason = "non_retryable_error"


class StepValidationError(NonRetryableError):
    """The step message or its inputs are invalid (dead-lettered with the reason)."""

    reason = "validation_error"


class UnknownHandler(NonRetryableError):
    """No handler of that name is registered anywhere in this worker."""

    reason = "unknown_handler"


class StepFailed(StepError):
    """A definitive business failure (e.g. ``no_path``): recorded as ``failed``, not retried,
    and not dead-lettered, because nothing is wrong with the system."""

    reason = "failed"


class DependencyUnavailable(StepError):
    """A dependency of the handler is down: the step is released with backoff without using
    up an attempt."""

    reason = "dependency_unavailable"


class StepTimeout(RetryableError):
    """The handler ran past its timeout."""

    reason = "timeout"


class Snooze(Exception):
    """Put the step back for ``delay`` (``"30s"``, seconds, or a timedelta) without using an
    attempt and without a failure: the handler is waiting for something. Raise it, or return
    ``ctx.snooze(delay)``. A handler's ``max_snoozes`` (``[retry] max_snoozes``) bounds how often."""

    def __init__(self, delay: Any) -> None:
        super().__init__(f"snoozed for {delay}")
        self.delay = delay


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def tasker_error_in(exc: BaseException) -> TaskerError | None:
    """The first ``TaskerError`` in ``exc`` or in the exception groups nested in it (a task
    group reports a failing task's error wrapped in a group)."""
    if isinstance(exc, TaskerError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = tasker_error_in(inner)
            if found is not None:
                return found
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none), for logs
    and one-line error reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
