"""What each dashboard page shows, gathered from the database in bounded reads.

Every read here goes to ``ctx.reads`` (the read replica of ``[database] read_url`` when one is
set, else the primary), except the overview's health verdict, which judges the primary (its
transaction horizon, the live workers' figures). Every read here has a limit: queue depths are counted up to ``GLANCE_CAP`` rows
(``tasker.queue_glance``), lists stop at a fixed length, the chart reads the outcomes of the last
``WINDOW_S`` seconds only. The overview, the page every operator leaves open, is gathered at
most once per ``OVERVIEW_TTL_S`` whatever the number of browsers refreshing it.
"""

from __future__ import annotations

import math
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import anyio

from tasker_worker.api.context import ApiContext
from tasker_worker.api.dashboard.chart import Sparkline, sparkline
from tasker_worker.api.health import gather_database, gather_workers, thresholds
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.flow import QueueFlow
from tasker_worker.domain.health import HealthReport, QueueFigures, WorkerFigures, judge, judge_worker
from tasker_worker.domain.names import DLQ_SUFFIX, dlq_name, namespace_of, queue_name
from tasker_worker.domain.results import StepProgress, StepResult
from tasker_worker.domain.steps import OutcomeStatus
from tasker_worker.domain.workers import WorkerStatus, WorkerView

#: Queue depths are counted up to this many messages; beyond, the page says "10000+".
GLANCE_CAP = 10_000
#: The chart's buckets and how far back it reaches.
BUCKET_S = 30
WINDOW_S = 600
#: Lengths of the lists the pages show.
FAILURES_SHOWN = 25
DEAD_LETTERS_SHOWN = 100
HEARTBEATS_SHOWN = 100
TIMELINE_SHOWN = 50
STEP_EVENTS_SHOWN = 200
WORKERS_SHOWN = 500
#: A requeue of "all" moves at most this many dead letters per confirmation.
REQUEUE_ALL_LIMIT = 1000
#: How long one gathered overview serves every browser asking for it.
OVERVIEW_TTL_S = 2.0


@dataclass(frozen=True)
class QueueGlance:
    """One queue's depth (counted up to ``GLANCE_CAP``) and its oldest message."""

    queue: str
    depth: int
    visible: int
    capped: bool
    oldest_enqueued_at: datetime | None

    def oldest_age_s(self, now: datetime) -> float | None:
        """Seconds since the oldest message was sent, or None when the queue is empty."""
        if self.oldest_enqueued_at is None or self.depth == 0:
            return None
        return max(0.0, (now - self.oldest_enqueued_at).total_seconds())


@dataclass
class NamespaceRow:
    """A namespace on the overview: its queue, its DLQ and its recent outcomes."""

    namespace: str
    queue: QueueGlance
    dlq: QueueGlance | None
    oldest_age_s: float | None
    #: Outcomes per second and error share over the last minute or so (``Series.last_minute``).
    steps_per_s: float
    error_rate: float | None
    chart: Sparkline
    error_chart: Sparkline
    #: Its flow control (pause, limits, ordering); None when it has none.
    flow: QueueFlow | None = None


@dataclass
class Overview:
    """The overview page."""

    at: datetime
    namespaces: list[NamespaceRow]
    other_queues: list[QueueGlance]
    health: HealthReport
    fleet: dict[str, Any]
    steps_per_s: float
    chart: Sparkline


@dataclass
class WorkerRow:
    """A worker as the workers page lists it."""

    view: WorkerView
    heartbeat_age_s: float | None
    open_circuits: dict[str, dict[str, Any]]

    @property
    def live(self) -> bool:
        """Pending or active: it may still claim steps."""
        return self.view.status in (WorkerStatus.PENDING, WorkerStatus.ACTIVE)


@dataclass
class WorkerPage:
    """One worker with its heartbeat history and its event timeline."""

    row: WorkerRow
    heartbeats: list[dict[str, Any]]
    timeline: list[dict[str, Any]]
    active_chart: Sparkline
    cpu_chart: Sparkline
    health: HealthReport | None


