"""Health judgement: turn observed figures into healthy / degraded / unhealthy with reasons.

Pure: the API gathers the figures (from the local worker, the live workers' last heartbeat
statistics and the database) and this module decides. Each check says what it saw and why it
judged so, so that ``/health/detailed`` explains itself.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tasker_worker.domain.modes import DeploymentMode


class Health(enum.StrEnum):
    """Overall or per-check verdict, in increasing severity."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"


_RANK = {Health.HEALTHY: 0, Health.DEGRADED: 1, Health.UNHEALTHY: 2}

#: A handler error rate is judged only once this many runs happened in the minute.
MIN_RUNS_FOR_ERROR_RATE = 10
#: ``pg_notification_queue_usage()`` above this makes NOTIFY close to failing outright.
NOTIFY_QUEUE_CRITICAL = 0.9
#: A queue table with more dead than this many times its live rows (and at least
#: ``DEAD_TUPLES_FLOOR``) needs vacuum to catch up.
DEAD_TUPLE_RATIO = 10
DEAD_TUPLES_FLOOR = 10_000
#: Missed wakeups above this share of event claims mean NOTIFY is not doing its job.
MISSED_WAKEUP_RATIO = 0.1


@dataclass(frozen=True)
class Thresholds:
    """Limits from ``[api]``."""

    max_queue_age_s: float
    max_xmin_age_s: float
    max_error_rate: float
    max_notify_queue_usage: float


@dataclass
class Check:
    """One check's verdict."""

    name: str
    status: Health
    detail: str
    value: Any = None


@dataclass
class WorkerFigures:
    """What one worker reports (its status snapshot, local or from its last heartbeat)."""

    worker_id: str
    deployment_mode: str
    listener_healthy: bool | None  # None: this mode runs no listener
    last_notification_age_s: float | None
    missed_wakeups: int
    claimed_event: int
    handler_runs: int
    handler_errors: int
    #: Handlers whose circuit is open or half-open: {handler: {"state", "reason", ...}}.
    open_circuits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_status(cls, worker_id: str, snap: dict[str, Any]) -> WorkerFigures:
        """From ``Worker.status()`` (also what each heartbeat stores in ``tasker.workers.stats``)."""
        es = snap.get("event_system") or {}
        listener = es.get("listener")
        counters = snap.get("counters") or {}
        minute = snap.get("handler_last_minute") or {}
        return cls(
            worker_id=worker_id,
            deployment_mode=str(es.get("deployment_mode", "unknown")),
            listener_healthy=None if listener is None else bool(listener.get("healthy")),
            last_notification_age_s=None if listener is None else listener.get("last_notification_age_s"),
            missed_wakeups=int(counters.get("missed_wakeups", 0)),
            claimed_event=int(counters.get("claimed_event", 0)),
            handler_runs=int(minute.get("runs", 0)),
            handler_errors=int(minute.get("errors", 0)),
            open_circuits=dict(snap.get("circuits") or {}),
        )


@dataclass
class QueueFigures:
    """One queue as pgmq and the statistics collector see it."""

    queue: str
    depth: int
    oldest_age_s: float | None
    dlq_depth: int
    dead_tuples: int = 0
    live_tuples: int = 0


@dataclass
class DatabaseFigures:
    """The server's MVCC horizon and NOTIFY queue."""

    reachable: bool
    error: str | None = None
    oldest_xact_age_s: float = 0.0
    xmin_age_xids: int = 0
    notify_queue_usage: float = 0.0


@dataclass
class HealthReport:
    """The overall verdict and every check behind it."""

    status: Health
    checks: list[Check] = field(default_factory=list)

    @property
    def reasons(self) -> list[str]:
        """The details of every check that is not healthy."""
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status is not Health.HEALTHY]

    def to_json(self) -> dict[str, Any]:
        """The ``/health/detailed`` body."""
        return {
            "status": self.status.value,
            "reasons": self.reasons,
            "checks": [
                {"name": c.name, "status": c.status.value, "detail": c.detail, "value": c.value} for c in self.checks
            ],
        }


def judge(
    db: DatabaseFigures,
    workers: list[WorkerFigures],
    queues: list[QueueFigures],
    limits: Thresholds,
) -> HealthReport:
    """Every check, then the worst verdict overall."""
    checks: list[Check] = []
    if not db.reachable:
        checks.append(Check("database", Health.UNHEALTHY, f"unreachable: {db.error}"))
        return HealthReport(Health.UNHEALTHY, checks)
    checks.append(Check("database", Health.HEALTHY, "reachable"))
    checks.extend(_worker_checks(workers, limits))
    checks.extend(_queue_checks(queues, limits))
    checks.extend(_horizon_checks(db, limits))
    worst = max((c.status for c in checks), key=_RANK.__getitem__)
    return HealthReport(worst, checks)


def judge_worker(worker: WorkerFigures, limits: Thresholds) -> HealthReport:
    """One worker's own checks (listener, missed wakeups, error rate, circuits) and the worst
    verdict: what the worker's health monitor judges, without a database round trip."""
    checks = _worker_checks([worker], limits)
    worst = max((c.status for c in checks), key=_RANK.__getitem__, default=Health.HEALTHY)
    return HealthReport(worst, checks)


