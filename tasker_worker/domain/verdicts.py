"""What a handler's exception means for its step: the one rulebook.

The processor (against PostgreSQL) and ``tasker_worker.testing.HandlerHarness`` (in memory)
both ask ``decide_failure`` (the verdict and the error recorded with it) and ``step_timeout``,
so a handler tested with the harness meets the same retries, releases, dead letters and error
records in production.

==========================  ===========================================================
``StepFailed``              FAILED: outcome ``failed``, message settled
``NonRetryableError``       DEAD_LETTER: outcome ``dead_lettered``, message to the DLQ
unavailable dependency      RELEASE: back after a backoff, the attempt given back, at most
                            ``max_releases`` times (then it counts like any error)
outside a ``retry_on``      DEAD_LETTER (reason ``non_retryable_error``); a handler's
                            ``dlq=False`` records dead letters without the DLQ copy
anything else / timeout     RETRY after a backoff, or EXHAUSTED (outcome ``failed``, DLQ)
                            once ``attempt`` reached the limit
==========================  ===========================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, cast

from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.errors import NonRetryableError, RetryableError, StepError, StepFailed, StepTimeout


class VerdictKind(enum.StrEnum):
    """What happens to the step's message."""

    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    RELEASE = "release"
    RETRY = "retry"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class RetryPolicy:
    """``[retry]`` as the rulebook needs it, with a handler's own overrides applied."""

    max_attempts: int = 3
    base_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(seconds=30)
    jitter: float = 0.2
    max_releases: int = 100
    #: Exceptions retried (``RetryableError``, timeouts included, always are); any other is
    #: dead-lettered at once. None: every exception is retried.
    retry_on: tuple[type[BaseException], ...] | None = None
    #: Dead letters (and exhausted retries) go to the DLQ; False: the outcome is recorded and
    #: the message deleted, with no DLQ copy.
    dlq: bool = True

    @classmethod
    def from_settings(cls, retry: Any) -> RetryPolicy:
        """From a ``[retry]`` section (``RetryConfig``)."""
        return cls(retry.max_attempts, retry.base_delay, retry.max_delay, retry.jitter, retry.max_releases)

    def describe(self) -> str:
        """One line for ``config show``."""
        retry_on = "any exception" if self.retry_on is None else ", ".join(t.__name__ for t in self.retry_on)
        return (
            f"max_attempts={self.max_attempts} backoff={self.base_delay.total_seconds():g}s.."
            f"{self.max_delay.total_seconds():g}s retry_on={retry_on} dlq={'yes' if self.dlq else 'no'}"
        )


@dataclass(frozen=True)
class HandlerPolicy:
    """What a handler says about its failures (``@worker.handler(..., max_attempts=5,
    backoff=("10s", "10m"), retry_on=(...), dlq=False)``); unset fields keep ``[retry]``'s.
    A message's ``attempt_limit`` still beats ``max_attempts``."""

    max_attempts: int | None = None
    base_delay: timedelta | None = None
    max_delay: timedelta | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    dlq: bool = True

    def applied_to(self, default: RetryPolicy) -> RetryPolicy:
        """``default`` with this handler's settings."""
        return replace(
            default,
            max_attempts=self.max_attempts or default.max_attempts,
            base_delay=self.base_delay or default.base_delay,
            max_delay=self.max_delay or default.max_delay,
            retry_on=self.retry_on if self.retry_on is not None else default.retry_on,
            dlq=self.dlq,
        )


@dataclass(frozen=True)
class Verdict:
    """The decision; ``delay_s`` for RETRY and RELEASE, ``releases`` the new release count."""

    kind: VerdictKind
    delay_s: float = 0.0
    releases: int = 0
    timed_out: bool = False


