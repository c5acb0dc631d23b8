"""Health routes and ``/api/queues``: gather the figures, let ``domain.health`` judge them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import psycopg
from psycopg_pool import PoolTimeout
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker.api.context import ApiContext, ctx_of
from tasker_worker.api.routing import Operation
from tasker_worker.config.models import PRIMARY
from tasker_worker.db.queue_client import QueueClient, QueueMetrics
from tasker_worker.domain.health import (
    DatabaseFigures,
    Health,
    QueueFigures,
    Thresholds,
    WorkerFigures,
    judge,
    thresholds_of,
)
from tasker_worker.domain.names import DLQ_SUFFIX
from tasker_worker.errors import DatabaseError, first_line

#: A health probe never waits on the database longer than this.
PROBE_TIMEOUT_S = 5.0

_DOWN = (psycopg.Error, PoolTimeout, DatabaseError, TimeoutError)


@dataclass
class QueueView:
    """A queue and its dead-letter queue, as ``/api/queues`` shows them."""

    metrics: QueueMetrics
    dlq: QueueMetrics | None
    live_tuples: int
    dead_tuples: int
    #: The cluster that holds it (None: every namespace lives on the primary).
    cluster: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON shape of one queue."""
        m = self.metrics
        return {
            **({"cluster": self.cluster} if self.cluster is not None else {}),
            "queue": m.queue_name,
            "depth": m.queue_length,
            "visible": m.visible_length,
            "oldest_age_s": m.oldest_msg_age_sec,
            "newest_age_s": m.newest_msg_age_sec,
            "total_messages": m.total_messages,
            "dlq": None
            if self.dlq is None
            else {
                "queue": self.dlq.queue_name,
                "depth": self.dlq.queue_length,
                "oldest_age_s": self.dlq.oldest_msg_age_sec,
            },
            "table": {"live_tuples": self.live_tuples, "dead_tuples": self.dead_tuples},
        }

    def figures(self) -> QueueFigures:
        """What the health judgement needs of this queue."""
        m = self.metrics
        return QueueFigures(
            queue=m.queue_name,
            depth=m.queue_length,
            oldest_age_s=float(m.oldest_msg_age_sec) if m.oldest_msg_age_sec is not None else None,
            dlq_depth=self.dlq.queue_length if self.dlq else 0,
            dead_tuples=self.dead_tuples,
            live_tuples=self.live_tuples,
        )


async def gather_queues(ctx: ApiContext, *, replica: bool = False) -> list[QueueView]:
    """Every work queue with its DLQ and table statistics, of every cluster that answers
    (``replica``: the primary's read where the read-only routes read, ``[database] read_url``
    when set)."""
    if ctx.clusters is None:
        return await gather_queues_of(ctx.read_client if replica else ctx.client, None)
    views: list[QueueView] = []
    for cluster, client in (await gather_clusters(ctx)).reached:
        if replica and cluster == PRIMARY:
            client = ctx.read_client
        views += await gather_queues_of(client, cluster)
    return views


@dataclass
class ClusterReach:
    """Which clusters answered (with their clients) and why the others did not."""

    reached: list[tuple[str, QueueClient]]
    errors: dict[str, str]


async def gather_clusters(ctx: ApiContext) -> ClusterReach:
    """Every cluster's client, each tried within ``PROBE_TIMEOUT_S``: one cluster that is down
    costs only its own namespaces' figures."""
    reach = ClusterReach([], {})
    names = [PRIMARY] if ctx.clusters is None else ctx.clusters.names
    for name in names:
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                client = (
                    ctx.client
                    if name == PRIMARY or ctx.clusters is None
                    else QueueClient(await ctx.clusters.pool(name))
                )
                await client.schema_installed()
        except _DOWN as exc:
            reach.errors[name] = first_line(exc)
            continue
        reach.reached.append((name, client))
    return reach


