"""``/metrics``: Prometheus text exposition through prometheus-client.

The figures are read from the database (and the local worker) per scrape, then handed to a
fresh ``CollectorRegistry`` through a collector that only yields them: nothing global, so two
apps in one process (tests, ``run`` with the API) never share or double-register metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from tasker_worker.api.context import ApiContext, ctx_of
from tasker_worker.api.health import QueueView, gather_clusters, gather_database, gather_queues, gather_queues_of
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.flow import QueueFlow
from tasker_worker.domain.workers import WorkerView

if TYPE_CHECKING:
    from tasker_worker.runtime.stats import HistogramSeries


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

    if ctx.clusters is None:
        families += _queue_families(await gather_queues(ctx))
        families += _flow_families(await flow_db.read_flow(ctx.pool))
    else:
        # Namespaces on several clusters: the queue and flow series of every cluster that
        # answers (a queue's name is unique across them), and which clusters answered.
        reach = await gather_clusters(ctx)
        up = GaugeMetricFamily("tasker_cluster_up", "1 when the cluster answered this scrape", labels=["cluster"])
        views: list[QueueView] = []
        flows: list[QueueFlow] = []
        for name, client in reach.reached:
            up.add_metric([name], 1.0)
            views += await gather_queues_of(client, name)
            flows += await flow_db.read_flow(client.pool)
        for name in reach.errors:
            up.add_metric([name], 0.0)
        families += [up, *_queue_families(views), *_flow_families(flows)]

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

    cpu = GaugeMetricFamily("tasker_fleet_cpu_utilization_ratio", "Live workers' CPU use / their cores")
    cpu.add_metric([], float(stats["cpu_utilization"]))
    memory = GaugeMetricFamily("tasker_fleet_memory_utilization_ratio", "Live workers' memory use / their memory")
    memory.add_metric([], float(stats["memory_utilization"]))
    families += [cpu, memory]

    live = await ctx.views.live()
    families.append(_heartbeat_ages(live, ctx.clock.now()))
    families += _worker_families(_worker_snapshots(ctx, live))
    if ctx.local_histograms is not None:
        families += _histogram_families(ctx.local_histograms())

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


def _flow_families(flows: list[QueueFlow]) -> list[Metric]:
    """Each namespace's flow control (namespaces without any have no series)."""
    paused = GaugeMetricFamily("tasker_queue_paused", "1 while the namespace is paused", labels=["namespace"])
    running = GaugeMetricFamily(
        "tasker_queue_max_running", "Fleet-wide cap on the namespace's running steps", labels=["namespace"]
    )
    per_key = GaugeMetricFamily(
        "tasker_queue_key_max_running", "Fleet-wide cap on running steps per concurrency_key", labels=["namespace"]
    )
    rate = GaugeMetricFamily(
        "tasker_queue_rate_limit_per_second",
        "Fleet-wide cap on the namespace's starts per second",
        labels=["namespace"],
    )
    for found in flows:
        paused.add_metric([found.namespace], 1.0 if found.paused else 0.0)
        if found.max_running is not None:
            running.add_metric([found.namespace], float(found.max_running))
        if found.key_max_running is not None:
            per_key.add_metric([found.namespace], float(found.key_max_running))
        if found.rate is not None:
            rate.add_metric([found.namespace], found.rate.per_second)
    return [paused, running, per_key, rate]


def _worker_snapshots(ctx: ApiContext, live: list[WorkerView]) -> dict[str, dict[str, Any]]:
    """Each live worker's statistics (its last heartbeat; the local worker's current ones)."""
    snaps = {view.worker_id: view.stats for view in live if view.stats}
    if ctx.local_status is not None and ctx.local_worker_id is not None:
        snaps[ctx.local_worker_id] = ctx.local_status()
    return snaps


#: Worker counters that share a family, told apart by a label: counter -> (family, label, value).
_LABELLED: dict[str, tuple[str, str, str]] = {
    "succeeded": ("step_outcomes", "outcome", "succeeded"),
    "failed": ("step_outcomes", "outcome", "failed"),
    "dead_lettered": ("step_outcomes", "outcome", "dead_lettered"),
    "retried": ("step_outcomes", "outcome", "retried"),
    "released": ("step_outcomes", "outcome", "released"),
    "stale_acks": ("step_outcomes", "outcome", "stale_ack"),
    "claims_event": ("claims", "source", "event"),
    "claims_poll": ("claims", "source", "poll"),
    "claimed_event": ("claimed_steps", "source", "event"),
    "claimed_poll": ("claimed_steps", "source", "poll"),
    "vt_extensions": ("vt_extensions", "result", "extended"),
    "vt_extensions_refused": ("vt_extensions", "result", "refused"),
    "claims_taken_over": ("deferred_claims_resolved", "resolution", "taken_over"),
    "claims_left_to_peers": ("deferred_claims_resolved", "resolution", "left_to_peers"),
}

