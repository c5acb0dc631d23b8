"""StepRunner: one step's life, from a claimed message to the Settlement it ends with.

The claim side (``processor.py``) hands each claimed message to ``start``, which runs its step
in a task of its own: decode and deduplicate it, find its handler, run it under its timeout, and
ask the rulebook (``domain/verdicts.py``) what follows. Whatever happens, the step ends with one
call: ``OutcomeWriter.end(entry, settlement)`` (``writer.py``), which writes it batched with
other steps' ends and then counts it, schedules what follows and stops holding its message.

What a claimed message ends with (every write fenced on the read_ct it was claimed with):

==========================  =========================================================
handler returns             ``Record(succeeded)``: outcome + settle (batched)
``StepFailed``              ``Record(failed)``: a business failure
malformed / unknown handler ``DeadLetter(dead_lettered)``: outcome + move to ``<queue>_dlq``
a tasker-core step          ``PutBack`` without an attempt, left for tasker-core's workers
``NonRetryableError``       ``DeadLetter(dead_lettered)``
any other error / timeout   ``PutBack`` with backoff via vt; after the attempt limit,
                            ``DeadLetter(failed)``
``DependencyUnavailable``   ``PutBack`` with backoff, the attempt given back
open circuit, duplicate     ``PutBack`` without an attempt
outcome already recorded    ``Record(None)``: settle only (dedup)
==========================  =========================================================

The runner holds no database specifics: it works through the ``StepStore`` port
(``ports.py``), so ``tasker_worker.testing.HandlerHarness`` runs this same runner in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.durations import parse_duration
from tasker_worker.config.models import TaskerConfig
from tasker_worker.domain.circuits import CircuitBreakers, CircuitState
from tasker_worker.domain.names import namespace_of
from tasker_worker.domain.settlement import SETTLE_ONLY, DeadLetter, PutBack, Record, Settlement, Written
from tasker_worker.domain.steps import ClaimedMessage, Outcome, Source, StepMessage, is_tasker_core_step
from tasker_worker.domain.verdicts import (
    HANDLER_ERROR_VERDICTS,
    RetryPolicy,
    VerdictKind,
    after_failure,
    after_success,
    cancelled,
    decide_failure,
    held_by_circuit,
    lacking_capability,
    left_for_tasker_core,
    no_such_handler,
    not_a_step,
    running_here_already,
    snoozed,
    step_timeout,
)
from tasker_worker.errors import (
    DependencyUnavailable,
    Snooze,
    StepFailed,
    StepTimeout,
    StepValidationError,
    first_line,
)
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry, HandlerSpec, Middleware
from tasker_worker.logs import error_fields
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.inflight import HeldStep, InFlight
from tasker_worker.runtime.ports import WAKE_MARGIN_S, StepStore, Wakeups
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.tracing import StepTracer
from tasker_worker.runtime.writer import OutcomeWriter, step_fields

# The logger the step lines have always had (docs/troubleshooting.md shows it; operators filter on it).
log = logging.getLogger("tasker_worker.runtime.processor")

# What a handler (or a middleware) may return that is more than its result: a tuple, as
# isinstance of a union type costs more per step.
_SPECIAL_RESULTS = (Snooze, Record, DeadLetter, PutBack)


@dataclass(frozen=True)
class StepSettings:
    """What the step side reads of the configuration."""

    worker_id: str
    max_concurrent: int
    #: The claim's visibility timeout, whole seconds.
    vt_seconds: int
    handler_timeout: timedelta
    #: ``[retry]``, before a handler's own policy.
    retry: RetryPolicy
    #: A worker is live when it showed a sign of life this recently (capability rejections).
    stale_timeout_s: float
    max_rejections: int
    #: How long a step asked to stop may end by itself before an async handler is cancelled.
    cancel_grace_s: float = 5.0

    @classmethod
    def from_config(cls, config: TaskerConfig, worker_id: str) -> StepSettings:
        """The settings of a worker's configuration."""
        es = config.event_system
        return cls(
            worker_id=worker_id,
            max_concurrent=es.max_concurrent_processors,
            vt_seconds=max(1, math.ceil(es.fallback_poller.visibility_timeout.total_seconds())),
            handler_timeout=config.worker.handler_timeout,
            retry=RetryPolicy.from_settings(config.retry),
            stale_timeout_s=config.registry.stale_timeout.total_seconds(),
            max_rejections=config.worker.max_rejections,
            cancel_grace_s=config.worker.cancel_grace.total_seconds(),
        )


