"""Per-worker statistics: counters, bounded latency samples and histograms."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tasker_worker.domain.steps import Source

COUNTERS = (
    "notifications_received",
    "claims_event",
    "claims_poll",
    "claims_timed_out",
    "queue_probes",
    "claimed_event",
    "claimed_poll",
    "missed_wakeups",
    "lapsed_claims",
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
    "claims_held",
    "prefetch_expired",
    "snoozed",
    "cancel_requests",
    "tasker_core_steps_left",
)


#: Seconds: from a fast claim (a millisecond) to a slow handler (minutes).
DURATION_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
#: Messages per claim (a claim takes at most 1000).
CLAIM_SIZE_BUCKETS: tuple[float, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Histogram:
    """Counts per bucket and a sum, as Prometheus histograms keep them (``le``: inclusive upper
    bounds). One ``bisect`` and two additions per observation: cheap enough for every step."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        """Observations so far."""
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``[(le, cumulative count), ...]`` ending with ``("+Inf", count)``."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), float(running)))
        out.append(("+Inf", float(running + self.counts[-1])))
        return out


@dataclass
class HistogramSeries:
    """One histogram metric of this process: its series by label values."""

    name: str
    help: str
    labels: tuple[str, ...]
    series: dict[tuple[str, ...], Histogram]


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
        # Series are keyed by handler names (registered, so bounded) and fixed outcome words.
        self.handler_seconds: dict[tuple[str, ...], Histogram] = {}
        self.claim_seconds = Histogram(DURATION_BUCKETS)
        self.claim_size = Histogram(CLAIM_SIZE_BUCKETS)
        self.write_seconds: dict[tuple[str, ...], Histogram] = {}

    def incr(self, name: str, by: int = 1) -> None:
        """Add to a counter."""
        self.counters[name] = self.counters.get(name, 0) + by

    def observe_handler(self, handler: str, outcome: str, seconds: float) -> None:
        """One handler run: ``outcome`` is succeeded, failed (StepFailed), timed_out or error."""
        self.handler_duration.append(seconds)
        hist = self.handler_seconds.get((handler, outcome))
        if hist is None:
            hist = self.handler_seconds[(handler, outcome)] = Histogram(DURATION_BUCKETS)
        hist.observe(seconds)

    def observe_claim(self, seconds: float, size: int) -> None:
        """One claim statement: its round trip and how many messages it brought."""
        self.claim_seconds.observe(seconds)
        self.claim_size.observe(size)

    def observe_write(self, kind: str, seconds: float) -> None:
        """One batched write of results (settle, retry, dead letter, ...): its round trip."""
        hist = self.write_seconds.get((kind,))
        if hist is None:
            hist = self.write_seconds[(kind,)] = Histogram(DURATION_BUCKETS)
        hist.observe(seconds)

    def histograms(self) -> list[HistogramSeries]:
        """Every histogram of this process, for ``/metrics``."""
        return [
            HistogramSeries(
                "tasker_handler_duration_seconds",
                "Handler run time, by handler and outcome",
                ("handler", "outcome"),
                dict(self.handler_seconds),
            ),
            HistogramSeries(
                "tasker_claim_duration_seconds", "Round trip of one claim statement", (), {(): self.claim_seconds}
            ),
            HistogramSeries("tasker_claim_batch_size", "Messages brought by one claim", (), {(): self.claim_size}),
            HistogramSeries(
                "tasker_settle_duration_seconds",
                "Round trip of one batched write of step results, by kind",
                ("kind",),
                dict(self.write_seconds),
            ),
        ]

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
            "handler_last_minute": self.last_minute(),
        }

    def last_minute(self) -> dict[str, Any]:
        """Handler runs, errors and the error rate over the last minute."""
        runs, errors = self.handler_outcomes.totals()
        return {"runs": runs, "errors": errors, "error_rate": round(errors / runs if runs else 0.0, 4)}