@dataclass
class StepPage:
    """A step looked up by its step_uuid: its outcome, or where its message is, and its events."""

    step_uuid: uuid.UUID
    result: StepResult | None
    queued: dict[str, Any] | None
    dead_letter: DeadLetter | None
    events: list[dict[str, Any]] = field(default_factory=list)
    #: What it reported while running (``ctx.progress``), when it has no outcome yet.
    progress: StepProgress | None = None

    @property
    def namespace(self) -> str | None:
        """The namespace of its queued message (for its cancel form)."""
        return namespace_of(self.queued["queue"]) if self.queued else None

    @property
    def found(self) -> bool:
        """Whether anything is known of this step."""
        return self.result is not None or self.queued is not None or bool(self.events)


@dataclass(frozen=True)
class DeadLetter:
    """A message of a dead-letter queue with why it is there."""

    msg_id: int
    dead_lettered_at: datetime
    step_uuid: str | None
    handler: str | None
    status: str | None
    reason: str | None
    attempts: int | None
    error_type: str | None
    error_message: str | None

    @classmethod
    def from_peek(cls, row: tuple[Any, ...]) -> DeadLetter:
        """From a ``QueueClient.peek`` row of a DLQ (any JSON at all may be in a message)."""
        msg_id, enqueued_at, _read_ct, message, headers = row
        found = headers.get("tasker_dlq") if isinstance(headers, dict) else None
        info: dict[str, Any] = found if isinstance(found, dict) else {}
        error: dict[str, Any] = info["error"] if isinstance(info.get("error"), dict) else {}
        body = message if isinstance(message, dict) else {}
        attempts = info.get("attempts")
        return cls(
            msg_id=int(msg_id),
            dead_lettered_at=enqueued_at,
            step_uuid=_text(body.get("step_uuid")),
            handler=_text(body.get("handler")),
            status=_text(info.get("status")),
            reason=_text(info.get("reason")),
            attempts=attempts if isinstance(attempts, int) else None,
            error_type=_text(error.get("type")),
            error_message=_text(error.get("message")),
        )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:2000]


class OverviewCache:
    """One overview at a time, shared by every request within ``ttl_s`` of its gathering."""

    def __init__(self, ttl_s: float = OVERVIEW_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = anyio.Lock()
        self._value: Overview | None = None
        self._at = -math.inf

    async def get(self, ctx: ApiContext) -> Overview:
        """The overview, gathered anew when the one held is older than ``ttl_s``."""
        async with self._lock:  # concurrent refreshes wait for one gathering, not run their own
            if self._value is None or anyio.current_time() - self._at > self.ttl_s:
                self._value = await gather_overview(ctx)
                self._at = anyio.current_time()
            return self._value

    def forget(self) -> None:
        """Gather anew at the next request (an action changed what the overview shows)."""
        self._value = None


async def glance(ctx: ApiContext) -> list[QueueGlance]:
    """Every queue's depth and oldest message, each counted up to ``GLANCE_CAP``."""
    return [QueueGlance(*row) for row in await ctx.read_client.queue_glance(GLANCE_CAP)]


def pair_queues(
    glances: list[QueueGlance],
) -> tuple[dict[str, tuple[QueueGlance, QueueGlance | None]], list[QueueGlance]]:
    """``{namespace: (queue, dlq)}`` of the namespace queues, and every other queue."""
    by_name = {g.queue: g for g in glances}
    namespaces: dict[str, tuple[QueueGlance, QueueGlance | None]] = {}
    others: list[QueueGlance] = []
    for g in glances:
        if g.queue.endswith(DLQ_SUFFIX) and g.queue[: -len(DLQ_SUFFIX)] in by_name:
            continue
        namespace = namespace_of(g.queue)
        if namespace is None:
            others.append(g)
        else:
            namespaces[namespace] = (g, by_name.get(dlq_name(g.queue)))
    return namespaces, others


#: Buckets on the chart: the window's full buckets and the current one.
BUCKETS = WINDOW_S // BUCKET_S


@dataclass(frozen=True)
class Series:
    """A namespace's outcomes per bucket, oldest first, the last bucket being the current one."""

    outcomes: list[int]
    errors: list[int]
    #: Seconds of the current bucket gone by (its rate is taken over these, not BUCKET_S).
    current_s: float

    def per_s(self) -> list[float]:
        """Outcomes per second of each bucket."""
        spans = [float(BUCKET_S)] * (len(self.outcomes) - 1) + [self.current_s]
        return [n / span for n, span in zip(self.outcomes, spans, strict=True)]

    def error_shares(self) -> list[float]:
        """Errors / outcomes of each bucket (0 where nothing finished)."""
        return [e / n if n else 0.0 for n, e in zip(self.outcomes, self.errors, strict=True)]

    def last_minute(self) -> tuple[float, float | None]:
        """Steps/s and error share over the current bucket and the full one before it."""
        outcomes = sum(self.outcomes[-2:])
        errors = sum(self.errors[-2:])
        return outcomes / (BUCKET_S + self.current_s), (errors / outcomes if outcomes else None)


def series_of(rows: list[tuple[str, int, int, int]], now: datetime) -> dict[str, Series]:
    """``OUTCOME_BUCKETS`` rows as one ``Series`` per namespace (every namespace the rows name)."""
    epoch = now.timestamp()
    current = math.floor(epoch / BUCKET_S)
    first = current - BUCKETS + 1
    # At least a second of the current bucket, so a bucket just begun does not spike.
    current_s = max(1.0, epoch - current * BUCKET_S)
    counts: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([0] * BUCKETS, [0] * BUCKETS))
    for namespace, bucket, outcomes, errors in rows:
        if first <= bucket <= current:
            done, failed = counts[namespace]
            done[bucket - first] += outcomes
            failed[bucket - first] += errors
    return {ns: Series(done, failed, current_s) for ns, (done, failed) in counts.items()}


