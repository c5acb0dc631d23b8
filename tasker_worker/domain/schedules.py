"""When periodic work is due: ticks of an interval (``every``) or a cron expression.

Ticks are instants every worker computes alike (an interval's ticks are its multiples since
the Unix epoch, in UTC; a cron expression is read in UTC), so that a schedule run once per fleet
can name each tick's step the same way on every worker: ``tick_step_uuid`` is derived from the
schedule's name and the tick, and ``tasker.enqueue_step`` sends a step_uuid once.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from croniter import croniter

from tasker_worker.errors import UsageError

#: The namespace of tick step_uuids (uuid5): fixed, so every worker derives the same ids.
TICK_NAMESPACE = uuid.UUID("6f1b6d3e-4f0e-5c9a-9a52-7d3c1f2b8e40")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Cadence:
    """An interval or a cron expression (exactly one)."""

    every: timedelta | None = None
    cron: str | None = None

    def __post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            raise UsageError("periodic work needs exactly one of every= and cron=")
        if self.every is not None and self.every.total_seconds() < 0.01:
            raise UsageError("periodic work needs an interval of at least 10ms")
        if self.cron is not None and not croniter.is_valid(self.cron):
            raise UsageError(f"not a cron expression: {self.cron!r} (five fields, e.g. '*/5 * * * *')")

    def next_tick(self, after: datetime) -> datetime:
        """The first tick strictly after ``after``."""
        after = after.astimezone(UTC)
        if self.every is not None:
            n = (after - _EPOCH) // self.every
            return _EPOCH + (n + 1) * self.every
        assert self.cron is not None
        tick: datetime = croniter(self.cron, after).get_next(datetime)
        return tick.astimezone(UTC)

    def last_tick(self, at: datetime) -> datetime:
        """The latest tick at or before ``at``."""
        at = at.astimezone(UTC)
        if self.every is not None:
            return _EPOCH + ((at - _EPOCH) // self.every) * self.every
        assert self.cron is not None
        # croniter's get_prev is strictly before: step a microsecond past ``at``.
        tick: datetime = croniter(self.cron, at + timedelta(microseconds=1)).get_prev(datetime)
        return tick.astimezone(UTC)


def tick_step_uuid(schedule: str, tick: datetime) -> uuid.UUID:
    """The step_uuid of ``schedule``'s run at ``tick``: the same on every worker."""
    return uuid.uuid5(TICK_NAMESPACE, f"{schedule}@{tick.astimezone(UTC).isoformat()}")


def tick_handler(schedule: str) -> str:
    """The handler name of a fleet-wide schedule's steps."""
    return f"periodic:{schedule}"