def thresholds_of(api: Any) -> Thresholds:
    """The limits of an ``[api]`` config section."""
    return Thresholds(
        max_queue_age_s=api.max_queue_age.total_seconds(),
        max_xmin_age_s=api.max_xmin_age.total_seconds(),
        max_error_rate=api.max_error_rate,
        max_notify_queue_usage=api.max_notify_queue_usage,
    )


def _worker_checks(workers: list[WorkerFigures], limits: Thresholds) -> list[Check]:
    out: list[Check] = []
    for w in workers:
        prefix = f"worker {w.worker_id}"
        if w.listener_healthy is not None:
            age = w.last_notification_age_s
            seen = "never" if age is None else f"{age:.1f}s ago"
            if w.listener_healthy:
                out.append(Check(f"{prefix} listener", Health.HEALTHY, f"connected; last notification {seen}", age))
            else:
                # Hybrid still claims through its (faster, degraded) poller; EventDrivenOnly cannot.
                verdict = Health.UNHEALTHY if w.deployment_mode == DeploymentMode.EVENT_DRIVEN_ONLY else Health.DEGRADED
                out.append(Check(f"{prefix} listener", verdict, f"disconnected; last notification {seen}", age))
        if w.claimed_event and w.missed_wakeups / max(1, w.claimed_event) > MISSED_WAKEUP_RATIO:
            out.append(
                Check(
                    f"{prefix} missed_wakeups",
                    Health.DEGRADED,
                    f"{w.missed_wakeups} messages found by polling that NOTIFY should have delivered "
                    f"({w.claimed_event} delivered by NOTIFY)",
                    w.missed_wakeups,
                )
            )
        else:
            out.append(Check(f"{prefix} missed_wakeups", Health.HEALTHY, f"{w.missed_wakeups}", w.missed_wakeups))
        rate = w.handler_errors / w.handler_runs if w.handler_runs else 0.0
        if w.handler_runs >= MIN_RUNS_FOR_ERROR_RATE and rate > limits.max_error_rate:
            out.append(
                Check(
                    f"{prefix} error_rate",
                    Health.DEGRADED,
                    f"{w.handler_errors}/{w.handler_runs} handler runs failed in the last minute "
                    f"(limit {limits.max_error_rate:.0%})",
                    round(rate, 4),
                )
            )
        else:
            out.append(
                Check(
                    f"{prefix} error_rate",
                    Health.HEALTHY,
                    f"{w.handler_errors}/{w.handler_runs} in the last minute",
                    round(rate, 4),
                )
            )
        for handler, circuit in sorted(w.open_circuits.items()):
            out.append(
                Check(
                    f"{prefix} circuit {handler}",
                    Health.DEGRADED,
                    f"{circuit.get('state')}: {circuit.get('reason')} (its steps wait; next probe in "
                    f"{circuit.get('retry_in_s', 0)}s)",
                    circuit,
                )
            )
    return out


def _queue_checks(queues: list[QueueFigures], limits: Thresholds) -> list[Check]:
    out: list[Check] = []
    for q in queues:
        age = q.oldest_age_s
        if age is not None and age > limits.max_queue_age_s:
            out.append(
                Check(
                    f"queue {q.queue}",
                    Health.DEGRADED,
                    f"oldest message waited {age:.0f}s (limit {limits.max_queue_age_s:.0f}s); depth {q.depth}",
                    age,
                )
            )
        else:
            out.append(Check(f"queue {q.queue}", Health.HEALTHY, f"depth {q.depth}; dlq {q.dlq_depth}", age))
        if q.dead_tuples > max(DEAD_TUPLES_FLOOR, DEAD_TUPLE_RATIO * q.live_tuples):
            out.append(
                Check(
                    f"queue {q.queue} dead_tuples",
                    Health.DEGRADED,
                    f"{q.dead_tuples} dead rows against {q.live_tuples} live: vacuum is behind "
                    "(a long transaction may be holding the horizon)",
                    q.dead_tuples,
                )
            )
    return out


def _horizon_checks(db: DatabaseFigures, limits: Thresholds) -> list[Check]:
    out: list[Check] = []
    if db.oldest_xact_age_s > limits.max_xmin_age_s:
        out.append(
            Check(
                "mvcc_horizon",
                Health.DEGRADED,
                f"a transaction holding backend_xmin has been open {db.oldest_xact_age_s:.0f}s "
                f"(limit {limits.max_xmin_age_s:.0f}s): queue tables cannot be vacuumed meanwhile",
                round(db.oldest_xact_age_s, 3),
            )
        )
    else:
        out.append(
            Check(
                "mvcc_horizon",
                Health.HEALTHY,
                f"oldest transaction {db.oldest_xact_age_s:.1f}s; xmin age {db.xmin_age_xids} xids",
                round(db.oldest_xact_age_s, 3),
            )
        )
    usage = db.notify_queue_usage
    if usage >= NOTIFY_QUEUE_CRITICAL:
        verdict = Health.UNHEALTHY
    elif usage > limits.max_notify_queue_usage:
        verdict = Health.DEGRADED
    else:
        verdict = Health.HEALTHY
    out.append(Check("notify_queue", verdict, f"pg_notification_queue_usage() = {usage:.4f}", usage))
    return out