def _empty_series() -> Series:
    return Series([0] * BUCKETS, [0] * BUCKETS, float(BUCKET_S))


async def gather_overview(ctx: ApiContext) -> Overview:
    """Queues, recent outcomes, the fleet and its health, as of now."""
    now = ctx.clock.now()
    glances = await glance(ctx)
    namespaces, others = pair_queues(glances)
    series = series_of(await ctx.read_client.outcome_buckets(BUCKET_S, WINDOW_S + BUCKET_S), now)
    tuples = await ctx.read_client.queue_table_tuples()
    flows = {f.namespace: f for f in await flow_db.read_flow(ctx.reads)}
    rows: list[NamespaceRow] = []
    figures: list[QueueFigures] = []
    for namespace, (queue, dlq) in sorted(namespaces.items()):
        points = series.get(namespace) or _empty_series()
        per_s, error_rate = points.last_minute()
        rows.append(
            NamespaceRow(
                namespace=namespace,
                queue=queue,
                dlq=dlq,
                oldest_age_s=queue.oldest_age_s(now),
                steps_per_s=per_s,
                error_rate=error_rate,
                chart=sparkline(points.per_s()),
                error_chart=sparkline(points.error_shares(), floor=1.0),
                flow=flows.get(namespace),
            )
        )
        live, dead = tuples.get(queue.queue, (0, 0))
        figures.append(
            QueueFigures(queue.queue, queue.depth, queue.oldest_age_s(now), dlq.depth if dlq else 0, dead, live)
        )
    database = await gather_database(ctx)
    workers: list[WorkerFigures] = await gather_workers(ctx) if database.reachable else []
    health = judge(database, workers, figures, thresholds(ctx))
    total = [sum(values) for values in zip(*(s.per_s() for s in series.values()), strict=True)]
    fleet = await ctx.read_views.stats()
    return Overview(
        at=now,
        namespaces=rows,
        other_queues=others,
        health=health,
        fleet=fleet,
        steps_per_s=sum(r.steps_per_s for r in rows),
        chart=sparkline(total or [0.0] * BUCKETS, width=320, height=48),
    )


def worker_row(view: WorkerView, now: datetime) -> WorkerRow:
    """A worker with the age of its last heartbeat and its open circuits."""
    age = None if view.last_heartbeat_at is None else max(0.0, (now - view.last_heartbeat_at).total_seconds())
    circuits = view.stats.get("circuits") if isinstance(view.stats, dict) else None
    return WorkerRow(view, age, dict(circuits) if isinstance(circuits, dict) else {})