async def gather_queues_of(client: QueueClient, cluster: str | None) -> list[QueueView]:
    """The work queues of the database behind ``client`` (of ``cluster``, when named)."""
    metrics = {m.queue_name: m for m in await client.metrics()}
    tuples = await client.queue_table_tuples()
    out = []
    for name, m in sorted(metrics.items()):
        if name.endswith(DLQ_SUFFIX) and name[: -len(DLQ_SUFFIX)] in metrics:
            continue
        live, dead = tuples.get(name, (0, 0))
        out.append(QueueView(m, metrics.get(name + DLQ_SUFFIX), live, dead, cluster))
    return out


async def gather_database(ctx: ApiContext) -> DatabaseFigures:
    """Reachability, MVCC horizon and NOTIFY queue usage."""
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            age_s, xmin_age, usage = await ctx.client.database_horizon()
    except _DOWN as exc:
        return DatabaseFigures(reachable=False, error=first_line(exc))
    return DatabaseFigures(True, None, age_s, xmin_age, usage)


async def gather_workers(ctx: ApiContext) -> list[WorkerFigures]:
    """The local worker's figures, or (API alone) those of every live worker's last heartbeat."""
    if ctx.local_status is not None:
        return [WorkerFigures.from_status(ctx.local_worker_id or "local", ctx.local_status())]
    return [WorkerFigures.from_status(v.worker_id, v.stats) for v in await ctx.views.live() if v.stats]


async def _replica(ctx: ApiContext) -> dict[str, Any]:
    """How stale the read-only routes' reads are, or why that is not known."""
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            state = await ctx.replica_state()
    except _DOWN as exc:
        return {"reachable": False, "error": first_line(exc)}
    return {"reachable": True, **(state.as_json() if state else {})}


def thresholds(ctx: ApiContext) -> Thresholds:
    """``[api]`` health limits."""
    return thresholds_of(ctx.config.api)


async def live(request: Request) -> Response:
    """The process answers (no database involved)."""
    return JSONResponse({"status": "alive"})


async def ready(request: Request) -> Response:
    """200 when the database answers and the schema is installed; 503 otherwise."""
    ctx = ctx_of(request)
    try:
        with anyio.fail_after(PROBE_TIMEOUT_S):
            migrated = await ctx.client.schema_installed()
    except _DOWN as exc:
        return JSONResponse({"status": "not_ready", "reason": f"database: {first_line(exc)}"}, status_code=503)
    if not migrated:
        return JSONResponse(
            {"status": "not_ready", "reason": "schema not installed (run tasker-worker db migrate)"}, status_code=503
        )
    return JSONResponse({"status": "ready"})


async def detailed(request: Request) -> Response:
    """healthy / degraded / unhealthy with the reasons; 503 when unhealthy."""
    ctx = ctx_of(request)
    db = await gather_database(ctx)
    workers: list[WorkerFigures] = []
    queues: list[QueueFigures] = []
    if db.reachable:
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                workers = await gather_workers(ctx)
                queues = [q.figures() for q in await gather_queues(ctx)]
        except _DOWN as exc:
            db = DatabaseFigures(reachable=False, error=first_line(exc))
    report = judge(db, workers, queues, thresholds(ctx))
    body = report.to_json()
    if ctx.supervision is not None:
        body["supervision"] = ctx.supervision.status()
    if ctx.read_pool is not None:
        body["read_replica"] = await _replica(ctx)
    return JSONResponse(body, status_code=503 if report.status is Health.UNHEALTHY else 200)


async def queues(request: Request) -> Response:
    """pgmq metrics of every work queue, with its DLQ depth and oldest message age."""
    views = await gather_queues(ctx_of(request), replica=True)
    return JSONResponse({"queues": [v.to_json() for v in views], "count": len(views)})


def operations() -> list[Operation]:
    """The health operations and ``/api/queues``."""
    return [
        Operation("GET", "/health/live", live, database=False),
        Operation("GET", "/health/ready", ready, {503: "not ready: the database is unreachable or not migrated"}),
        Operation("GET", "/health/detailed", detailed, {503: "unhealthy (the body says why)"}),
        Operation("GET", "/api/queues", queues),
    ]
