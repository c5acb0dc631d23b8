"""What happens to a step: the one rulebook.

Every way a step ends is decided here and nowhere else, as a ``Settlement`` value
(``domain/settlement.py``): ``after_success``, ``after_failure`` (from ``decide_failure``: the
verdict on a handler's exception and the error recorded with it), ``not_a_step``,
``left_for_tasker_core``, ``no_such_handler``, ``running_here_already``, ``held_by_circuit``,
``lacking_capability`` and ``released``. The step runner (``runtime/steps.py``) asks these and hands the answer to the
outcome writer; ``tasker_worker.testing.HandlerHarness`` runs that same runner on an in-memory
store, so a handler tested with the harness meets the same retries, releases, dead letters and
error records in production.

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
import math
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, cast

from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.domain.settlement import DeadLetter, PutBack, Record, Settlement
from tasker_worker.domain.steps import OutcomeStatus
from tasker_worker.domain.workers import WorkerEventType
from tasker_worker.errors import (
    NonRetryableError,
    RetryableError,
    StepError,
    StepFailed,
    StepTimeout,
    StepValidationError,
    UnknownHandler,
)

STEP_ASSIGNMENT_REJECTED = WorkerEventType.STEP_ASSIGNMENT_REJECTED.value
STEP_ASSIGNMENT_TIMED_OUT = WorkerEventType.STEP_ASSIGNMENT_TIMED_OUT.value
STEP_FAILED = WorkerEventType.STEP_FAILED.value

#: A second message of a step running here comes back after this (then finds its outcome).
DUPLICATE_RETRY_S = 1.0
#: A step given back for lack of a capability is not claimed again by the same worker for this
#: long after its release: time for a capable worker's poll to find it (a lacking worker whose
#: poll ticks line up with its own releases would otherwise win it back again and again).
LEAVE_REJECTED_S = 30.0
#: Release delays of a rejected step: exponential from 0.1 s to 5 s, with jitter.
REJECT_DELAY_BASE = timedelta(milliseconds=100)
REJECT_DELAY_CAP = timedelta(seconds=5)
#: A step held back by an open circuit comes back no sooner than this.
CIRCUIT_HOLD_MIN_S = 0.05
#: A tasker-core step given back is visible again after this: long enough that this worker has
#: noted it to be left alone before anyone can claim it again (a claim of a message still ending
#: here would be taken for a redelivery of it), short next to tasker-core's own poll, which takes
#: messages some seconds old.
GIVE_BACK_TASKER_CORE_S = 1.0
#: A tasker-core step is not claimed again by the worker that gave it back for this long: its
#: own workers have it meanwhile (a worker's poll would otherwise take it back every interval).
LEAVE_TASKER_CORE_S = 300.0
#: The counter of tasker-core steps given back (``tasker_worker_tasker_core_steps_left``).
TASKER_CORE_STEPS_LEFT = "tasker_core_steps_left"


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
    #: Snoozes (``Snooze``) per message, at most; one more fails the step.
    max_snoozes: int = 100
    #: Exceptions retried (``RetryableError``, timeouts included, always are); any other is
    #: dead-lettered at once. None: every exception is retried.
    retry_on: tuple[type[BaseException], ...] | None = None
    #: Dead letters (and exhausted retries) go to the DLQ; False: the outcome is recorded and
    #: the message deleted, with no DLQ copy.
    dlq: bool = True

    @classmethod
    def from_settings(cls, retry: Any) -> RetryPolicy:
        """From a ``[retry]`` section (``RetryConfig``)."""
        return cls(
            retry.max_attempts,
            retry.base_delay,
            retry.max_delay,
            retry.jitter,
            retry.max_releases,
            getattr(retry, "max_snoozes", 100),
        )

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
    max_snoozes: int | None = None

    def applied_to(self, default: RetryPolicy) -> RetryPolicy:
        """``default`` with this handler's settings."""
        return replace(
            default,
            max_attempts=self.max_attempts or default.max_attempts,
            base_delay=self.base_delay or default.base_delay,
            max_delay=self.max_delay or default.max_delay,
            retry_on=self.retry_on if self.retry_on is not None else default.retry_on,
            dlq=self.dlq,
            max_snoozes=self.max_snoozes if self.max_snoozes is not None else default.max_snoozes,
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


#: The verdicts that count as the handler's errors (``handler_errors``): the others are the
#: handler's own word on the step (``StepFailed``, ``NonRetryableError``, not in ``retry_on``).
HANDLER_ERROR_VERDICTS = frozenset({VerdictKind.RELEASE, VerdictKind.RETRY, VerdictKind.EXHAUSTED})


def after_success(result: Any, started_at: float | None = None, finished_at: float | None = None) -> Record:
    """The handler returned ``result``: record it."""
    return Record(OutcomeStatus.SUCCEEDED, result, None, started_at, finished_at)


def after_failure(
    fate: Fate, policy: RetryPolicy, started_at: float | None = None, finished_at: float | None = None
) -> Settlement:
    """What a failed run (``decide_failure``'s ``fate``) leads to under ``policy``."""
    verdict, error = fate.verdict, fate.error
    kind = verdict.kind
    if kind is VerdictKind.FAILED:
        return Record(OutcomeStatus.FAILED, None, error, started_at, finished_at)
    if kind is VerdictKind.DEAD_LETTER or kind is VerdictKind.EXHAUSTED:
        status = OutcomeStatus.DEAD_LETTERED if kind is VerdictKind.DEAD_LETTER else OutcomeStatus.FAILED
        if not policy.dlq:  # the handler keeps no DLQ copies: the outcome row is the record
            return Record(status, None, error, started_at, finished_at)
        return DeadLetter(status, error, started_at, finished_at)
    data = {"final": False, "reason": error.get("reason"), "retry_in_s": round(verdict.delay_s, 3)}
    if kind is VerdictKind.RELEASE:
        return PutBack(
            verdict.delay_s,
            count_attempt=False,
            event=STEP_FAILED,
            event_data=data,
            headers={"tasker_last_error": error, "tasker_releases": verdict.releases},
            counter="released",
        )
    return PutBack(
        verdict.delay_s,
        count_attempt=True,
        event=STEP_ASSIGNMENT_TIMED_OUT if verdict.timed_out else STEP_FAILED,
        event_data=data,
        headers={"tasker_last_error": error},
        counter="retried",
    )


def not_a_step(exc: StepValidationError) -> DeadLetter:
    """The message is not a valid step message (malformed JSON, a missing id, ...)."""
    return DeadLetter(OutcomeStatus.DEAD_LETTERED, error_json(exc))


def left_for_tasker_core() -> PutBack:
    """The message is a tasker-core step (``domain/steps.py``: ``is_tasker_core_step``): only a
    tasker-core worker can run it. Never dead-lettered: given back with its read count restored
    (no attempt used), visible again within a second, with no step event (it is not a step of
    ours), and left alone by this worker for a while."""
    return PutBack(
        GIVE_BACK_TASKER_CORE_S,
        count_attempt=False,
        counter=TASKER_CORE_STEPS_LEFT,
        leave_alone_s=LEAVE_TASKER_CORE_S,
    )


def no_such_handler(handler: str, known: list[str]) -> DeadLetter:
    """No handler of that name is registered here."""
    error = UnknownHandler(f"no handler {handler!r} in this worker (has: {', '.join(known)})")
    return DeadLetter(OutcomeStatus.DEAD_LETTERED, error_json(error))


def running_here_already() -> PutBack:
    """Another message of the same step runs here now: come back when it is done, then find its
    outcome recorded and settle without running."""
    return PutBack(
        DUPLICATE_RETRY_S,
        count_attempt=False,
        event=STEP_ASSIGNMENT_REJECTED,
        event_data={"reason": "duplicate_in_flight"},
    )


def held_by_circuit(handler: str, retry_after_s: float) -> PutBack:
    """The handler's circuit is open (or its probe is running): give the step back, no attempt
    used, until the circuit lets steps through again."""
    return PutBack(
        max(CIRCUIT_HOLD_MIN_S, retry_after_s),
        count_attempt=False,
        event=STEP_ASSIGNMENT_REJECTED,
        event_data={"reason": "circuit_open", "handler": handler},
        counter="released",
    )


def lacking_capability(capability: str, rejections: int, limit: int, someone_capable: bool) -> Settlement:
    """This worker lacks what the step needs (its ``rejections``-th time): give it back for a
    capable worker, or dead-letter it when nobody running offers it or it bounced too often."""
    if not someone_capable or rejections >= limit:
        reason = "no_capable_worker" if rejections < limit else "too_many_rejections"
        error = StepError(f"no running worker offers {capability} (rejected {rejections} times)", reason=reason)
        return DeadLetter(OutcomeStatus.DEAD_LETTERED, error.to_json())
    # Jitter keeps a fleet of lacking workers from coming back in step.
    return PutBack(
        backoff_delay(rejections, REJECT_DELAY_BASE, REJECT_DELAY_CAP),
        count_attempt=False,
        event=STEP_ASSIGNMENT_REJECTED,
        event_data={"reason": "missing_capability", "capability": capability, "rejections": rejections},
        headers={"tasker_rejections": rejections},
        counter="released",
        announce=True,
        leave_alone_s=LEAVE_REJECTED_S,
    )


def released(reason: str) -> PutBack:
    """Given back unfinished (``shutdown``): visible again at once, the attempt given back, and
    announced (no INSERT announces it to the workers that only listen)."""
    return PutBack(
        0.0,
        count_attempt=False,
        event=STEP_ASSIGNMENT_REJECTED,
        event_data={"reason": reason},
        counter="released",
        announce=True,
    )


#: A snooze is at most this long (the put-back's delay is whole milliseconds in an integer).
MAX_SNOOZE_S = 7 * 86_400.0


def snoozed(delay_s: float, snoozes: int, limit: int) -> Settlement:
    """The handler snoozed (its ``snoozes``-th time): back in ``delay_s`` (at most
    ``MAX_SNOOZE_S``) with the attempt given back and no failure event; past ``limit`` snoozes
    the step fails instead."""
    if not math.isfinite(delay_s) or delay_s > MAX_SNOOZE_S:
        delay_s = MAX_SNOOZE_S
    if snoozes > limit:
        error = StepError(f"snoozed {snoozes} times, more than max_snoozes {limit}", reason="too_many_snoozes")
        return Record(OutcomeStatus.FAILED, None, error.to_json())
    return PutBack(
        max(0.0, delay_s),
        count_attempt=False,
        event_data={"reason": "snoozed", "snoozes": snoozes},
        headers={"tasker_snoozes": snoozes},
        counter="snoozed",
    )


def cancelled(by: str | None, started_at: float | None = None, finished_at: float | None = None) -> Record:
    """Someone asked for the step to be cancelled while it was held here: whatever its handler
    did (stopped, or ran to its end), the outcome is ``cancelled``, naming who asked."""
    error = {"type": "Cancelled", "reason": "cancelled", "message": "cancelled while running", "by": by}
    return Record(OutcomeStatus.CANCELLED, None, error, started_at, finished_at)


def step_timeout(step_timeout_s: float | None, handler_timeout: timedelta | None, default: timedelta) -> timedelta:
    """How long a run may take: the step's own ``timeout`` wins, then the handler's, then
    ``[worker] handler_timeout``."""
    if step_timeout_s is not None:
        return timedelta(seconds=step_timeout_s)
    return handler_timeout or default


__all__ = [
    "HANDLER_ERROR_VERDICTS",
    "Fate",
    "RetryPolicy",
    "Verdict",
    "VerdictKind",
    "after_failure",
    "after_success",
    "cancelled",
    "decide_failure",
    "error_json",
    "held_by_circuit",
    "jsonb_safe",
    "judge_failure",
    "lacking_capability",
    "left_for_tasker_core",
    "no_such_handler",
    "not_a_step",
    "released",
    "running_here_already",
    "snoozed",
    "step_timeout",
]