def judge_failure(
    exc: BaseException,
    *,
    attempt: int,
    attempt_limit: int | None,
    releases: int,
    policy: RetryPolicy,
    unavailable: bool,
) -> Verdict:
    """The verdict on a failed run.

    ``attempt`` counts from 1 (the message's read_ct); ``releases`` is how often the step was
    released before; ``unavailable`` says the failure was about a dependency rather than the
    step (``DependencyUnavailable``, or a broken database connection — the caller decides, so
    that this module needs no driver).
    """
    if isinstance(exc, StepFailed):
        return Verdict(VerdictKind.FAILED)
    if isinstance(exc, NonRetryableError):
        return Verdict(VerdictKind.DEAD_LETTER)
    if unavailable and releases + 1 <= policy.max_releases:
        delay = backoff_delay(releases + 1, policy.base_delay, policy.max_delay, policy.jitter)
        return Verdict(VerdictKind.RELEASE, delay, releases + 1)
    if policy.retry_on is not None and not isinstance(exc, (RetryableError, *policy.retry_on)):
        return Verdict(VerdictKind.DEAD_LETTER)
    timed_out = isinstance(exc, StepTimeout)
    if attempt >= (attempt_limit or policy.max_attempts):
        return Verdict(VerdictKind.EXHAUSTED, timed_out=timed_out)
    delay = backoff_delay(attempt, policy.base_delay, policy.max_delay, policy.jitter)
    return Verdict(VerdictKind.RETRY, delay, releases, timed_out)


@dataclass(frozen=True)
class Fate:
    """A failed run's verdict and the error recorded with it (outcome row, DLQ headers, or the
    ``tasker_last_error`` header of a retried message)."""

    verdict: Verdict
    error: dict[str, Any]


def error_json(exc: BaseException) -> dict[str, Any]:
    """How a handler's exception is recorded: a ``StepError``'s own JSON, else its type and
    message under reason ``handler_error`` (storable as jsonb either way: see ``jsonb_safe``)."""
    if isinstance(exc, StepError):
        error = exc.to_json()
    else:
        error = {"type": type(exc).__name__, "reason": "handler_error", "message": str(exc)[:2000]}
    return cast(dict[str, Any], jsonb_safe(error))


def jsonb_safe(value: Any) -> Any:
    """``value`` with every NUL character in its strings (keys too) replaced by U+FFFD:
    PostgreSQL's jsonb refuses ``\\u0000``, and one such string would fail the whole batch of
    outcomes it is written with. Values without one come back as they are."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, dict):
        return {jsonb_safe(k) if isinstance(k, str) else k: jsonb_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonb_safe(v) for v in value]
    return value


def decide_failure(
    exc: BaseException,
    *,
    attempt: int,
    attempt_limit: int | None,
    releases: int,
    policy: RetryPolicy,
    unavailable: bool,
) -> Fate:
    """``judge_failure``, plus the error to record: when the attempts are exhausted, reason
    ``retries_exhausted`` with the last run's reason as ``last_reason`` and the attempts made."""
    verdict = judge_failure(
        exc, attempt=attempt, attempt_limit=attempt_limit, releases=releases, policy=policy, unavailable=unavailable
    )
    error = error_json(exc)
    if verdict.kind is VerdictKind.DEAD_LETTER and not isinstance(exc, NonRetryableError):
        # Not among the handler's retry_on.
        error = {**error, "reason": "non_retryable_error", "last_reason": error.get("reason")}
    if verdict.kind is VerdictKind.EXHAUSTED:
        error = {**error, "reason": "retries_exhausted", "last_reason": error.get("reason"), "attempts": attempt}
    return Fate(verdict, error)


def step_timeout(step_timeout_s: float | None, handler_timeout: timedelta | None, default: timedelta) -> timedelta:
    """How long a run may take: the step's own ``timeout`` wins, then the handler's, then
    ``[worker] handler_timeout``."""
    if step_timeout_s is not None:
        return timedelta(seconds=step_timeout_s)
    return handler_timeout or default


__all__ = [
    "Fate",
    "RetryPolicy",
    "Verdict",
    "VerdictKind",
    "decide_failure",
    "error_json",
    "jsonb_safe",
    "judge_failure",
    "step_timeout",
]
