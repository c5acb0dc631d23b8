"""Putting a worker's step path together: leaves first, each handed down to what uses it.

Nothing here is attached after construction and nothing is forwarded only to be read back: the
claim side's timers, the held messages, the outcome writer, the step runner and the processor
are built in that order, each from the parts before it and the narrow settings it reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.circuits import CircuitBreakers
from tasker_worker.domain.herd import ClaimRanking
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.inflight import InFlight
from tasker_worker.runtime.processor import ClaimSettings, ClaimTimers, CommandProcessor
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.steps import StepRunner, StepSettings, circuit_breakers
from tasker_worker.runtime.tracing import step_tracer
from tasker_worker.runtime.writer import OutcomeWriter


def step_path(
    config: TaskerConfig,
    *,
    worker_id: str,
    queues: list[str],
    client: QueueClient,
    pool: AsyncConnectionPool,
    registry: HandlerRegistry,
    executor: HandlerExecutor,
    stats: WorkerStats,
    state: Any = None,
    listening_since: Callable[[], float | None] = lambda: None,
    ranking: ClaimRanking | None = None,
    circuits: CircuitBreakers | None = None,
    held: InFlight | None = None,
    cluster_index: int = 0,
) -> CommandProcessor:
    """The claim side and the step side of one worker, on the database behind ``client``.

    A worker whose namespaces live on several clusters builds one step path per cluster and
    hands each the same ``held`` (its slots: ``[event_system] max_concurrent_processors`` is the
    worker's, whichever cluster a step comes from) and the same ``circuits``; each path claims,
    keeps and writes only its own cluster's messages, through its own ``client``, and tells its
    steps from the others' by ``cluster_index`` (a step_uuid is deduplicated per cluster)."""
    steps = StepSettings.from_config(config, worker_id)
    timers = ClaimTimers(queues, stats)
    shared = held is not None
    held = held if held is not None else InFlight(steps.max_concurrent, steps.vt_seconds)
    writer = OutcomeWriter(client, worker_id, stats, held, timers)
    runner = StepRunner(
        steps,
        store=client,
        held=held,
        writer=writer,
        registry=registry,
        executor=executor,
        circuits=circuits or circuit_breakers(config),
        wakeups=timers,
        stats=stats,
        queue_names=list(queues),
        tracer=step_tracer(config.worker.tracing),
        state=state,
        pool=pool,
        key_salt=cluster_index << 128,
    )
    return CommandProcessor(
        ClaimSettings.from_config(config, worker_id),
        client=client,
        timers=timers,
        runner=runner,
        stats=stats,
        listening_since=listening_since,
        ranking=ranking if config.event_system.listener.single_claimer else None,
        shares_slots=shared,
    )


__all__ = ["step_path"]
