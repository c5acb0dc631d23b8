"""The worker's health monitor (``[event_system] health_monitoring_enabled``).

Every ``health_check_interval`` the worker judges its own figures with the checks
``/health/detailed`` uses for a worker (listener, missed wakeups, handler error rate, open
circuits), logs each change of verdict with its reasons, and keeps the last report for its status
(and so for its heartbeat). It reads only the worker's memory: no database round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import anyio

from tasker_worker.domain.health import Health, HealthReport, Thresholds, WorkerFigures, judge_worker

log = logging.getLogger(__name__)


class HealthMonitor:
    """Judges a worker's own health at an interval and says when the verdict changes."""

    def __init__(self, figures: Callable[[], WorkerFigures], limits: Thresholds, interval_s: float) -> None:
        self._figures = figures
        self.limits = limits
        self.interval_s = interval_s
        self.last: HealthReport | None = None
        self.checked_at: float | None = None
        self.checks_run = 0

    def check(self) -> HealthReport:
        """Judge now; log a change of verdict (worse at WARNING, back to healthy at INFO)."""
        report = judge_worker(self._figures(), self.limits)
        previous = self.last.status if self.last is not None else Health.HEALTHY
        if report.status is not previous:
            level = logging.INFO if report.status is Health.HEALTHY else logging.WARNING
            reasons = "; ".join(report.reasons) or "every check passes"
            log.log(level, "health %s -> %s: %s", previous.value, report.status.value, reasons)
        self.last = report
        self.checked_at = time.monotonic()
        self.checks_run += 1
        return report

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled; a failing check is logged, not fatal."""
        while True:
            await anyio.sleep(self.interval_s)
            try:
                self.check()
            except Exception:
                log.exception("health check failed")

    def status(self) -> dict[str, Any]:
        """The last verdict, its reasons and how long ago it was reached."""
        if self.last is None:
            return {"status": None, "reasons": [], "checks_run": 0}
        assert self.checked_at is not None
        return {
            "status": self.last.status.value,
            "reasons": self.last.reasons,
            "checked_s_ago": round(time.monotonic() - self.checked_at, 3),
            "checks_run": self.checks_run,
        }