def circuit_breakers(config: TaskerConfig, clock: Any = None) -> CircuitBreakers:
    """The handlers' circuit breakers of ``[circuit_breaker]`` (on ``clock``, else real time)."""
    breaker = config.circuit_breaker
    return CircuitBreakers(
        failure_threshold=breaker.failure_threshold,
        cooldown=breaker.cooldown,
        max_cooldown=breaker.max_cooldown,
        enabled=breaker.enabled,
        **({"clock": clock} if clock is not None else {}),
    )


#: Prefetch only while steps take less than this on average: for longer ones a claim's round
#: trip is noise, and a buffer would hold steps back from idle peers. Until a step has run, the
#: typical step is taken to be this long (so a worker prefetches only once it knows).
PREFETCH_MAX_STEP_S = 0.05
#: Cancel requests kept for steps not (yet) running here.
EARLY_CANCELS_KEPT = 1024
#: The weight of each run in ``StepRunner.typical_step_s`` (about the last 20 runs count).
STEP_TIME_WEIGHT = 0.05


class ProgressBoard:
    """The last progress each running step reported, until it is written (``take``): at most
    one row per step, the newest value winning. Thread-safe for the one thing sync handlers do
    (a report from their thread: a dict assignment under the GIL)."""

    def __init__(self) -> None:
        self._pending: dict[str, dict[str, Any]] = {}

    def report(self, ctx: StepContext, progress: tuple[float | None, str | None, Any]) -> None:
        """``ctx``'s step reported ``(fraction, note, data)``."""
        fraction, note, data = progress
        self._pending[str(ctx.step.step_uuid)] = {
            "step_uuid": str(ctx.step.step_uuid),
            "namespace": ctx.step.namespace,
            "fraction": fraction,
            "note": note,
            "data": data,
        }

    def __bool__(self) -> bool:
        return bool(self._pending)

    def take(self) -> list[dict[str, Any]]:
        """Everything reported since the last ``take``."""
        taken, self._pending = self._pending, {}
        return list(taken.values())


