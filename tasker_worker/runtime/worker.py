"""Worker: lifecycle, handler registration, signals and the shutdown budget.

::

    worker = Worker(load_config().config)

    @worker.handler("resize")
    async def resize(ctx, step):
        return {"ok": True}

    anyio.run(worker.run)

Shutdown (SIGTERM/SIGINT or ``request_shutdown``) has one budget, ``shutdown_timeout``: both
sources stop at once, in-flight steps may finish until the deadline, the rest are released
back to their queues at once (vt reset, the attempt given back). A second signal stops
immediately; claimed messages then come back when their vt expires.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import time
import types
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import anyio
import psutil
from psycopg_pool import AsyncConnectionPool

from tasker_worker import __version__, logs
from tasker_worker.config.loader import load_config
from tasker_worker.config.models import PRIMARY, TaskerConfig
from tasker_worker.db import migrations
from tasker_worker.db.clusters import unreachable
from tasker_worker.db.connection import describe, open_pool, resolve_database_url
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff, retry_transient
from tasker_worker.domain.health import WorkerFigures, thresholds_of
from tasker_worker.domain.herd import ClaimRanking
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.schedules import tick_handler, tick_step_uuid
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration
from tasker_worker.errors import (
    ConfigError,
    DatabaseError,
    UsageError,
    WorkerStartupError,
    first_line,
    tasker_error_in,
)
from tasker_worker.fleet.leader import LeaderElection
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.fleet.presence import WorkerPresence
from tasker_worker.fleet.supervision import SupervisionJobs
from tasker_worker.handlers.builtin import register_builtins
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry, PeriodicSpec, RegistersHandlers
from tasker_worker.producer.client import AsyncClient
from tasker_worker.runtime.assembly import step_path
from tasker_worker.runtime.commands import Nudge, Shutdown
from tasker_worker.runtime.control import WorkerControl
from tasker_worker.runtime.event_system import WorkerEventSystem
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.health_monitor import HealthMonitor
from tasker_worker.runtime.inflight import InFlight
from tasker_worker.runtime.listener import ProbeSender
from tasker_worker.runtime.processor import CommandProcessor
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.steps import StepSettings, circuit_breakers

log = logging.getLogger(__name__)

#: A periodic loop sleeps at most this long at a time, so that a clock jump is noticed.
PERIODIC_MAX_SLEEP_S = 60.0

#: After a fleet change is heard, wait this long for more before re-reading the fleet once.
FLEET_SETTLE_S = 0.05

#: A service started beside the worker once it is ready (e.g. the HTTP API); cancelled at stop.
Service = Callable[["Worker"], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class _Database:
    """One cluster the worker uses, opened: the primary first (``[database]``), then each
    cluster that holds some of its namespaces (``[queues.namespaces.<ns>] database``)."""

    name: str
    url: str
    pool: AsyncConnectionPool
    #: The worker's namespaces that live there.
    namespaces: list[str]


@dataclass(frozen=True)
class ClusterParts:
    """What the worker runs for one cluster: its queue client, its event system (listener and
    poller for its namespaces) and its processor (claim loops, runner, writer), which writes
    every outcome to the cluster its message came from."""

    name: str
    url: str
    pool: AsyncConnectionPool
    namespaces: list[str]
    client: QueueClient
    event_system: WorkerEventSystem
    processor: CommandProcessor
    #: The cluster's own housekeeping (outcome retention, event compaction, flow indexes),
    #: elected on that cluster; None on the primary (its supervision does it) or when off.
    housekeeping: LeaderElection | None = None


@dataclass(frozen=True)
class _Parts:
    """What ``Worker._assemble`` builds and ``_serve`` runs."""

    lifecycle: WorkerLifecycle
    ranking: ClaimRanking | None
    event_system: WorkerEventSystem
    control: WorkerControl
    processor: CommandProcessor
    #: Every cluster's parts, the primary's first (one entry when nothing lives elsewhere).
    clusters: list[ClusterParts]


class Worker(RegistersHandlers):
    """One worker process: its namespaces, handlers, event system and processor."""

    def __init__(
        self,
        config: TaskerConfig | None = None,
        *,
        database_url: str | None = None,
        registry: HandlerRegistry | None = None,
        state: Any = None,
        probe_sender: ProbeSender | None = None,
        services: list[Service] | None = None,
        reload_config: Callable[[], TaskerConfig] | None = None,
    ) -> None:
        # No config: the one resolution every entry point uses (files, TASKER_* variables).
        self.config = config if config is not None else load_config().config
        #: Re-reads the configuration on SIGHUP (the CLI passes its loader).
        self.reload_config = reload_config
        self.control: WorkerControl | None = None
        self.database_url = database_url
        self.registry = registry or HandlerRegistry()
        self.state = state if state is not None else types.SimpleNamespace()
        self.hostname = socket.gethostname()
        self.worker_id = (
            self.config.worker.id or f"{self.config.worker.name}-{self.hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.stats = WorkerStats(window=self.config.worker.stats_window)
        self.started_at: datetime | None = None
        self.event_system: WorkerEventSystem | None = None
        self.processor: CommandProcessor | None = None
        self.client: QueueClient | None = None
        #: Each cluster's parts once assembled, the primary's first (``event_system``,
        #: ``processor`` and ``client`` above are the primary's).
        self.clusters: list[ClusterParts] = []
        self.ready = anyio.Event()
        self.stopped = anyio.Event()
        self._probe_sender = probe_sender
        self._services = list(services or [])
        self.presence: WorkerPresence | None = None
        self.supervision: LeaderElection | None = None
        self.health: HealthMonitor | None = None
        self._process = psutil.Process()
        self._stop_requested = anyio.Event()
        self._stop_reason = "requested"
        self._deadline = float("inf")
        self._hard_scope: anyio.CancelScope | None = None

    # --- registration: handler() and periodic() come from RegistersHandlers ------------------

    @property
    def namespaces(self) -> list[str]:
        """Namespaces this worker serves."""
        return list(self.config.worker.namespaces)

    @property
    def queues(self) -> list[str]:
        """Queue names this worker claims from."""
        return [queue_name(ns) for ns in self.namespaces]

    # --- lifecycle -------------------------------------------------------------------------

    def request_shutdown(self, reason: str = "requested") -> None:
        """Begin a graceful shutdown (idempotent)."""
        if not self._stop_requested.is_set():
            self._stop_reason = reason
            self._deadline = anyio.current_time() + self.config.worker.shutdown_timeout.total_seconds()
            self._stop_requested.set()

    def stop_now(self) -> None:
        """Stop immediately (the second signal)."""
        if self._hard_scope is not None:
            self._hard_scope.cancel()

    async def run(self, *, install_signal_handlers: bool = False) -> dict[str, Any]:
        """Run until shutdown; return the final statistics.

        With ``install_signal_handlers``, SIGTERM/SIGINT are handled from the very start: a
        signal during startup lets startup finish (it is bounded) and then stops at once.
        """
        # Bound before anything runs, so that every line of every task (the signal watcher's
        # too) names this worker and the mode it runs now.
        with logs.log_context(
            worker_id=logs.Live(lambda: self.worker_id),
            worker_name=self.config.worker.name,
            deployment_mode=logs.Live(self._mode_now),
            system_id=self.config.event_system.system_id,
        ):
            if not install_signal_handlers:
                return await self._run()
            return await self._run_with_signals()

    def _mode_now(self) -> str:
        es = self.event_system
        return (es.mode if es is not None else self.config.event_system.deployment_mode).value

    async def _run_with_signals(self) -> dict[str, Any]:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_signals)
                try:
                    final = await self._run()
                finally:
                    tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # One failure (a startup error): raise it as itself, so the CLI can explain it.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return final

    def on_start(self, service: Service) -> Service:
        """Run ``service(worker)`` in the background once the worker is ready (a handler
        module's own start: the planners load their compiled kernels so). Cancelled at stop."""
        self._services.append(service)
        return service

    def load_handlers(self) -> HandlerRegistry:
        """Register the handlers this worker runs: its ``[worker] handler_modules`` (the default
        configuration lists the planners, ``tasker_worker.handlers.planning``) and the built-in
        ones (done by ``run``; ``config show`` lists them too)."""
        self._load_handler_modules()
        register_builtins(self.registry)
        return self.registry

    async def _run(self) -> dict[str, Any]:
        """Open the databases, put the worker together, serve until stopped, close."""
        self.load_handlers()
        databases = await self._open_databases()
        pools = [db.pool for db in databases]
        executor = HandlerExecutor(self.config.worker.executor, self.config.worker.executor_workers)
        try:
            parts = await self._assemble(databases, executor)
            executor.start()
            self.started_at = datetime.now(UTC)
            log.info(
                "worker %s started: mode=%s namespaces=%s concurrency=%d loop=%s%s",
                self.worker_id,
                parts.event_system.mode.value,
                ",".join(self.namespaces),
                parts.processor.max_concurrent,
                _loop_name(),
                "".join(f" {c.name}={','.join(c.namespaces) or '-'}" for c in parts.clusters)
                if len(parts.clusters) > 1
                else "",
            )
            await self._serve(parts)
        except Exception as exc:
            # A task's TaskerError (a claim that found a pooler, say) reaches the caller as itself.
            reason = tasker_error_in(exc)
            self._stop_reason = f"failed: {first_line(reason or exc)}"
            if reason is not None and reason is not exc:
                raise reason from exc
            raise
        finally:
            executor.close()
            await self._close(pools)
        final = self.status()
        log.info("worker %s stopped (%s): %s", self.worker_id, self._stop_reason, final["counters"])
        return final

    async def _open_databases(self) -> list[_Database]:
        """Migrate (with ``auto_migrate``) and open the primary, then every other cluster that
        holds one of this worker's namespaces, each with its own settings.

        Every one must answer at start: a worker that came up serving only some of its
        namespaces would look healthy while the others' steps piled up. A cluster that does
        not is a ``DatabaseError`` naming it, its key and its namespaces (and the worker does
        not start: its supervisor restarts it). Once running, a cluster that goes away costs
        only its own namespaces: their claims and listener retry, the others go on."""
        config = self.config
        specs = config.clusters() if config.sharded else {PRIMARY: config.clusters()[PRIMARY]}
        wanted: dict[str, list[str]] = {PRIMARY: []}
        for ns in self.namespaces:
            wanted.setdefault(config.cluster_of(ns) if config.sharded else PRIMARY, []).append(ns)
        opened: list[_Database] = []
        try:
            for name, namespaces in wanted.items():
                spec = specs[name]
                url = self.database_url if name == PRIMARY else spec.url
                if url is None:
                    url = await anyio.to_thread.run_sync(resolve_database_url, spec.settings)
                if name == PRIMARY:
                    self.database_url = url
                try:
                    if spec.settings.auto_migrate:
                        await migrations.migrate(url)
                    pool = await open_pool(url, spec.settings)
                except DatabaseError as exc:
                    if len(wanted) == 1:
                        raise
                    raise unreachable(spec, url, exc, namespaces) from exc
                opened.append(_Database(name, url, pool, namespaces))
        except BaseException:
            with anyio.CancelScope(shield=True):
                for db in opened:
                    await db.pool.close()
            raise
        return opened

    async def _assemble(self, databases: list[_Database], executor: HandlerExecutor) -> _Parts:
        """Build the worker's parts, leaves first, each handed what it uses: the queue clients,
        its registration (before anything is claimed, so every step event names a known
        worker), the supervision candidate, each cluster's event system and step path, control.

        One worker's clusters share its slots (one ``InFlight``: the concurrency is the
        worker's), its handlers, executor, circuits and claim ranking; each cluster has its own
        pool, client, listener and poller, claim loops and outcome writer."""
        es_config = self.config.event_system
        primary = databases[0]
        url, pool = primary.url, primary.pool
        pooled = self.config.database.pooler == "transaction"
        clients = [self._queue_client(db) for db in databases]
        client = clients[0]
        self.client = client
        for db, each in zip(databases, clients, strict=True):
            for ns in db.namespaces:
                await self._startup_call(f"creating the queue of {ns}", partial(each.create_namespace_queue, ns))
        lifecycle = WorkerLifecycle(pool, heartbeat_history=self.config.registry.heartbeat_history)
        ranking: ClaimRanking | None = None
        if self.config.registry.enabled:
            self.presence = WorkerPresence(lifecycle, self._registration, self.config.registry, self._heartbeat)
            self.worker_id = await self.presence.register()
            # Each heartbeat brings the live listening workers of our namespaces, so that a
            # notification is claimed by one of them, not by all (domain/herd.py).
            ranking = ClaimRanking(self.worker_id)
            self.presence.follow_peers(self.namespaces, ranking.update)
        if self.config.registry.supervision_enabled and pooled:
            # The leader holds a session advisory lock, which a transaction pooler would
            # hand to whichever client uses that server connection next.
            log.info(
                "not a supervision candidate behind a transaction pooler: run `tasker-worker api` "
                "or a worker connected directly to supervise the fleet"
            )
        elif self.config.registry.supervision_enabled:
            jobs = SupervisionJobs(lifecycle, self.config.registry, self.config.events, self.config.retention)
            self.supervision = LeaderElection(url, jobs.jobs(), candidate_id=self.worker_id)
        sharded = len(databases) > 1
        # The worker's slots, shared by its clusters' step paths (None: the one path makes its own).
        slots = StepSettings.from_config(self.config, self.worker_id)
        held = InFlight(slots.max_concurrent, slots.vt_seconds) if sharded else None
        circuits = circuit_breakers(self.config) if sharded else None
        clusters: list[ClusterParts] = []
        for index, (db, each) in enumerate(zip(databases, clients, strict=True)):
            event_system = WorkerEventSystem(
                db.url,
                db.namespaces if sharded else self.namespaces,
                es_config,
                self.stats,
                probe_sender=self._probe_sender,
                # The registry is on the primary: its listener alone hears control and fleet changes.
                follow_fleet=db is primary and ranking is not None and es_config.listener.single_claimer,
                control=db is primary,
                cluster=db.name if sharded else None,
            )
            where = f" on cluster {db.name}" if sharded else ""
            await self._startup_call(f"checking LISTEN delivery{where}", event_system.prepare)
            processor = step_path(
                self.config,
                worker_id=self.worker_id,
                queues=[queue_name(ns) for ns in db.namespaces] if sharded else self.queues,
                client=each,
                pool=db.pool,
                registry=self.registry,
                executor=executor,
                stats=self.stats,
                state=self.state,
                listening_since=event_system.listening_since,
                ranking=ranking,
                circuits=circuits,
                held=held,
                cluster_index=index,
            )
            clusters.append(
                ClusterParts(
                    db.name,
                    db.url,
                    db.pool,
                    db.namespaces,
                    each,
                    event_system,
                    processor,
                    None if db is primary else self._housekeeping(db),
                )
            )
        self.clusters = clusters
        event_system = clusters[0].event_system
        self.event_system = event_system
        self.control = WorkerControl(
            event_system,
            self.config,
            self.stats,
            worker_id=self.worker_id,
            lifecycle=lifecycle if self.config.registry.enabled else None,
            check_interval=self.config.registry.heartbeat_interval.total_seconds(),
            reload_config=self.reload_config,
            others=[c.event_system for c in clusters[1:]],
            databases=[self.config.clusters()[c.name].settings for c in clusters[1:]],
        )
        self.processor = clusters[0].processor
        return _Parts(lifecycle, ranking, event_system, self.control, self.processor, clusters)

    def _queue_client(self, db: _Database) -> QueueClient:
        """The queue client of one cluster (prepared statements unless it is behind a pooler)."""
        settings = self.config.clusters()[db.name].settings if db.name != PRIMARY else self.config.database
        return QueueClient(
            db.pool,
            archive=self.config.queues.archive_for,
            store_events=self.config.events.step_events == "stored",
            prepare=settings.pooler != "transaction",
        )

    def _housekeeping(self, db: _Database) -> LeaderElection | None:
        """The jobs that keep a secondary cluster's own history bounded (its outcome rows and
        step keys, its events, its flow indexes), run by whichever of the workers serving it
        holds the supervision lock on that cluster (the registry's jobs stay on the primary)."""
        settings = self.config.clusters()[db.name].settings
        if not self.config.registry.supervision_enabled or settings.pooler == "transaction":
            return None
        lifecycle = WorkerLifecycle(db.pool, heartbeat_history=self.config.registry.heartbeat_history)
        jobs = SupervisionJobs(lifecycle, self.config.registry, self.config.events, self.config.retention)
        return LeaderElection(db.url, jobs.cluster_jobs(), candidate_id=self.worker_id)

    async def _serve(self, parts: _Parts) -> None:
        """Run every part until the processors stop (a shutdown, or ``kill``'s hard scope)."""
        systems = [c.event_system for c in parts.clusters]
        producer = self._producer(parts)
        try:
            await self._serve_parts(parts, systems, producer)
        finally:
            with anyio.CancelScope(shield=True):
                await producer.close()  # the pools it opened itself (none with one cluster)

    async def _serve_parts(self, parts: _Parts, systems: list[WorkerEventSystem], producer: AsyncClient) -> None:
        """``_serve``'s body: the sources, control, supervision and housekeeping, periodic jobs
        and services beside every cluster's processor."""
        es = self.config.event_system
        with anyio.CancelScope() as hard:
            self._hard_scope = hard
            async with anyio.create_task_group() as tg:
                sources = anyio.CancelScope()
                tg.start_soon(self._run_sources, systems, sources)
                tg.start_soon(self._stopper, systems, sources)
                tg.start_soon(parts.control.run)
                if self.supervision is not None:
                    tg.start_soon(self.supervision.run)
                for cluster in parts.clusters:
                    if cluster.housekeeping is not None:
                        tg.start_soon(cluster.housekeeping.run)
                for job in self.registry.periodic_jobs:
                    tg.start_soon(self._periodic_loop, job, producer)
                # "ready" means every source is live: a step sent now is seen by LISTEN.
                for system in systems:
                    await system.wait_listening(es.listener.connection_timeout.total_seconds())
                if es.health_monitoring_enabled:
                    self.health = HealthMonitor(
                        self.figures, thresholds_of(self.config.api), es.health_check_interval.total_seconds()
                    )
                    tg.start_soon(self.health.run)
                if self.presence is not None:
                    # The first heartbeat reports the listener as it is once LISTEN is up,
                    # not as it was a moment before (disconnected, health degraded).
                    tg.start_soon(self.presence.run)
                    if parts.ranking is not None:
                        tg.start_soon(
                            self._follow_fleet, parts.lifecycle, parts.ranking, parts.event_system.fleet_changed
                        )
                self.ready.set()
                for service in self._services:
                    tg.start_soon(service, self)
                if len(parts.clusters) == 1:
                    await parts.processor.run(parts.event_system.receive, lambda: self._deadline)
                else:
                    # Every cluster drains by the one deadline, at the same time.
                    async with anyio.create_task_group() as processors:
                        for cluster in parts.clusters:
                            processors.start_soon(
                                cluster.processor.run, cluster.event_system.receive, lambda: self._deadline
                            )
                tg.cancel_scope.cancel()

    def _producer(self, parts: _Parts) -> AsyncClient:
        """The client periodic jobs send with: on the worker's own pools, sending each tick to
        the cluster of its namespace."""
        if len(parts.clusters) == 1:
            return AsyncClient(pool=parts.clusters[0].pool)
        others = {c.name: c.pool for c in parts.clusters[1:]}
        return AsyncClient(pool=parts.clusters[0].pool, pools=others, config=self.config)

    async def _close(self, pools: list[AsyncConnectionPool]) -> None:
        """Deregister (with the reason it left) and close the pools, by the shutdown's deadline:
        what is left of the budget (a crash or a failed start gets the whole budget from now)."""
        deadline = self._deadline
        if deadline == float("inf"):
            deadline = anyio.current_time() + self.config.worker.shutdown_timeout.total_seconds()
        with anyio.CancelScope(shield=True, deadline=deadline) as scope:
            if self.presence is not None:
                # Also after a failed start or a crash: the row says why this worker left.
                await self.presence.deregister(self._stop_reason[:500])
        if scope.cancelled_caught:
            log.error("shutdown deadline: %s not deregistered; the supervisor marks it offline", self.worker_id)
        with anyio.CancelScope(shield=True):
            # Connections still checked out (hanging on an unreachable server) are closed
            # by the pool after this grace, not waited for.
            grace = max(0.1, min(1.0, deadline - anyio.current_time()))
            if len(pools) == 1:
                await pools[0].close(timeout=grace)
            else:
                async with anyio.create_task_group() as closing:
                    for pool in pools:
                        closing.start_soon(partial(pool.close, timeout=grace))
        self.stopped.set()

    def status(self) -> dict[str, Any]:
        """Statistics, in-flight work and the event system's state."""
        snap = self.processor.status() if self.processor else self.stats.snapshot()
        snap["worker_id"] = self.worker_id
        if self.event_system is not None:
            snap["event_system"] = self.event_system.status()
        if self.presence is not None:
            snap["registry"] = {
                "status": self.presence.last_status.value if self.presence.last_status else None,
                "heartbeats_sent": self.presence.heartbeats_sent,
                "heartbeat_failures": self.presence.heartbeat_failures,
            }
        if self.supervision is not None:
            snap["supervision"] = self.supervision.status()
        if self.control is not None:
            snap["control"] = self.control.status()
        if len(self.clusters) > 1:
            # The counters, slots and in-flight figures above are the worker's (one budget for
            # every cluster); what differs by cluster is listed per cluster.
            snap["queues"] = sorted(q for c in self.clusters for q in c.processor.queues)
            snap["clusters"] = {c.name: _cluster_status(c) for c in self.clusters}
        snap["health"] = self.health.status() if self.health is not None else {"status": "not monitored"}
        return snap

    def figures(self) -> WorkerFigures:
        """What the health checks judge of this worker, read from its own objects as a frozen
        value (the status dict, with its latency percentiles, is for the API and heartbeats)."""
        counters = self.stats.counters
        minute = self.stats.last_minute()
        es = self.event_system
        systems = [c.event_system for c in self.clusters] or ([es] if es is not None else [])
        listeners = [s.listener for s in systems if s.listener is not None]
        # Several clusters: healthy only when every cluster's listener is, heard when any was.
        heard = max((x.last_notification_at for x in listeners if x.last_notification_at is not None), default=None)
        return WorkerFigures(
            worker_id=self.worker_id,
            deployment_mode=es.mode.value if es is not None else "unknown",
            listener_healthy=all(x.healthy for x in listeners) if listeners else None,
            last_notification_age_s=None if heard is None else round(time.monotonic() - heard, 3),
            missed_wakeups=counters.get("missed_wakeups", 0),
            claimed_event=counters.get("claimed_event", 0),
            handler_runs=int(minute.get("runs", 0)),
            handler_errors=int(minute.get("errors", 0)),
            open_circuits=self.processor.steps.circuits.open_circuits() if self.processor is not None else {},
        )

    async def set_mode(self, mode: DeploymentMode | str, *, source: str = "api") -> bool:
        """Switch the running worker's deployment mode; False if it was refused (see the log)."""
        if self.control is None:
            raise UsageError("set_mode needs a running worker (call it once `ready` is set)")
        return await self.control.set_mode(DeploymentMode(mode), source=source)

    async def _follow_fleet(self, lifecycle: WorkerLifecycle, ranking: ClaimRanking, changes: Nudge) -> None:
        """Re-read the live listening workers of our namespaces whenever the fleet changes
        (between heartbeats, which read them too), so that the claim ranking includes a worker
        from the moment it registers and drops it when it leaves."""
        while True:
            await changes.wait()
            await anyio.sleep(FLEET_SETTLE_S)  # a fleet starting together: one read for all of it
            try:
                ranking.update(await lifecycle.listening_peers(self.namespaces, self.config.registry.stale_timeout))
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("reading the fleet failed (%s); the next heartbeat reads it", first_line(exc))
            except Exception:
                # The ranking only saves claims: a failure here must not stop the worker's steps.
                log.exception("reading the fleet failed; the next heartbeat reads it")

    async def _run_sources(self, systems: list[WorkerEventSystem], scope: anyio.CancelScope) -> None:
        with scope:
            if len(systems) == 1:
                await systems[0].run()
                return
            async with anyio.create_task_group() as tg:
                for system in systems:
                    tg.start_soon(system.run)

    async def _stopper(self, systems: list[WorkerEventSystem], sources: anyio.CancelScope) -> None:
        await self._stop_requested.wait()
        sources.cancel()
        for system in systems:
            await system.send.send(Shutdown(self._stop_reason))

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP) as signals:
            if EARLY_SIGNALS:
                # Caught before the event loop ran (see ``catch_early_signals``).
                self.request_shutdown(signal.Signals(EARLY_SIGNALS[0]).name)
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGUSR1:
                    _dump_tasks()
                    continue
                if signum == signal.SIGHUP:
                    if self.control is not None:
                        self.control.request_reload()
                    continue
                if self._stop_requested.is_set():
                    log.warning("second %s: stopping immediately", name)
                    self.stop_now()
                    return
                log.info("%s: shutting down (budget %s)", name, self.config.worker.shutdown_timeout)
                self.request_shutdown(name)

    async def _startup_call(self, what: str, call: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """A startup step, retried with backoff on transient database errors (a restarting or
        flaky server must not need a supervisor to get the worker going)."""
        attempts = self.config.registry.registration_attempts
        backoff = Backoff(timedelta(milliseconds=200), self.config.registry.registration_max_delay)
        try:
            return await retry_transient(call, what=what, backoff=backoff, attempts=attempts)
        except TRANSIENT_DB_ERRORS as exc:
            raise WorkerStartupError(f"{what} failed {attempts} times: {first_line(exc)}") from exc

    def _registration(self) -> WorkerRegistration:
        endpoint = None
        if self.config.api.enabled:
            endpoint = f"http://{self.config.api.host}:{self.config.api.port}"
        return WorkerRegistration(
            worker_id=self.config.worker.id or self.worker_id,
            name=self.config.worker.name,
            hostname=self.hostname,
            pid=os.getpid(),
            endpoint=endpoint,
            namespaces=self.namespaces,
            capabilities=self.registry.capabilities(),
            version=__version__,
            # The mode it runs now (the event system's), which a `mode set` may have changed.
            deployment_mode=(
                self.event_system.mode if self.event_system else self.config.event_system.deployment_mode
            ).value,
            cpu_cores=os.cpu_count() or 1,
            memory_total=psutil.virtual_memory().total,
        )

    def _heartbeat(self) -> Heartbeat:
        """What this worker reports each heartbeat."""
        status = self.status()
        counters = status.get("counters", {})
        processor = self.processor
        with self._process.oneshot():
            cpu = self._process.cpu_percent(interval=None)  # since the previous heartbeat
            rss = self._process.memory_info().rss
        return Heartbeat(
            cpu_percent=cpu,
            memory_used=rss,
            active_steps=len(processor.steps.in_flight) if processor else 0,
            processed=int(counters.get("processed", 0)),
            busy=processor is not None and processor.free_slots <= 0,
            stats=status,
        )

    async def _periodic_loop(self, job: PeriodicSpec, producer: AsyncClient) -> None:
        """Run ``job`` at each tick: here, or (``fleet_once``) by enqueueing the tick's step,
        which every worker of the fleet names alike and which is therefore sent and run once."""
        cadence = job.cadence
        namespace = job.namespace or self.namespaces[0]
        if job.fleet_once and job.catch_up:
            # A tick missed while the fleet was down runs once now (a no-op if it ran).
            await self._enqueue_tick(job, producer, namespace, cadence.last_tick(datetime.now(UTC)))
        timeout = job.timeout or self.config.worker.periodic_timeout
        assert self.processor is not None
        executor = self.processor.steps.executor
        tick = cadence.next_tick(datetime.now(UTC))
        while True:
            # Slept in bounded pieces: a wall clock that jumps is noticed within a minute.
            left = (tick - datetime.now(UTC)).total_seconds()
            if left > 0:
                await anyio.sleep(min(left, PERIODIC_MAX_SLEEP_S))
                continue
            if job.fleet_once:
                await self._enqueue_tick(job, producer, namespace, tick)
            else:
                ctx = types.SimpleNamespace(worker_id=self.worker_id, state=self.state, job=job.name, log=log)
                try:
                    await executor.run(job.func, job.is_async, (ctx,), timeout)
                except Exception as exc:
                    log.warning("periodic job %s failed: %s", job.name, exc)
            tick = cadence.next_tick(max(tick, datetime.now(UTC)))

    async def _enqueue_tick(self, job: PeriodicSpec, producer: AsyncClient, namespace: str, tick: datetime) -> None:
        try:
            await producer.send_step(
                namespace,
                tick_handler(job.name),
                {"tick": tick.isoformat(), "schedule": job.name},
                step_uuid=tick_step_uuid(job.name, tick),
                notify=False,
            )
        except Exception as exc:
            # The next tick is sent all the same; a missed one is caught up at the next start.
            log.warning("periodic job %s: tick %s not enqueued: %s", job.name, tick.isoformat(), first_line(exc))

    def _load_handler_modules(self) -> None:
        for path in self.config.worker.handler_modules:
            try:
                module = importlib.import_module(path)
            except Exception as exc:
                raise ConfigError(
                    f"cannot import handler module {path!r}: {exc}", key="worker.handler_modules"
                ) from exc
            register = getattr(module, "register", None)
            if not callable(register):
                raise ConfigError(
                    f"handler module {path!r} has no register(worker) function", key="worker.handler_modules"
                )
            register(self)


def _cluster_status(cluster: ClusterParts) -> dict[str, Any]:
    """What one cluster of a worker is doing: its database, namespaces, event sources, the
    steps of its queues held now and its last claim error."""
    processor = cluster.processor
    queues = processor.queues
    return {
        "database": describe(cluster.url),
        "namespaces": list(cluster.namespaces),
        "event_system": cluster.event_system.status(),
        "held": sum(1 for e in processor.held.entries.values() if e.msg.queue in queues),
        "last_error": processor.last_error,
        "housekeeping": cluster.housekeeping.status() if cluster.housekeeping is not None else None,
    }


#: SIGTERM/SIGINT received between process start and the worker's own handlers.
EARLY_SIGNALS: list[int] = []


def catch_early_signals() -> None:
    """Record SIGTERM/SIGINT from now on, so that a signal during imports and startup is a
    graceful stop (exit 0) rather than the default abrupt death."""

    def record(signum: int, frame: Any) -> None:
        EARLY_SIGNALS.append(signum)

    signal.signal(signal.SIGTERM, record)
    signal.signal(signal.SIGINT, record)


def _dump_tasks() -> None:
    """SIGUSR1: log where every task of the worker waits (for a worker that seems stuck)."""
    import asyncio
    import io

    out = io.StringIO()
    tasks = asyncio.all_tasks()
    for task in tasks:
        out.write(f"--- {task.get_name()}\n")
        # Follow the chain of awaits down to where the task actually waits.
        awaitable: Any = task.get_coro()
        for _ in range(50):
            frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
            if frame is not None:
                out.write(f"    {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}\n")
            nxt = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
            if nxt is None:
                if awaitable is not None and frame is None:
                    out.write(f"    waiting on {awaitable!r}\n")
                break
            awaitable = nxt
    log.warning("SIGUSR1: %d tasks\n%s", len(tasks), out.getvalue())


def _loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop runs this worker (``[worker] event_loop``)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


__all__ = ["StepContext", "Worker"]