_HELP: dict[str, str] = {
    "step_outcomes": "Steps settled by each worker, by outcome (stale_ack: a settle fenced out "
    "because the claim had lapsed)",
    "claims": "Claim statements, by what triggered them (a notification, or looking: poll/backlog)",
    "claimed_steps": "Messages claimed, by what triggered their claim",
    "vt_extensions": "Visibility-timeout extensions of running steps, by result",
    "deferred_claims_resolved": "Claims deferred to a first-ranked peer, by how they ended",
    "missed_wakeups": "Messages found by polling that NOTIFY should have announced",
    "notifications_received": "NOTIFY messages received",
    "listener_reconnects": "Times the LISTEN connection was re-established",
    "processed": "Steps whose handler ran to an outcome",
    "claims_held": "Claims that flow control held back (a paused namespace, or one at a fleet-wide limit)",
    "tasker_core_steps_left": "tasker-core step messages given back untouched for tasker-core's workers",
}


def _worker_families(snaps: dict[str, dict[str, Any]]) -> list[Metric]:
    counters: dict[str, CounterMetricFamily] = {}

    def family(name: str, labels: list[str]) -> CounterMetricFamily:
        if name not in counters:
            help_text = _HELP.get(name, name.replace("_", " ").capitalize() + ", per worker")
            counters[name] = CounterMetricFamily(f"tasker_worker_{name}", help_text, labels=["worker_id", *labels])
        return counters[name]

    heartbeats = CounterMetricFamily(
        "tasker_worker_heartbeats", "Heartbeats sent, by result", labels=["worker_id", "result"]
    )
    listener_up = GaugeMetricFamily(
        "tasker_worker_listener_up",
        "1 while the worker's LISTEN connection is up (modes with a listener)",
        labels=["worker_id"],
    )
    error_rate = GaugeMetricFamily(
        "tasker_worker_handler_error_rate", "Handler errors / runs over the last minute", labels=["worker_id"]
    )
    cluster_listener = GaugeMetricFamily(
        "tasker_worker_cluster_listener_up",
        "1 while the worker's LISTEN connection to that cluster is up (namespaces on several clusters)",
        labels=["worker_id", "cluster"],
    )
    cluster_held = GaugeMetricFamily(
        "tasker_worker_cluster_held_steps",
        "Messages of that cluster's queues the worker holds now (running, prefetched or being written)",
        labels=["worker_id", "cluster"],
    )
    slots = GaugeMetricFamily("tasker_worker_free_slots", "Free concurrency slots", labels=["worker_id"])
    in_flight = GaugeMetricFamily("tasker_worker_in_flight_steps", "Steps running now", labels=["worker_id"])
    for worker_id, snap in sorted(snaps.items()):
        for name, value in sorted((snap.get("counters") or {}).items()):
            if name in _LABELLED:
                fam_name, label, label_value = _LABELLED[name]
                family(fam_name, [label]).add_metric([worker_id, label_value], float(value))
            else:
                family(name, []).add_metric([worker_id], float(value))
        registry = snap.get("registry") or {}
        if "heartbeats_sent" in registry:
            heartbeats.add_metric([worker_id, "ok"], float(registry["heartbeats_sent"]))
            heartbeats.add_metric([worker_id, "failed"], float(registry.get("heartbeat_failures", 0)))
        listener = (snap.get("event_system") or {}).get("listener")
        if listener is not None:
            listener_up.add_metric([worker_id], 1.0 if listener.get("healthy") else 0.0)
        for cluster, state in sorted((snap.get("clusters") or {}).items()):
            cluster_listener_state = (state.get("event_system") or {}).get("listener")
            if cluster_listener_state is not None:
                cluster_listener.add_metric([worker_id, cluster], 1.0 if cluster_listener_state.get("healthy") else 0.0)
            cluster_held.add_metric([worker_id, cluster], float(state.get("held", 0)))
        minute = snap.get("handler_last_minute") or {}
        error_rate.add_metric([worker_id], float(minute.get("error_rate", 0.0)))
        if "free_slots" in snap:
            slots.add_metric([worker_id], float(snap["free_slots"]))
        if "in_flight" in snap:
            in_flight.add_metric([worker_id], float(snap["in_flight"]))
    return [*counters.values(), heartbeats, listener_up, cluster_listener, cluster_held, error_rate, slots, in_flight]


def _histogram_families(series: list[HistogramSeries]) -> list[Metric]:
    """This process's histograms (a worker's own: they are not carried by heartbeats)."""
    out: list[Metric] = []
    for hist in series:
        fam = HistogramMetricFamily(hist.name, hist.help, labels=list(hist.labels))
        for values, h in sorted(hist.series.items()):
            fam.add_metric(list(values), h.cumulative(), sum_value=h.sum)
        out.append(fam)
    return out


def _heartbeat_ages(views: list[WorkerView], now: datetime) -> Metric:
    age = GaugeMetricFamily(
        "tasker_worker_heartbeat_age_seconds", "Seconds since each live worker's last heartbeat", labels=["worker_id"]
    )
    for view in views:
        last = view.last_heartbeat_at or view.registered_at
        age.add_metric([view.worker_id], max(0.0, (now - last).total_seconds()))
    return age


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gathered(await gather(ctx_of(request))))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