async def gather_workers_page(ctx: ApiContext, *, include_gone: bool) -> list[WorkerRow]:
    """Workers, newest first (the live ones only unless ``include_gone``)."""
    now = ctx.clock.now()
    views = await ctx.read_views.list(None, include_deregistered=include_gone, limit=WORKERS_SHOWN)
    return [worker_row(v, now) for v in views]


async def gather_worker_page(ctx: ApiContext, worker_id: str) -> WorkerPage:
    """One worker (``WorkerNotFound`` for an unknown id), its heartbeats and its events."""
    view = await ctx.read_views.get(worker_id)
    heartbeats = await ctx.read_views.heartbeats(worker_id, limit=HEARTBEATS_SHOWN)
    timeline = await ctx.read_views.timeline(worker_id, limit=TIMELINE_SHOWN)
    oldest_first = list(reversed(heartbeats))
    health = None
    if view.stats:
        health = judge_worker(WorkerFigures.from_status(view.worker_id, view.stats), thresholds(ctx))
    return WorkerPage(
        row=worker_row(view, ctx.clock.now()),
        heartbeats=heartbeats,
        timeline=timeline,
        active_chart=sparkline([float(h["active_steps"] or 0) for h in oldest_first], width=320, height=48),
        cpu_chart=sparkline([float(h["cpu_percent"] or 0) for h in oldest_first], width=320, height=48, floor=100.0),
        health=health,
    )


async def gather_step_page(ctx: ApiContext, step_uuid: uuid.UUID, namespace: str | None) -> StepPage:
    """What is known of one step: its outcome or its message (through its idempotency key, or a
    scan of ``namespace``'s queue), a copy in a DLQ, and its events."""
    client = ctx.read_producer
    result = await client.get_result(step_uuid)
    queued = None if result is not None else await client.find_queued(step_uuid, namespace=namespace)
    rows = await ctx.read_client.step_events(str(step_uuid), STEP_EVENTS_SHOWN)
    events = [
        {
            "event_id": r[0],
            "event_type": r[1],
            "worker_id": r[2],
            "queue": r[3],
            "msg_id": r[4],
            "data": r[5],
            "at": r[6],
        }
        for r in rows
    ]
    dead_letter = None
    if result is not None and result.status in (OutcomeStatus.FAILED, OutcomeStatus.DEAD_LETTERED):
        dead_letter = await _find_dead_letter(ctx, result.namespace, str(step_uuid))
    progress = await client.get_progress(step_uuid) if queued is not None else None
    return StepPage(step_uuid, result, queued, dead_letter, events, progress)


async def _find_dead_letter(ctx: ApiContext, namespace: str, step_uuid: str) -> DeadLetter | None:
    for letter in await gather_dead_letters(ctx, namespace):
        if letter.step_uuid == step_uuid:
            return letter
    return None


async def gather_dead_letters(ctx: ApiContext, namespace: str) -> list[DeadLetter]:
    """The oldest ``DEAD_LETTERS_SHOWN`` dead letters of a namespace (``QueueNotFound`` when it
    has no queue)."""
    rows = await (await ctx.read_client_of(namespace)).peek(dlq_name(queue_name(namespace)), DEAD_LETTERS_SHOWN)
    return [DeadLetter.from_peek(r) for r in rows]


async def recent_failures(ctx: ApiContext) -> list[StepResult]:
    """The newest failed and dead-lettered outcomes, newest first."""
    client = ctx.read_producer
    failed = await client.list_results(status=OutcomeStatus.FAILED, limit=FAILURES_SHOWN)
    dead = await client.list_results(status=OutcomeStatus.DEAD_LETTERED, limit=FAILURES_SHOWN)
    return sorted(failed + dead, key=lambda r: r.finished_at, reverse=True)[:FAILURES_SHOWN]


async def known_namespaces(ctx: ApiContext) -> list[str]:
    """Namespaces with a queue, and those live workers serve."""
    names = {ns for name, *_ in await ctx.read_client.list_queues() if (ns := namespace_of(name)) is not None}
    for view in await ctx.read_views.live(limit=WORKERS_SHOWN):
        names.update(view.namespaces)
    return sorted(names)
