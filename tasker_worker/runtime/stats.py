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
    "claimed_event",
    "claimed_poll",
    "missed_wakeups",
    "processed",
    "succeeded",
    "failed",
    "retried",
    "released",
    "dead_lettered",
    "dedup_hits",
    "stale_acks",
    "vt_extensions",
    "listener_reconnects",
    "db_errors",
    "timers_dropped",
    "handler_errors",
    "rejections",
)


def percentiles(samples: Any, qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """``{"p50": ms, ...}`` of samples in seconds (``None`` when empty)."""
    arr = np.fromiter(samples, dtype=float)
    if arr.size == 0:
        return {f"p{q:g}": None for q in qs}
    values = np.percentile(arr, qs) * 1000.0
    return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}


@dataclass
class WorkerStats:
    """Counters plus the last ``window`` latency samples per kind."""

    window: int = 100_000
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    started_mono: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.queue_to_start: dict[Source, deque[float]] = {s: deque(maxlen=self.window) for s in Source}
        self.handler_duration: deque[float] = deque(maxlen=self.window)

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
        }