class StepRunner:
    """Runs claimed steps, at most ``max_concurrent`` at once, and ends each one once."""

    def __init__(
        self,
        settings: StepSettings,
        *,
        store: StepStore,
        held: InFlight,
        writer: OutcomeWriter,
        registry: HandlerRegistry,
        executor: HandlerExecutor,
        circuits: CircuitBreakers,
        wakeups: Wakeups,
        stats: WorkerStats,
        queue_names: list[str],
        tracer: StepTracer | None = None,
        state: Any = None,
        pool: AsyncConnectionPool | None = None,
        key_salt: int = 0,
    ) -> None:
        self.settings = settings
        #: Added (bits above a UUID's 128) to each step_uuid's integer where the worker's held
        #: steps are shared by several clusters' runners: dedup is per cluster, so the same
        #: step_uuid on two clusters is two steps (0 with one cluster).
        self.key_salt = key_salt
        self.worker_id = settings.worker_id
        self.store = store
        self.held = held
        self.writer = writer
        self.registry = registry
        self.executor = executor
        self.circuits = circuits
        self.wakeups = wakeups
        self.stats = stats
        self.queue_names = queue_names
        #: OpenTelemetry (the otel extra); None costs the step path one ``is None`` test.
        self.tracer = tracer
        self.state = state
        #: Where a handler's ``ctx.transaction()`` comes from (None: handlers get none).
        self.pool = pool
        self._policies: dict[str, RetryPolicy] = {}
        #: The middlewares around every handler call, the runtime's first (built on first use).
        self._chain: list[Middleware] | None = None
        self._builtin_count = 0
        #: What running steps reported with ``ctx.progress``, until the next write.
        self.progress = ProgressBoard()
        #: A moving average of handler run times (seconds).
        self.typical_step_s = PREFETCH_MAX_STEP_S
        #: Cancel requests of steps not running here when they came: step_uuid int -> who asked.
        self._early_cancels: OrderedDict[int, str] = OrderedDict()
        #: Per queue: whether a step with a priority, and one with a group, was noted.
        self._flow_noted: dict[str, tuple[bool, bool]] = {}
        #: Queues this worker found tasker-core steps in (each is logged once).
        self._tasker_core_queues: set[str] = set()

    @property
    def in_flight(self) -> InFlight:
        """The messages held here (running, or waiting for their write)."""
        return self.held

    @property
    def handed_off(self) -> int:
        """How many held messages only wait for their write."""
        return self.held.handed_off

    def start(self, msg: ClaimedMessage) -> HeldStep:
        """Run the step of a message just claimed (not held here yet), in a task of its own.

        One plain asyncio task per step: an anyio task group's bookkeeping cost more than a
        no-op step itself. The task is referenced by the message's entry until the step ends;
        ``cancel`` cancels those still running at shutdown."""
        entry = self.held.hold(msg)
        entry.task = asyncio.get_running_loop().create_task(self._run_step(entry))
        return entry

    def start_buffered(self, entry: HeldStep) -> None:
        """Run the step of a prefetched message (held already, in the buffer) now."""
        self.held.unbuffer(entry)
        entry.task = asyncio.get_running_loop().create_task(self._run_step(entry))

    async def cancel(self, entries: list[HeldStep]) -> None:
        """Cancel the step tasks of ``entries`` still running and wait (bounded) until they are
        gone (at shutdown: their messages were given back, or return at their vt)."""
        tasks = [e.task for e in entries if e.task is not None and not e.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded by the caller's scope too (the shutdown deadline).
            with anyio.move_on_after(10):
                await asyncio.gather(*tasks, return_exceptions=True)

    def policy_for(self, spec: HandlerSpec) -> RetryPolicy:
        """``[retry]`` with the handler's own policy applied (computed once per handler)."""
        policy = self._policies.get(spec.name)
        if policy is None:
            policy = self._policies[spec.name] = spec.retry_policy(self.settings.retry)
        return policy

    # --- one step -------------------------------------------------------------------------

    async def _run_step(self, entry: HeldStep) -> None:
        """One step's life: the settlement it ends with goes to the writer, whatever happens."""
        try:
            settlement = await self._settle_step(entry)
            if settlement is not None and not entry.releasing:
                self.writer.end(entry, settlement)
        except Exception:
            # Whatever went wrong, it stays with this step: the message returns after its vt
            # (and its outcome, if one was committed, is found by dedup then).
            self.stats.incr("internal_errors")
            msg = entry.msg
            log.exception(
                "step msg %s of %s failed inside the runtime; it returns after its vt",
                msg.msg_id,
                msg.queue,
                extra=step_fields(msg),
            )
        finally:
            # Ended by nobody (an error above, a cancellation): its message returns at its vt;
            # unless the shutdown gives it back (``releasing``), which ends it then.
            if not entry.ending and not entry.releasing:
                self.writer.abandon(entry)

    async def _settle_step(self, entry: HeldStep) -> Settlement | None:
        """What the step of ``entry`` ends with (None: it was ended in its handler's own
        transaction already)."""
        msg = entry.msg
        if msg.already_done:
            self.stats.incr("dedup_hits")
            return SETTLE_ONLY
        try:
            step = StepMessage.decode(msg.body)
        except StepValidationError as exc:
            if is_tasker_core_step(msg.body):
                self._left_for_tasker_core(msg)
                return left_for_tasker_core()
            return not_a_step(exc)
        msg.step = step
        if step.priority or step.group is not None:
            await self._note_flow_fields(msg.queue, step)
        # The UUID's integer: hashing a UUID object is a Python-level call per step.
        step_key = step.step_uuid.int | self.key_salt
        held = self.held
        if step_key in held.steps:
            # Another message of the same step runs here now: come back when it is done,
            # then find its outcome recorded and settle without running.
            self.stats.incr("dedup_hits")
            return running_here_already()
        if held.recorded_here(step_key):
            # Claimed in the same batch as a message of the same step that ran here first:
            # the claim's dedup probe could not see that outcome yet.
            self.stats.incr("dedup_hits")
            return SETTLE_ONLY
        held.steps[step_key] = (msg.queue, msg.msg_id)
        entry.step_key = step_key
        early = self._early_cancels.pop(step_key, None)
        if early is not None:  # asked to stop before it started here (prefetched, or in transit)
            entry.cancel_by = early
        return await self._execute(entry, step)

    async def _note_flow_fields(self, queue: str, step: StepMessage) -> None:
        """The first step of a queue with a priority (or a group) seen here: say so in the
        database, once, so that every claim of its namespace orders by them from now on."""
        had = self._flow_noted.get(queue, (False, False))
        now = (had[0] or step.priority > 0, had[1] or step.group is not None)
        if now == had:
            return
        self._flow_noted[queue] = now
        try:
            await self.store.note_flow_fields(namespace_of(queue) or step.namespace, *now)
        except psycopg.Error as exc:
            self._flow_noted[queue] = had  # the next such step tries again
            log.warning("could not note the priorities or groups of %s: %s", queue, first_line(exc))

    def _left_for_tasker_core(self, msg: ClaimedMessage) -> None:
        """Say once per queue that it holds tasker-core steps, which this worker leaves alone."""
        if msg.queue in self._tasker_core_queues:
            return
        self._tasker_core_queues.add(msg.queue)
        log.warning(
            "queue %s holds tasker-core steps (msg %s: task_uuid, step_uuid and correlation_id only); "
            "this worker gives them back for tasker-core's workers and counts them in tasker_core_steps_left "
            "(docs/tasker-core.md)",
            msg.queue,
            msg.msg_id,
            extra=step_fields(msg),
        )

    async def _execute(self, entry: HeldStep, step: StepMessage) -> Settlement | None:
        spec = self.registry.get(step.handler)
        if spec is None:
            return no_such_handler(step.handler, list(self.registry.names))
        if spec.requires is not None:
            needed = spec.requires(step.inputs)
            if needed not in spec.capabilities:
                return await self._reject(entry.msg, step, needed)
        circuits = self.circuits
        if not circuits.circuits:  # the common case: no handler reported an unavailable dependency
            return await self._run_handler(entry, step, spec)
        if not circuits.allow(step.handler):
            self.stats.incr("circuit_held")
            return held_by_circuit(step.handler, circuits.retry_after(step.handler))
        probe = circuits.state_of(step.handler) is CircuitState.HALF_OPEN
        try:
            return await self._run_handler(entry, step, spec)
        finally:
            if probe:
                circuits.release_probe(step.handler)
                # The handler's other steps were left unclaimed while the probe ran: look for
                # them now, in every mode (no notification comes for messages already queued).
                for queue in self.queue_names:
                    self.wakeups.schedule(queue, 0.0, Source.POLL)

    async def _run_handler(self, entry: HeldStep, step: StepMessage, spec: HandlerSpec) -> Settlement | None:
        msg = entry.msg
        started_at = time.time()
        start_mono = time.monotonic()
        self.stats.queue_to_start[msg.source].append(
            (msg.claimed_at - msg.enqueued_at).total_seconds() + (start_mono - msg.received_mono)
        )
        ctx = StepContext(
            step=step,
            attempt=msg.read_ct,
            worker_id=self.worker_id,
            queue=msg.queue,
            msg_id=msg.msg_id,
            state=self.state,
            headers=msg.headers,
            _pool=self.pool,
            _report=self.progress.report,
        )
        entry.ctx = ctx
        if entry.cancel_by is not None:  # asked to stop before it started: it does not run
            ctx.request_cancel(entry.cancel_by)
            return cancelled(ctx.cancelled_by, started_at, time.time())
        timeout = step_timeout(step.timeout, spec.timeout, self.settings.handler_timeout)
        try:
            result = await self._call(spec, ctx, step, timeout, entry.task)
        except asyncio.CancelledError:
            if not entry.cancel_fired:
                raise
            # Our cancellation (a cancel asked for, its grace over), not the worker's.
            task = entry.task
            if task is not None:
                task.uncancel()
            await ctx.rollback(_Cancelled())
            return cancelled(ctx.cancelled_by, started_at, time.time())
        except Snooze as snooze:
            await ctx.rollback(snooze)
            return self._snoozed(msg, spec, snooze)
        except Exception as exc:
            await ctx.rollback(exc)
            if ctx.cancelled:
                return cancelled(ctx.cancelled_by, started_at, time.time())
            self._judge_circuit(msg, step, exc)
            return self._after_failure(msg, step, exc, started_at, self.policy_for(spec))
        if ctx.cancelled:
            # Stopped cooperatively, or ran to its end after all: cancelled either way, and
            # nothing it wrote in its transaction stays.
            await ctx.rollback(_Cancelled())
            return cancelled(ctx.cancelled_by, started_at, time.time())
        if result is not None and isinstance(result, _SPECIAL_RESULTS):
            if isinstance(result, Snooze):
                await ctx.rollback(result)
                return self._snoozed(msg, spec, result)
            await ctx.rollback(_ShortCircuited())  # a middleware decided the step's end itself
            return result
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "step succeeded",
                extra={**step_fields(msg), "execution_ms": round((time.monotonic() - start_mono) * 1000, 3)},
            )
        if self.circuits.circuits:
            self._judge_circuit(msg, step, None)
        settlement = after_success(result, started_at, time.time())
        if ctx.has_transaction:
            return await self._record_in_handler_transaction(entry, ctx, settlement)
        return settlement

    def _call(
        self, spec: HandlerSpec, ctx: StepContext, step: StepMessage, timeout: timedelta, task: Any
    ) -> Awaitable[Any]:
        """The handler call through every middleware: the runtime's (handler metrics, then a
        span when tracing is on), then the registered ones in order, the first outermost. The
        chain's links are made only when there is more than the metrics to go through (a plain
        function returning the outermost awaitable: one coroutine frame less per step)."""

        def handler() -> Awaitable[Any]:
            return self.executor.run(spec.func, spec.is_async, (ctx, step), timeout, task=task)

        inner = self._middlewares
        if not inner:
            return self._measure(ctx, step, handler)

        def link(i: int) -> Callable[[], Awaitable[Any]]:
            if i == len(inner):
                return handler
            following = link(i + 1)
            middleware = inner[i]
            return lambda: middleware(ctx, step, following)

        return self._measure(ctx, step, link(0))

    @property
    def _middlewares(self) -> list[Middleware]:
        """The middlewares inside the metrics: the span (tracing on), then the registered ones."""
        found = self._chain
        if found is None or len(found) != self._builtin_count + len(self.registry.middlewares):
            builtin: list[Middleware] = [self._trace] if self.tracer is not None else []
            self._builtin_count = len(builtin)
            found = self._chain = [*builtin, *self.registry.middlewares]
        return found

    async def _measure(self, ctx: StepContext, step: StepMessage, call_next: Callable[[], Awaitable[Any]]) -> Any:
        """The runtime's handler metrics, as a middleware: duration by outcome, error share, and
        the typical step time (which decides whether prefetching pays)."""
        began = time.monotonic()
        try:
            result = await call_next()
        except Snooze:
            self._observed(step, "snoozed", began)
            raise
        except Exception as exc:
            self._observed(step, _handler_outcome(exc), began)
            # A StepFailed is the handler's verdict, not an error of the handler.
            self.stats.handler_outcomes.record(isinstance(exc, StepFailed))
            raise
        self._observed(step, "snoozed" if isinstance(result, Snooze) else "succeeded", began)
        self.stats.handler_outcomes.record(True)
        return result

    def _observed(self, step: StepMessage, outcome: str, began: float) -> None:
        elapsed = time.monotonic() - began
        self.stats.observe_handler(step.handler, outcome, elapsed)
        self.typical_step_s += STEP_TIME_WEIGHT * (elapsed - self.typical_step_s)

    async def _trace(self, ctx: StepContext, step: StepMessage, call_next: Callable[[], Awaitable[Any]]) -> Any:
        """The step's OpenTelemetry span, as a middleware (``runtime/tracing.py``)."""
        assert self.tracer is not None
        with self.tracer.span(ctx, step):
            return await call_next()

    def _snoozed(self, msg: ClaimedMessage, spec: HandlerSpec, snooze: Snooze) -> Settlement:
        """The rulebook's settlement of a snooze (its delay read as a duration)."""
        delay = snooze.delay
        if isinstance(delay, timedelta):
            seconds = delay.total_seconds()
        elif isinstance(delay, int | float):
            seconds = float(delay)
        else:
            try:
                seconds = parse_duration(str(delay)).total_seconds()
            except ValueError as exc:
                return not_a_step(StepValidationError(f"snooze delay {delay!r}: {exc}", reason="invalid_snooze"))
        snoozes = int((msg.headers or {}).get("tasker_snoozes", 0)) + 1
        return snoozed(seconds, snoozes, self.policy_for(spec).max_snoozes)

    # --- cancellation ----------------------------------------------------------------------

    def request_cancel(self, step_uuid: uuid.UUID, by: str | None) -> bool:
        """Someone asked the step ``step_uuid`` to stop: tell its handler (``ctx.cancelled``),
        and cancel an async one after ``cancel_grace``. False: it is not held here."""
        key = step_uuid.int | self.key_salt
        where = self.held.steps.get(key)
        entry = self.held.get(*where) if where is not None else None
        if entry is None:
            # Not running here (yet): prefetched, or put back and on its way to a claim. The
            # request stands for when it starts (bounded: the oldest are forgotten).
            self._early_cancels[key] = by or "unknown"
            while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                self._early_cancels.popitem(last=False)
            return False
        if entry.ending or entry.cancel_by is not None:
            return False
        entry.cancel_by = by or "unknown"
        self.stats.incr("cancel_requests")
        if entry.ctx is not None:
            entry.ctx.request_cancel(by)
        task = entry.task
        if task is not None and not task.done():
            loop = asyncio.get_running_loop()
            loop.call_later(self.settings.cancel_grace_s, self._cancel_after_grace, entry)
        return True

    def _cancel_after_grace(self, entry: HeldStep) -> None:
        """Its grace over, a step asked to stop is cancelled if still running (an async
        handler; a sync one is left to return, and recorded ``cancelled`` when it does)."""
        task = entry.task
        if entry.ending or entry.ended or task is None or task.done():
            return
        spec = self.registry.get(entry.msg.step.handler) if entry.msg.step is not None else None
        if spec is not None and not spec.is_async:
            return
        entry.cancel_fired = True
        task.cancel()

    def _after_failure(
        self, msg: ClaimedMessage, step: StepMessage, exc: Exception, started_at: float, policy: RetryPolicy
    ) -> Settlement:
        """The rulebook's settlement of a failed run."""
        fate = decide_failure(
            exc,
            attempt=msg.read_ct,
            attempt_limit=step.attempt_limit,
            releases=int((msg.headers or {}).get("tasker_releases", 0)),
            policy=policy,
            # A broken database connection (the step's own transaction, or a handler's query)
            # says nothing about the step: like DependencyUnavailable it gives the attempt back.
            unavailable=isinstance(exc, DependencyUnavailable | psycopg.OperationalError | psycopg.InterfaceError),
        )
        kind = fate.verdict.kind
        if kind in HANDLER_ERROR_VERDICTS:
            self.stats.incr("handler_errors")
        if kind is VerdictKind.RETRY:
            log.info(
                "step %s attempt %d failed; retrying in %.2fs",
                step.step_uuid,
                msg.read_ct,
                fate.verdict.delay_s,
                extra={
                    **step_fields(msg),
                    "error_type": fate.error.get("type"),
                    "error_detail": fate.error.get("message"),
                },
            )
        return after_failure(fate, policy, started_at, time.time())

    async def _record_in_handler_transaction(
        self, entry: HeldStep, ctx: StepContext, settlement: Record
    ) -> Settlement | None:
        """Settle and record in the handler's transaction, then commit it. None: the step is
        ended here (``OutcomeWriter.finish``); a settlement: the writer is to end it."""
        conn = await ctx.transaction()
        msg = entry.msg
        outcome = Outcome(
            msg, settlement.status, settlement.result, None, settlement.started_at, settlement.finished_at
        )
        try:
            acked, recorded = await self.store.settle_in_transaction(outcome, self.worker_id, conn)
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(exc)
            self.stats.incr("db_errors")
            log.warning(
                "could not record msg %s of %s; it returns after its vt",
                msg.msg_id,
                msg.queue,
                extra={**step_fields(msg), **error_fields(exc)},
            )
            self.writer.finish(entry, settlement, Written.NOT_WRITTEN)
            return None
        if not acked:
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(_StaleAck())
            self.writer.finish(entry, settlement, Written.FENCED)
            return None
        if not recorded and outcome.status is not None:
            # Another run of this step (a second message with its step_uuid, claimed elsewhere
            # before either had an outcome) recorded first: this run's writes must not commit.
            # Its message is settled on its own, as a duplicate's is.
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(_Duplicate())
            self.stats.incr("dedup_hits")
            return SETTLE_ONLY
        if entry.releasing:
            # The shutdown is giving the message back: nothing of this run may commit.
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(_Cancelled())
            return None
        try:
            await ctx.commit()
        except psycopg.Error as exc:
            # The connection broke during COMMIT: the server either committed (the redelivery
            # after vt then finds the outcome and only settles) or did not (the step runs again,
            # its handler's rows having been rolled back with it). Either way exactly once.
            self.stats.incr("db_errors")
            log.warning(
                "commit of msg %s of %s is in doubt; settled at redelivery",
                msg.msg_id,
                msg.queue,
                extra={**step_fields(msg), **error_fields(exc)},
            )
            self.writer.finish(entry, settlement, Written.NOT_WRITTEN)
            return None
        self.writer.finish(entry, settlement, Written.APPLIED)
        return None

    def _judge_circuit(self, msg: ClaimedMessage, step: StepMessage, exc: BaseException | None) -> None:
        """Tell the handler's circuit how the run went; log when it opens or closes."""
        circuits = self.circuits
        if isinstance(exc, DependencyUnavailable):
            if circuits.record_unavailable(step.handler, first_line(exc)):
                retry_in = circuits.retry_after(step.handler)
                self.stats.incr("circuits_opened")
                log.warning(
                    "circuit of handler %s opened: its dependency is unavailable; its steps wait %.1fs",
                    step.handler,
                    retry_in,
                    extra={**step_fields(msg), **error_fields(exc)},
                )
                # Its messages are left unclaimed meanwhile: look for them again when it ends,
                # in every mode (no notification will come for messages already queued).
                for queue in self.queue_names:
                    self.wakeups.schedule(queue, retry_in + WAKE_MARGIN_S, Source.POLL)
        elif circuits.record_other(step.handler):
            log.info("circuit of handler %s closed: the probe went through", step.handler, extra=step_fields(msg))

    async def _reject(self, msg: ClaimedMessage, step: StepMessage, capability: str) -> Settlement:
        """This worker lacks what the step needs: the rulebook decides between giving it back
        for a capable worker and dead-lettering it."""
        self.stats.incr("rejections")
        rejections = int((msg.headers or {}).get("tasker_rejections", 0)) + 1
        limit = self.settings.max_rejections
        try:
            someone = rejections < limit and await self.store.capable_worker_exists(
                capability, self.settings.stale_timeout_s, self.worker_id
            )
        except psycopg.Error:
            someone = rejections < limit  # cannot tell: keep bouncing until the limit
        log.info(
            "step %s needs %s, which this worker lacks (rejection %d)",
            step.step_uuid,
            capability,
            rejections,
            extra=step_fields(msg),
        )
        return lacking_capability(capability, rejections, limit, someone)


class _Cancelled(Exception):
    """Rolls back a handler transaction whose step was cancelled."""


class _ShortCircuited(Exception):
    """Rolls back a handler transaction whose step a middleware ended itself."""


class _StaleAck(Exception):
    """Rolls back a handler transaction whose ack was fenced out."""


class _Duplicate(Exception):
    """Rolls back a handler transaction whose step was recorded by another run first."""


def _handler_outcome(exc: BaseException) -> str:
    """The ``outcome`` label of a handler run that raised."""
    if isinstance(exc, StepFailed):
        return "failed"  # the handler's own verdict
    if isinstance(exc, StepTimeout):
        return "timed_out"
    return "error"


__all__ = ["PREFETCH_MAX_STEP_S", "StepRunner", "StepSettings", "circuit_breakers", "step_fields"]
