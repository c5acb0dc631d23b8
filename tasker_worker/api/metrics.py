"""``/metrics``: Prometheus text exposition through prometheus-client.

The figures are read from the database (and the local worker) per scrape, then handed to a
fresh ``CollectorRegistry`` through a collector that only yields them: nothing global, so two
apps in one process (tests, ``run`` with the API) never share or double-register metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from tasker_worker.api.context import ApiContext, ctx_of
from tasker_worker.api.health import QueueView, gather_database, gather_queues


class _Gathered(Collector):
    """Yields metric families gathered before the scrape is rendered."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        """The gathered families."""
        return iter(self._families)


async def gather(ctx: ApiContext) -> list[Metric]:
    """Every metric family of one scrape."""
    families: list[Metric] = []
    db = await gather_database(ctx)
    up = GaugeMetricFamily("tasker_database_up", "1 when the database answered this scrape")
    up.add_metric([], 1.0 if db.reachable else 0.0)
    families.append(up)
    if not db.reachable:
        return families
    oldest = GaugeMetricFamily(
        "tasker_database_oldest_transaction_age_seconds", "Age of the oldest open transaction holding a snapshot"
    )
    oldest.add_metric([], db.oldest_xact_age_s)
    xmin = GaugeMetricFamily("tasker_database_xmin_age_xids", "Largest age(backend_xmin) over all sessions")
    xmin.add_metric([], float(db.xmin_age_xids))
    notify = GaugeMetricFamily("tasker_database_notification_queue_usage", "pg_notification_queue_usage()")
    notify.add_metric([], db.notify_queue_usage)
    families += [oldest, xmin, notify]

    families += _queue_families(await gather_queues(ctx))

    stats = await ctx.views.stats()
    workers = GaugeMetricFamily("tasker_workers", "Registered workers by status", labels=["status"])
    for status, count in stats["by_status"].items():
        workers.add_metric([status], float(count))
    cores = GaugeMetricFamily("tasker_fleet_cpu_cores", "CPU cores of live (pending or active) workers")
    cores.add_metric([], float(stats["live_cpu_cores"]))
    throughput = GaugeMetricFamily(
        "tasker_fleet_throughput_steps_per_second", "Outcomes recorded per second, last minute"
    )
    throughput.add_metric([], float(stats["throughput_per_s"]))
    families += [workers, cores, throughput]

    families += _worker_families(await _worker_snapshots(ctx))

    if ctx.supervision is not None:
        leader = GaugeMetricFamily(
            "tasker_supervision_leader", "1 when this process leads the supervision jobs", labels=["candidate"]
        )
        leader.add_metric([ctx.supervision.candidate_id], 1.0 if ctx.supervision.is_leader else 0.0)
        families.append(leader)
    return families


def _queue_families(views: list[QueueView]) -> list[Metric]:
    depth = GaugeMetricFamily("tasker_queue_depth", "Messages in the queue", labels=["queue"])
    visible = GaugeMetricFamily("tasker_queue_visible", "Messages ready to claim", labels=["queue"])
    age = GaugeMetricFamily("tasker_queue_oldest_message_age_seconds", "Age of the oldest message", labels=["queue"])
    dlq = GaugeMetricFamily("tasker_dlq_depth", "Messages in the queue's dead-letter queue", labels=["queue"])
    dead = GaugeMetricFamily("tasker_queue_dead_tuples", "Dead rows in the queue table", labels=["queue"])
    for view in views:
        m = view.metrics
        depth.add_metric([m.queue_name], float(m.queue_length))
        visible.add_metric([m.queue_name], float(m.visible_length))
        age.add_metric([m.queue_name], float(m.oldest_msg_age_sec or 0))
        dlq.add_metric([m.queue_name], float(view.dlq.queue_length if view.dlq else 0))
        dead.add_metric([m.queue_name], float(view.dead_tuples))
    return [depth, visible, age, dlq, dead]


async def _worker_snapshots(ctx: ApiContext) -> dict[str, dict[str, Any]]:
    """Each live worker's statistics (its last heartbeat; the local worker's current ones)."""
    snaps = {view.worker_id: view.stats for view in await ctx.views.live() if view.stats}
    if ctx.local_status is not None and ctx.local_worker_id is not None:
        snaps[ctx.local_worker_id] = ctx.local_status()
    return snaps


def _worker_families(snaps: dict[str, dict[str, Any]]) -> list[Metric]:
    steps = CounterMetricFamily(
        "tasker_worker_steps", "Step counters of each live worker", labels=["worker_id", "counter"]
    )
    error_rate = GaugeMetricFamily(
        "tasker_worker_handler_error_rate", "Handler errors / runs over the last minute", labels=["worker_id"]
    )
    slots = GaugeMetricFamily("tasker_worker_free_slots", "Free concurrency slots", labels=["worker_id"])
    for worker_id, snap in sorted(snaps.items()):
        for name, value in sorted((snap.get("counters") or {}).items()):
            steps.add_metric([worker_id, name], float(value))
        minute = snap.get("handler_last_minute") or {}
        error_rate.add_metric([worker_id], float(minute.get("error_rate", 0.0)))
        if "free_slots" in snap:
            slots.add_metric([worker_id], float(snap["free_slots"]))
    return [steps, error_rate, slots]


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gathered(await gather(ctx_of(request))))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
