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
from tasker_worker.config.models import TaskerConfig
from tasker_worker.db import migrations
from tasker_worker.db.connection import open_pool, resolve_database_url
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff, retry_transient
from tasker_worker.domain.health import WorkerFigures, thresholds_of
from tasker_worker.domain.herd import ClaimRanking
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.schedules import tick_handler, tick_step_uuid
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration
from tasker_worker.errors import ConfigError, UsageError, WorkerStartupError, first_line, tasker_error_in
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
from tasker_worker.runtime.listener import ProbeSender
from tasker_worker.runtime.processor import CommandProcessor
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)

#: A periodic loop sleeps at most this long at a time, so that a clock jump is noticed.
PERIODIC_MAX_SLEEP_S = 60.0

#: After a fleet change is heard, wait this long for more before re-reading the fleet once.
FLEET_SETTLE_S = 0.05

#: A service started beside the worker once it is ready (e.g. the HTTP API); cancelled at stop.
Service = Callable[["Worker"], Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class _Parts:
    """What ``Worker._assemble`` builds and ``_serve`` runs."""

    lifecycle: WorkerLifecycle
    ranking: ClaimRanking | None
    event_system: WorkerEventSystem
    control: WorkerControl
    processor: CommandProcessor


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
        """Open the database, put the worker together, serve until stopped, close."""
        self.load_handlers()
        url = self.database_url
        if url is None:
            url = await anyio.to_thread.run_sync(resolve_database_url, self.config.database)
        self.database_url = url
        if self.config.database.auto_migrate:
            await migrations.migrate(url)
        pool = await open_pool(url, self.config.database)
        executor = HandlerExecutor(self.config.worker.executor, self.config.worker.executor_workers)
        try:
            parts = await self._assemble(url, pool, executor)
            executor.start()
            self.started_at = datetime.now(UTC)
            log.info(
                "worker %s started: mode=%s namespaces=%s concurrency=%d loop=%s",
                self.worker_id,
                parts.event_system.mode.value,
                ",".join(self.namespaces),
                parts.processor.max_concurrent,
                _loop_name(),
            )
            await self._serve(parts, pool)
        except Exception as exc:
            # A task's TaskerError (a claim that found a pooler, say) reaches the caller as itself.
            reason = tasker_error_in(exc)
            self._stop_reason = f"failed: {first_line(reason or exc)}"
            if reason is not None and reason is not exc:
                raise reason from exc
            raise
        finally:
            executor.close()
            await self._close(pool)
        final = self.status()
        log.info("worker %s stopped (%s): %s", self.worker_id, self._stop_reason, final["counters"])
        return final

    async def _assemble(self, url: str, pool: AsyncConnectionPool, executor: HandlerExecutor) -> _Parts:
        """Build the worker's parts, leaves first, each handed what it uses: the queue client,
        its registration (before anything is claimed, so every step event names a known
        worker), the supervision candidate, the event system, control and the step path."""
        es_config = self.config.event_system
        pooled = self.config.database.pooler == "transaction"
        client = QueueClient(
            pool,
            archive=self.config.queues.archive_for,
            store_events=self.config.events.step_events == "stored",
            prepare=not pooled,
        )
        self.client = client
        for ns in self.namespaces:
            await self._startup_call(f"creating the queue of {ns}", partial(client.create_namespace_queue, ns))
            notify = self.config.queues.notify_for(ns)
            if notify is not None:
                # The send trigger reads the switch from the database (migration 0020).
                await self._startup_call(
                    f"setting the notifications of {ns}",
                    partial(client.set_queue_notify, ns, notify, f"worker {self.worker_id}"),
                )
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
        event_system = WorkerEventSystem(
            url,
            self.namespaces,
            es_config,
            self.stats,
            probe_sender=self._probe_sender,
            follow_fleet=ranking is not None and es_config.listener.single_claimer,
        )
        await self._startup_call("checking LISTEN delivery", event_system.prepare)
        self.event_system = event_system
        self.control = WorkerControl(
            event_system,
            self.config,
            self.stats,
            worker_id=self.worker_id,
            lifecycle=lifecycle if self.config.registry.enabled else None,
            check_interval=self.config.registry.heartbeat_interval.total_seconds(),
            reload_config=self.reload_config,
        )
        self.processor = step_path(
            self.config,
            worker_id=self.worker_id,
            queues=self.queues,
            client=client,
            pool=pool,
            registry=self.registry,
            executor=executor,
            stats=self.stats,
            state=self.state,
            listening_since=event_system.listening_since,
            ranking=ranking,
            listens=event_system.has_listener,
            polled=event_system.has_poller,
        )
        return _Parts(lifecycle, ranking, event_system, self.control, self.processor)

    async def _serve(self, parts: _Parts, pool: AsyncConnectionPool) -> None:
        """Run every part until the processor stops (a shutdown, or ``kill``'s hard scope)."""
        es = self.config.event_system
        with anyio.CancelScope() as hard:
            self._hard_scope = hard
            async with anyio.create_task_group() as tg:
                sources = anyio.CancelScope()
                tg.start_soon(self._run_sources, parts.event_system, sources)
                tg.start_soon(self._stopper, parts.event_system, sources)
                tg.start_soon(parts.control.run)
                if self.supervision is not None:
                    tg.start_soon(self.supervision.run)
                producer = AsyncClient(pool=pool)
                for job in self.registry.periodic_jobs:
                    tg.start_soon(self._periodic_loop, job, producer)
                # "ready" means every source is live: a step sent now is seen by LISTEN.
                await parts.event_system.wait_listening(es.listener.connection_timeout.total_seconds())
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
                await parts.processor.run(parts.event_system.receive, lambda: self._deadline)
                tg.cancel_scope.cancel()

    async def _close(self, pool: AsyncConnectionPool) -> None:
        """Deregister (with the reason it left) and close the pool, by the shutdown's deadline:
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
            await pool.close(timeout=max(0.1, min(1.0, deadline - anyio.current_time())))
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
        snap["health"] = self.health.status() if self.health is not None else {"status": "not monitored"}
        return snap

    def figures(self) -> WorkerFigures:
        """What the health checks judge of this worker, read from its own objects as a frozen
        value (the status dict, with its latency percentiles, is for the API and heartbeats)."""
        counters = self.stats.counters
        minute = self.stats.last_minute()
        es = self.event_system
        listener = es.listener if es is not None else None
        heard = listener.last_notification_at if listener is not None else None
        return WorkerFigures(
            worker_id=self.worker_id,
            deployment_mode=es.mode.value if es is not None else "unknown",
            listener_healthy=None if listener is None else listener.healthy,
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

    async def _run_sources(self, event_system: WorkerEventSystem, scope: anyio.CancelScope) -> None:
        with scope:
            await event_system.run()

    async def _stopper(self, event_system: WorkerEventSystem, sources: anyio.CancelScope) -> None:
        await self._stop_requested.wait()
        sources.cancel()
        await event_system.send.send(Shutdown(self._stop_reason))

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
