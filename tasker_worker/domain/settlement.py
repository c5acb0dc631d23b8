"""How a step ends: one value for each way, and one answer for how its write went.

The rulebook (``domain/verdicts.py``) turns what happened to a step into a ``Settlement``; the
outcome writer (``runtime/writer.py``) applies it with one call and answers with ``Written``.
A new way for a step to end (a snooze, a cancel, a put-back for a limit, a prefetched step given
back) is a new value here, not a new code path there.

==============  ==========================================================================
``Record``      outcome row + settle (fenced DELETE, archived where configured); a
                ``status`` of None only settles (the step's outcome was recorded before)
``DeadLetter``  outcome row + move to ``<queue>_dlq`` with the error in its headers
``PutBack``     back to the queue after ``delay_s`` (fenced), counting an attempt or not,
                with the step event it is (``StepFailed``, ``StepAssignmentRejected``, ...)
==============  ==========================================================================
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from tasker_worker.domain.steps import OutcomeStatus


class Written(enum.Enum):
    """How the write that ended a step went."""

    #: It went through: the step is settled, dead-lettered or back in its queue.
    APPLIED = "applied"
    #: Refused by the fence: the message was claimed again since (our vt lapsed), so nothing
    #: of this claim was written (a stale ack).
    FENCED = "fenced"
    #: Nothing was written (the database stayed unavailable, a commit in doubt, an error inside
    #: the runtime): the message comes back at its vt, where a claim finds it again.
    NOT_WRITTEN = "not_written"


@dataclass(frozen=True, slots=True)
class Record:
    """Settle the message and record the step's outcome row (at most one per step_uuid)."""

    #: None: only settle (the outcome of this step_uuid was recorded before).
    status: OutcomeStatus | None
    result: Any = None
    error: dict[str, Any] | None = None
    #: Epoch seconds (``time.time()``): cheaper on the hot path than datetimes.
    started_at: float | None = None
    finished_at: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the message to ``<queue>_dlq`` with ``error`` and record the outcome row."""

    #: ``dead_lettered`` (never runnable) or ``failed`` (its attempts exhausted).
    status: OutcomeStatus
    error: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None


#: The longest a put-back can delay a message: the statement takes whole milliseconds as a
#: PostgreSQL integer (int4), so 2**31 - 1 ms, about 24.8 days. A longer delay (a backoff whose
#: ``max_delay`` says more) is this long instead of failing its whole batch of put-backs.
MAX_PUT_BACK_S = (2**31 - 1) / 1000


def put_back_ms(delay_s: float) -> int:
    """``delay_s`` as the whole milliseconds a put-back takes: within 0..``MAX_PUT_BACK_S``
    (NaN: 0), never an int4 overflow."""
    if not delay_s > 0:  # also NaN
        return 0
    return int(min(delay_s, MAX_PUT_BACK_S) * 1000)


@dataclass(frozen=True, slots=True)
class PutBack:
    """Give the message back to its queue, visible again after ``delay_s``."""

    delay_s: float
    #: False: the attempt is given back (read_ct decremented), as for a release.
    count_attempt: bool
    #: The step event this put-back is, appended in its transaction when it applies.
    event: str | None = None
    event_data: dict[str, Any] | None = None
    #: Merged into the message's headers (``tasker_last_error``, ``tasker_releases``, ...).
    headers: dict[str, Any] | None = None
    #: The worker counter it adds one to when it applies (``retried``, ``released``).
    counter: str | None = None
    #: Tell the listening workers when it is ready again (no INSERT announces a put-back).
    announce: bool = False
    #: This worker leaves the message to others for this long after it is due (a step given
    #: back for a capable worker); None: this worker comes back for it when it is due.
    leave_alone_s: float | None = None


#: What a step can end with.
Settlement = Record | DeadLetter | PutBack

#: The step's outcome was recorded before (a duplicate): only settle its message.
SETTLE_ONLY = Record(None)


__all__ = ["SETTLE_ONLY", "DeadLetter", "PutBack", "Record", "Settlement", "Written"]
