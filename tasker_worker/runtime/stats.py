"""Per-worker statistics: counters and bounded latency samples."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasker_worker.domain.steps import Source

COUNTERS = (
    "notifications_received",
    "claims_event",
    "claims_poll",
    "queue_probes",
    "claimed_event",
    "claimed_poll",
    "missed_wakeups",
    "claims_deferred",
    "claims_taken_over",
    "claims_left_to_peers",
    "processed",
    "succeeded",
    "failed",
    "retried",
    "released",
    "dead_lettered",
    "dedup_hits",
    "stale_acks",
    "vt_extensions",
    "vt_extensions_refused",
    "listener_reconnects",
    "db_errors",
    "timers_dropped",
    "handler_errors",
    "rejections",
    "internal_errors",
)


def percentiles(samples: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ms, ...}`` of samples in seconds (``None`` when empty)."""
    arr = np.fromiter(samples, dtype=float)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    values = np.percentile(arr, qs) * 1000.0
    return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}


class OutcomeWindow:
    """Handler successes and errors per second over the last ``seconds`` (bounded: one
    bucket per second), for the error rate that ``/health/detailed`` judges."""

    def __init__(self, seconds: int = 60, clock: Any = time.monotonic) -> None:
        self.seconds = seconds
        self._clock = clock
        self._buckets: deque[list[int]] = deque(maxlen=seconds)  # [second, ok, errors]

    def record(self, ok: bool) -> None:
        """Count one handler run."""
        second = int(self._clock())
        if not self._buckets or self._buckets[-1][0] != second:
            self._buckets.append([second, 0, 0])
        self._buckets[-1][1 if ok else 2] += 1

    def totals(self) -> tuple[int, int]:
        """``(runs, errors)`` within the window."""
        horizon = int(self._clock()) - self.seconds
        runs = errors = 0
        for second, ok, err in self._buckets:
            if second > horizon:
                runs += ok + err
                errors += err
        return runs, errors

    def error_rate(self) -> float:
        """Errors / runs in the window (0 when nothing ran)."""
        runs, errors = self.totals()
        return errors / runs if runs else 0.0


@dataclass
class WorkerStats:
    """Counters plus the last ``window`` latency samples per kind."""

    window: int = 100_000
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    started_mono: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.queue_to_start: dict[Source, deque[float]] = {s: deque(maxlen=self.window) for s in Source}
        self.handler_duration: deque[float] = deque(maxlen=self.window)
        self.handler_outcomes = OutcomeWindow(60)

    def incr(self, name: str, by: int = 1) -> None:
        """Add to a counter."""
        self.counters[name] = self.counters.get(name, 0) + by

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able view: counters, rates and latency percentiles (ms)."""
        uptime = time.monotonic() - self.started_mono
        return {
            "uptime_s": round(uptime, 3),
            "counters": dict(self.counters),
            "processed_per_s": round(self.counters["processed"] / uptime, 2) if uptime > 0 else 0.0,
            "queue_to_start_ms": {s.value: percentiles(self.queue_to_start[s]) for s in Source},
            "queue_to_start_samples": {s.value: len(self.queue_to_start[s]) for s in Source},
            "handler_ms": percentiles(self.handler_duration),
            "handler_last_minute": dict(
                zip(("runs", "errors"), self.handler_outcomes.totals(), strict=True),
                error_rate=round(self.handler_outcomes.error_rate(), 4),
            ),
        }
