"""What a handler's exception means for its step: the one rulebook.

The processor (against PostgreSQL) and ``tasker_worker.testing.HandlerHarness`` (in memory)
both ask ``judge_failure``, so a handler tested with the harness meets the same retries,
releases and dead letters in production.

==========================  ===========================================================
``StepFailed``              FAILED: outcome ``failed``, message archived
``NonRetryableError``       DEAD_LETTER: outcome ``dead_lettered``, message to the DLQ
unavailable dependency      RELEASE: back after a backoff, the attempt given back, at most
                            ``max_releases`` times (then it counts like any error)
anything else / timeout     RETRY after a backoff, or EXHAUSTED (outcome ``failed``, DLQ)
                            once ``attempt`` reached the limit
==========================  ===========================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import timedelta

from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.errors import NonRetryableError, StepFailed, StepTimeout


class VerdictKind(enum.StrEnum):
    """What happens to the step's message."""

    FAILED = "failed"
    DEAD_LETTER = "dead_letter"
    RELEASE = "release"
    RETRY = "retry"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class RetryPolicy:
    """``[retry]`` as the rulebook needs it."""

    max_attempts: int = 3
    base_delay: timedelta = timedelta(seconds=1)
    max_delay: timedelta = timedelta(seconds=30)
    jitter: float = 0.2
    max_releases: int = 100


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
    timed_out = isinstance(exc, StepTimeout)
    if attempt >= (attempt_limit or policy.max_attempts):
        return Verdict(VerdictKind.EXHAUSTED, timed_out=timed_out)
    delay = backoff_delay(attempt, policy.base_delay, policy.max_delay, policy.jitter)
    return Verdict(VerdictKind.RETRY, delay, releases, timed_out)


__all__ = ["RetryPolicy", "Verdict", "VerdictKind", "judge_failure"]
