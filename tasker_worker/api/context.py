"""What every route of the API shares: its context, its errors, reading requests, the token check.

The route modules (``routing``, ``workers``, ``steps``, ``health``, ``metrics``, ``openapi``)
import from here and ``app.py`` imports them, so imports point one way.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tasker_worker.config.models import PRIMARY, TaskerConfig
from tasker_worker.db.clusters import ClusterPools
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.clock import Clock, SystemClock
from tasker_worker.domain.replica import ReplicaState
from tasker_worker.fleet.leader import LeaderElection
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.fleet.views import FleetViews
from tasker_worker.producer.client import AsyncClient

if TYPE_CHECKING:
    from tasker_worker.runtime.stats import HistogramSeries

log = logging.getLogger(__name__)

#: How long one look at the read replica's state serves the pages.
REPLICA_STATE_TTL_S = 2.0

#: Request bodies larger than this are refused (413) before they are read: the largest body any
#: route takes (a registration with its namespaces and capabilities) is a few KiB.
MAX_BODY_BYTES = 64 << 10

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class ApiContext:
    """What the routes work with."""

    pool: AsyncConnectionPool
    config: TaskerConfig
    clock: Clock = field(default_factory=SystemClock)
    #: The worker running in this process, when the API is served by ``run``.
    local_status: Callable[[], dict[str, Any]] | None = None
    local_worker_id: str | None = None
    #: The local worker's histograms (``WorkerStats.histograms``), for ``/metrics``.
    local_histograms: Callable[[], list[HistogramSeries]] | None = None
    supervision: LeaderElection | None = None
    #: The pool on ``[database] read_url`` (a standby) for the routes that only read; None: they
    #: read from ``pool``. Writes, and the reads that judge the primary (health, metrics) and those
    #: that follow a write (the worker a registration returns), always go to ``pool``.
    read_pool: AsyncConnectionPool | None = None
    #: The pools of the clusters other than the primary's (``[queues.namespaces.<ns>] database``),
    #: each opened when first used; None when every namespace lives on the primary.
    clusters: ClusterPools | None = None

    @classmethod
    def for_worker(
        cls,
        pool: AsyncConnectionPool,
        config: TaskerConfig,
        worker: Any,
        read_pool: AsyncConnectionPool | None = None,
    ) -> ApiContext:
        """The context of an API served inside a running ``Worker``: its figures read live."""
        return cls(
            pool,
            config,
            local_status=worker.status,
            local_worker_id=worker.worker_id,
            local_histograms=worker.stats.histograms,
            supervision=worker.supervision,
            read_pool=read_pool,
        )

    def __post_init__(self) -> None:
        self.lifecycle = WorkerLifecycle(
            self.pool, self.clock, heartbeat_history=self.config.registry.heartbeat_history
        )
        self.views = FleetViews(self.pool)
        self.client = QueueClient(self.pool)
        #: Where the read-only routes read: the read replica, else the primary.
        self.reads: AsyncConnectionPool = self.read_pool or self.pool
        self.read_views = self.views if self.read_pool is None else FleetViews(self.read_pool)
        self.read_client = self.client if self.read_pool is None else QueueClient(self.read_pool)
        #: The read replica's state as last looked at (``replica_state``), for the pages.
        self.replica: ReplicaState | None = None
        self._replica_at = -math.inf
        if self.clusters is None and self.config.sharded:
            self.clusters = ClusterPools(
                self.config, {PRIMARY: self.pool}, max_size=min(4, self.config.database.pool_max_size)
            )
        #: Sends, cancels and reads steps on the cluster of their namespace.
        self.producer = AsyncClient(pool=self.pool, config=self.config, pools=self.clusters)
        #: The producer's reads for the read-only routes: the primary's on the read replica.
        self.read_producer = self.producer
        if self.read_pool is not None:
            self.read_producer = AsyncClient(
                pool=self.read_pool,
                config=self.config,
                pools=self.clusters.reading_from(self.read_pool) if self.clusters is not None else None,
            )

    async def replica_state(self, max_age_s: float = REPLICA_STATE_TTL_S) -> ReplicaState | None:
        """How stale the reads are (None without a read replica), looked at again when the state
        held is older than ``max_age_s``."""
        if self.read_pool is None:
            return None
        if anyio.current_time() - self._replica_at > max_age_s:
            self.replica = await self.read_client.replica_state()
            self._replica_at = anyio.current_time()
        return self.replica

    async def cluster_clients(self) -> list[tuple[str, QueueClient]]:
        """``(cluster name, QueueClient)`` of every cluster, the primary first (only the
        primary when nothing lives elsewhere). A cluster that cannot be reached raises."""
        if self.clusters is None:
            return [(PRIMARY, self.client)]
        return [(PRIMARY, self.client)] + [
            (name, QueueClient(await self.clusters.pool(name))) for name in self.clusters.names[1:]
        ]

    async def pool_of(self, namespace: str) -> AsyncConnectionPool:
        """The pool of the cluster that holds ``namespace`` (its queue, flow control, outcomes)."""
        if self.clusters is None:
            return self.pool
        return await self.clusters.for_namespace(namespace)

    async def client_of(self, namespace: str) -> QueueClient:
        """A ``QueueClient`` on the cluster that holds ``namespace``."""
        if self.clusters is None or self.clusters.cluster_of(namespace) == PRIMARY:
            return self.client
        return QueueClient(await self.clusters.for_namespace(namespace))

    async def read_pool_of(self, namespace: str) -> AsyncConnectionPool:
        """Where a read-only route reads ``namespace``: the read replica for the primary's
        namespaces (``reads``), the namespace's own cluster otherwise."""
        if self.clusters is None or self.clusters.cluster_of(namespace) == PRIMARY:
            return self.reads
        return await self.clusters.for_namespace(namespace)

    async def read_client_of(self, namespace: str) -> QueueClient:
        """A ``QueueClient`` for the read-only routes on ``namespace`` (``read_pool_of``)."""
        if self.clusters is None or self.clusters.cluster_of(namespace) == PRIMARY:
            return self.read_client
        return QueueClient(await self.clusters.for_namespace(namespace))

    async def close(self) -> None:
        """Close the clusters' pools opened for the API (not the primary's, its owner's)."""
        if self.clusters is not None:
            await self.clusters.close()


class ApiError(Exception):
    """An error answered with ``status`` and a JSON body."""

    def __init__(self, status: int, error: str, detail: Any) -> None:
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def error_response(status: int, error: str, detail: Any) -> JSONResponse:
    """The one error shape of the API."""
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


async def bounded_body(request: Request) -> bytes:
    """The request body; 413 once it is over ``MAX_BODY_BYTES`` (declared or read)."""
    too_large = ApiError(413, "payload_too_large", f"request bodies are limited to {MAX_BODY_BYTES} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
    return bytes(raw)


def ctx_of(request: Request) -> ApiContext:
    """The context the app was created with."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


def mutating(endpoint: Endpoint) -> Endpoint:
    """Require ``Authorization: Bearer <[api] token>`` when a token is configured."""

    async def guarded(request: Request) -> Response:
        token = ctx_of(request).config.api.token
        if token:
            header = request.headers.get("authorization", "")
            scheme, _, given = header.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
                return error_response(401, "unauthorized", "this route needs Authorization: Bearer <[api] token>")
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded
