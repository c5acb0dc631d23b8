"""Flow control of a namespace: pause, fleet-wide limits, a rate, priorities and groups.

The settings live in the database (``tasker.queue_flow``, migration 0016) and are applied
inside the claim, so every worker obeys them at its next claim with no restart and no
check-then-claim race. This module holds their types and the rules that need no I/O: how a
rate is written (``20/s``), what a claim that took fewer steps than asked was held back by
(``FlowHold``), and the order a claim takes steps in (``claim_order``), which the in-memory store
of ``tasker_worker.testing`` follows too.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from tasker_worker.errors import UsageError

#: Priorities run from 0 (first) to 9 (last); a step without one has 0.
MIN_PRIORITY = 0
MAX_PRIORITY = 9
#: A group or concurrency key is a short string (a tenant, an account).
MAX_KEY_LEN = 128
#: A claim of a namespace with groups looks at this many groups at most.
MAX_GROUPS_PER_CLAIM = 1000

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` starts per ``period_s`` seconds, fleet-wide, at most ``burst`` at once."""

    count: int
    period_s: float
    #: How many may start at once after a quiet spell (the token bucket's size): in any window
    #: of ``t`` seconds at most ``burst + count * t / period_s`` steps start.
    burst: int = 1

    @classmethod
    def parse(cls, text: str, burst: int | None = None) -> Rate:
        """``"20/s"``, ``"100/m"``, ``"5/h"``, ``"30/10s"`` (30 per 10 seconds)."""
        match = _RATE.match(text.lower())
        if match is None or match.group(3) not in _UNITS:
            raise UsageError(f"rate {text!r}: write it as COUNT/UNIT, e.g. 20/s, 100/m, 5/h or 30/10s")
        count = int(match.group(1))
        every = int(match.group(2) or 1)
        if count < 1 or every < 1:
            raise UsageError(f"rate {text!r}: the count and the period must be at least 1")
        if burst is not None and burst < 1:
            raise UsageError("the burst must be at least 1")
        return cls(count, every * _UNITS[match.group(3)], burst or 1)

    @property
    def per_second(self) -> float:
        """Starts per second."""
        return self.count / self.period_s

    def __str__(self) -> str:
        for unit, seconds in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
            if self.period_s == seconds:
                return f"{self.count}/{unit}"
        return f"{self.count}/{self.period_s:g}s"


@dataclass(frozen=True, slots=True)
class QueueFlow:
    """The flow control in force for one namespace (a row of ``tasker.queue_flow``)."""

    namespace: str
    paused: bool = False
    max_running: int | None = None
    key_max_running: int | None = None
    rate: Rate | None = None
    uses_priority: bool = False
    uses_groups: bool = False
    changed_at: datetime | None = None
    changed_by: str | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> QueueFlow:
        """From ``queries.QUEUE_FLOW``'s columns."""
        (ns, paused, max_running, key_max, rate_count, rate_period, burst, prio, groups, at, by) = row
        rate = Rate(int(rate_count), float(rate_period), int(burst or 1)) if rate_count else None
        return cls(ns, bool(paused), max_running, key_max, rate, bool(prio), bool(groups), at, by)

    @property
    def limited(self) -> bool:
        """Whether a limit is counted at every claim (under the namespace's lock)."""
        return self.max_running is not None or self.key_max_running is not None or self.rate is not None

    def describe(self, *, pause: bool = True) -> str:
        """One line: what holds the namespace back, and how it is ordered (``pause=False``:
        leave the pause out, for a page that shows it apart)."""
        parts = ["paused"] if self.paused and pause else []
        if self.max_running is not None:
            parts.append(f"max running {self.max_running}")
        if self.key_max_running is not None:
            parts.append(f"max running per key {self.key_max_running}")
        if self.rate is not None:
            parts.append(f"rate {self.rate} (burst {self.rate.burst})")
        if self.uses_priority:
            parts.append("by priority")
        if self.uses_groups:
            parts.append("round-robin across groups")
        return ", ".join(parts) or "no limit"

    def as_json(self) -> dict[str, Any]:
        """The API's and ``--json``'s shape."""
        return {
            "namespace": self.namespace,
            "paused": self.paused,
            "max_running": self.max_running,
            "key_max_running": self.key_max_running,
            "rate": None
            if self.rate is None
            else {"count": self.rate.count, "period_s": self.rate.period_s, "burst": self.rate.burst},
            "uses_priority": self.uses_priority,
            "uses_groups": self.uses_groups,
            "changed_at": self.changed_at.isoformat() if self.changed_at else None,
            "changed_by": self.changed_by,
        }


class HoldReason(enum.StrEnum):
    """Why a claim took fewer steps than it asked for although steps were ready."""

    PAUSED = "paused"
    LIMITED = "limited"


@dataclass(frozen=True, slots=True)
class FlowHold:
    """A claim held back by flow control."""

    reason: HoldReason
    #: Seconds until the rate allows the next start (None: when a slot frees, or on resume).
    retry_after_s: float | None = None


_T = TypeVar("_T")


class ClaimBatch(list[_T]):
    """The messages a claim took, and (``hold``) what held back the ones it did not take."""

    __slots__ = ("hold",)

    def __init__(self, items: Iterable[_T] = (), hold: FlowHold | None = None) -> None:
        super().__init__(items)
        self.hold = hold


def claim_order(candidates: Iterable[tuple[int, int, str]], *, groups: bool) -> list[int]:
    """The order a flow-controlled claim takes ready steps in, given ``(msg_id, priority,
    group)``: lowest priority value first; within a priority, oldest first, or with ``groups``
    round-robin across the groups (each group's oldest, then each group's second, ...).
    What ``tasker.claim_flow`` orders by, for the in-memory store."""
    rows = sorted(candidates, key=lambda c: (c[1], c[0]))
    if not groups:
        return [c[0] for c in rows]
    turn: dict[tuple[int, str], int] = {}
    ranked = []
    for msg_id, priority, group in rows:
        n = turn.get((priority, group), 0) + 1
        turn[(priority, group)] = n
        ranked.append((priority, n, msg_id))
    return [msg_id for _, _, msg_id in sorted(ranked)]


def step_priority(body: Any) -> int:
    """A message body's priority as the claim reads it (``tasker.step_priority``)."""
    value = body.get("priority") if isinstance(body, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return MIN_PRIORITY
    return max(MIN_PRIORITY, min(MAX_PRIORITY, math.floor(value)))


def step_group(body: Any) -> str:
    """A message body's group as the claim reads it (``tasker.step_group``; '' for none)."""
    value = body.get("group") if isinstance(body, dict) else None
    return value if isinstance(value, str) else ""


def step_concurrency_key(body: Any) -> str:
    """A message body's concurrency key (``tasker.step_concurrency_key``; '' for none)."""
    value = body.get("concurrency_key") if isinstance(body, dict) else None
    return value if isinstance(value, str) else ""


__all__ = [
    "MAX_GROUPS_PER_CLAIM",
    "MAX_KEY_LEN",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "ClaimBatch",
    "FlowHold",
    "HoldReason",
    "QueueFlow",
    "Rate",
    "claim_order",
    "step_concurrency_key",
    "step_group",
    "step_priority",
]
