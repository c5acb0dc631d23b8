"""CommandProcessor: claims, deduplicates, runs handlers and records outcomes.

Every source (listener, poller, timers, catch-up after a reconnect) only *wakes* a queue; the
claim itself is always ``tasker.claim_steps`` (pgmq.read, SKIP LOCKED), never more than the
free slots. One claim loop per queue keeps claiming while it gets full batches.

What happens to a claimed message (fenced on the read_ct it was claimed with):

==========================  =========================================================
handler returns             outcome ``succeeded`` + settle (batched)
``StepFailed``              outcome ``failed`` + settle (a business failure)
malformed / unknown handler outcome ``dead_lettered`` + move to ``<queue>_dlq``
``NonRetryableError``       outcome ``dead_lettered`` + move to ``<queue>_dlq``
any other error / timeout   retry with backoff via vt; after the attempt limit,
                            outcome ``failed`` + move to ``<queue>_dlq``
``DependencyUnavailable``   back with backoff, the attempt given back
outcome already recorded    settle only (dedup)
==========================  =========================================================

To settle is to delete the message, fenced (and archive it where ``[queues] archive`` says so).
A step whose outcome goes to the batched writer ends there: the writer calls ``_recorded`` when
the write is over, and that ends the step's bookkeeping (no task waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import psycopg
from anyio.streams.memory import MemoryObjectReceiveStream
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import QueueClient, RetryRequest
from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.domain.circuits import CircuitBreakers, CircuitState
from tasker_worker.domain.events import MessageReady
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source, StepMessage
from tasker_worker.domain.verdicts import RetryPolicy, VerdictKind, judge_failure
from tasker_worker.domain.workers import WorkerEventType
from tasker_worker.errors import (
    DependencyUnavailable,
    StepError,
    StepFailed,
    StepValidationError,
    UnknownHandler,
    first_line,
)
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry, HandlerSpec
from tasker_worker.logs import error_fields
from tasker_worker.runtime.commands import (
    ExecuteStep,
    ExecuteStepFromEvent,
    GetWorkerStatus,
    HealthCheck,
    Shutdown,
    WorkerCommand,
)
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.outcomes import OutcomeWriter
from tasker_worker.runtime.stats import WorkerStats

CLAIM_RETRY_BASE = timedelta(milliseconds=100)
#: How long after a vt lapses a message whose fate was unknown is looked for again.
VT_MARGIN_S = 0.05
CLAIM_RETRY_CAP = timedelta(seconds=5)

STEP_ASSIGNMENT_REJECTED = WorkerEventType.STEP_ASSIGNMENT_REJECTED.value
STEP_ASSIGNMENT_TIMED_OUT = WorkerEventType.STEP_ASSIGNMENT_TIMED_OUT.value
STEP_FAILED = WorkerEventType.STEP_FAILED.value

log = logging.getLogger(__name__)

MAX_TIMERS = 10_000
ANNOUNCED_MEMORY = 2_048
#: A message found by a poll counts as a missed wakeup only if it was ready this long before.
MISSED_WAKEUP_GRACE_S = 1.0
#: A duplicate step_uuid claimed while its first message runs here comes back after this.
DUPLICATE_RETRY_MS = 1_000
#: Wake slightly after a ready_at so the claim does not run a hair early and find nothing.
READY_MARGIN_S = 0.05
#: A step given back for lack of a capability is not claimed again by the same worker for this
#: long after its release: time for a capable worker's poll to find it (a lacking worker whose
#: poll ticks line up with its own releases would otherwise win it back again and again).
LEAVE_REJECTED_S = 30.0
#: At most this many rejected messages per queue are left alone (the oldest go first).
LEAVE_REJECTED_MAX = 256
#: Release delays of a rejected step: exponential from 0.1 s to 5 s, with jitter.
REJECT_DELAY_BASE = timedelta(milliseconds=100)
REJECT_DELAY_CAP = timedelta(seconds=5)


@dataclass
class _InFlight:
    msg: ClaimedMessage
    vt_deadline: float  # monotonic time at which our claim expires
    #: A write about this message went through (recorded, archived, put back or fenced out).
    settled: bool = False
    #: Its handler is done and its outcome waits for the writer: the slot is free again.
    handed_off: bool = False
    #: The step_uuid this message holds in ``steps_in_flight`` (None: it holds none).
    step_key: int | None = None
    #: The task running its step.
    task: asyncio.Task[None] | None = None


@dataclass
class _QueueState:
    name: str
    wake: anyio.Event = field(default_factory=anyio.Event)
    woken_by_event: bool = False
    # (min_id, max_id, explicit ids) of recent notifications, to detect missed wakeups
    announced: deque[tuple[int, int, frozenset[int]]] = field(default_factory=lambda: deque(maxlen=ANNOUNCED_MEMORY))
    #: msg_id -> monotonic time until which this worker does not claim it (see LEAVE_REJECTED_S)
    rejected: dict[int, float] = field(default_factory=dict)

    def poke(self, source: Source) -> None:
        if source is Source.EVENT:
            self.woken_by_event = True
        self.wake.set()

    def was_announced(self, msg_id: int) -> bool:
        return any(lo <= msg_id <= hi or msg_id in ids for lo, hi, ids in self.announced)

    def leave_alone(self, msg_id: int, until: float) -> None:
        """Do not claim ``msg_id`` before monotonic time ``until`` (a step this worker rejected)."""
        self.rejected.pop(msg_id, None)
        self.rejected[msg_id] = until
        while len(self.rejected) > LEAVE_REJECTED_MAX:
            del self.rejected[next(iter(self.rejected))]

    def left_alone(self, now: float) -> list[int]:
        """The message ids still to be left alone at ``now`` (expired ones are forgotten)."""
        for msg_id in [m for m, until in self.rejected.items() if until <= now]:
            del self.rejected[msg_id]
        return list(self.rejected)


class CommandProcessor:
    """Consumes WorkerCommands and runs the claimed steps."""

    def __init__(
        self,
        *,
        config: TaskerConfig,
        worker_id: str,
        queues: list[str],
        client: QueueClient,
        pool: AsyncConnectionPool,
        registry: HandlerRegistry,
        executor: HandlerExecutor,
        stats: WorkerStats,
        state: Any = None,
        listening_since: Callable[[], float | None] = lambda: None,
        step_filter: Callable[[ClaimedMessage, StepMessage], Awaitable[bool]] | None = None,
        circuits: CircuitBreakers | None = None,
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.client = client
        self.pool = pool
        self.registry = registry
        self.executor = executor
        self.stats = stats
        self.state = state
        self.listening_since = listening_since
        self.step_filter = step_filter
        self.writer = OutcomeWriter(client, worker_id, stats)
        self.queues = {q: _QueueState(q) for q in queues}
        self.max_concurrent = config.event_system.max_concurrent_processors
        poller = config.event_system.fallback_poller
        self.batch_size = poller.batch_size
        self.refill_at = max(1, min(self.batch_size, self.max_concurrent) // 2)
        self.vt_seconds = max(1, math.ceil(poller.visibility_timeout.total_seconds()))
        self.in_flight: dict[tuple[str, int], _InFlight] = {}
        #: How many of in_flight are handed off (outcome waiting for the writer); at most
        #: max_concurrent, so that at most twice max_concurrent messages are held.
        self.handed_off = 0
        #: The steps running here by the integer of their step_uuid, with their (queue, msg_id).
        self.steps_in_flight: dict[int, tuple[str, int]] = {}
        self._slot_freed = anyio.Event()
        self._timers: list[tuple[float, str, Source]] = []
        self._timer_changed = anyio.Event()
        self._claiming = True
        self.last_error: str | None = None
        retry = config.retry
        self.retry_policy = RetryPolicy(
            retry.max_attempts, retry.base_delay, retry.max_delay, retry.jitter, retry.max_releases
        )
        breaker = config.circuit_breaker
        self.circuits = circuits or CircuitBreakers(
            failure_threshold=breaker.failure_threshold,
            cooldown=breaker.cooldown,
            max_cooldown=breaker.max_cooldown,
            enabled=breaker.enabled,
        )

    # --- public ----------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """How many more steps may start now."""
        return self.max_concurrent - len(self.in_flight) + self.handed_off

    async def run(
        self, commands: MemoryObjectReceiveStream[WorkerCommand], shutdown_deadline: Callable[[], float]
    ) -> None:
        """Process commands until ``Shutdown``; then drain within the budget and release."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.writer.run)
            try:
                async with anyio.create_task_group() as loops:
                    for qs in self.queues.values():
                        loops.start_soon(self._claim_loop, qs)
                    loops.start_soon(self._timer_loop)
                    loops.start_soon(self._vt_keeper)
                    async with commands:
                        async for command in commands:
                            if isinstance(command, Shutdown):
                                log.info("shutdown: %s", command.reason)
                                break
                            self.handle(command)
                    self._claiming = False
                    loops.cancel_scope.cancel()
                # Sources are stopped and nothing new is claimed: let in-flight steps finish
                # until the deadline, then cancel them and give their messages back.
                with anyio.move_on_after(max(0.0, shutdown_deadline() - anyio.current_time())):
                    while self.in_flight:
                        await self._wait_slot()
            finally:
                self._claiming = False
                with anyio.CancelScope(shield=True):
                    if self.in_flight:
                        await self._release_all()
                    await self._cancel_steps()
            outer.cancel_scope.cancel()

    async def _cancel_steps(self) -> None:
        """Cancel the step tasks still running and wait (bounded) until they are gone."""
        # One plain asyncio task per running step (an anyio task group's bookkeeping cost more
        # than a no-op step itself), referenced by its in_flight entry until the step ends.
        tasks = [e.task for e in self.in_flight.values() if e.task is not None and not e.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            with anyio.move_on_after(10):
                await asyncio.gather(*tasks, return_exceptions=True)

    def handle(self, command: WorkerCommand) -> None:
        """Apply one non-shutdown command (no I/O: it only wakes claim loops)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("command", extra={"command_type": type(command).__name__})
        if isinstance(command, ExecuteStepFromEvent):
            self._on_event(command.event)
        elif isinstance(command, ExecuteStep):
            targets = [self.queues[command.queue]] if command.queue in self.queues else list(self.queues.values())
            for qs in targets:
                qs.poke(command.source)
        elif isinstance(command, GetWorkerStatus):
            command.reply.set(self.status())
        elif isinstance(command, HealthCheck):
            command.reply.set(self.health())

    def status(self) -> dict[str, Any]:
        """Statistics and in-flight work."""
        snap = self.stats.snapshot()
        snap["in_flight"] = len(self.in_flight)
        snap["outcomes_waiting"] = self.handed_off
        snap["free_slots"] = self.free_slots
        snap["queues"] = sorted(self.queues)
        snap["circuits"] = self.circuits.open_circuits()
        return snap

    def health(self) -> dict[str, Any]:
        """A compact health view of the processor."""
        return {
            "claiming": self._claiming,
            "in_flight": len(self.in_flight),
            "free_slots": self.free_slots,
            "last_error": self.last_error,
            "circuits": self.circuits.open_circuits(),
        }

    # --- waking ----------------------------------------------------------------------------

    def _on_event(self, event: MessageReady) -> None:
        qs = self.queues.get(event.queue_name)
        if qs is None:
            return
        self.stats.incr("notifications_received")
        lo = event.min_msg_id if event.min_msg_id is not None else min(event.msg_ids, default=0)
        hi = event.max_msg_id if event.max_msg_id is not None else max(event.msg_ids, default=-1)
        qs.announced.append((lo, hi, frozenset(event.msg_ids)))
        if event.ready_at is not None:
            wait = (event.ready_at - datetime.now(UTC)).total_seconds()
            if wait > 0.005:
                self.schedule(qs.name, wait + READY_MARGIN_S, Source.EVENT)
                return
        qs.poke(Source.EVENT)

    def schedule(self, queue: str, delay_s: float, source: Source) -> None:
        """Wake ``queue`` after ``delay_s`` (delayed messages, retries)."""
        if len(self._timers) >= MAX_TIMERS:
            self.stats.incr("timers_dropped")
            return
        heapq.heappush(self._timers, (anyio.current_time() + max(0.0, delay_s), queue, source))
        self._timer_changed.set()

    async def _timer_loop(self) -> None:
        while True:
            self._timer_changed = anyio.Event()
            if not self._timers:
                await self._timer_changed.wait()
                continue
            due, queue, source = self._timers[0]
            wait = due - anyio.current_time()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._timer_changed.wait()
                continue
            heapq.heappop(self._timers)
            # Timers for the same queue and moment collapse into one wakeup.
            while self._timers and self._timers[0][1] == queue and self._timers[0][0] <= due + 0.01:
                heapq.heappop(self._timers)
            self.queues[queue].poke(source)

    # --- claiming --------------------------------------------------------------------------

    async def _wait_slot(self) -> None:
        # A set event is from frees already counted in free_slots (checked just before,
        # with no await in between): wait for the next one. Renewing the event here rather
        # than at every free keeps an allocation off each step.
        if self._slot_freed.is_set():
            self._slot_freed = anyio.Event()
        await self._slot_freed.wait()

    def _free_slot(self) -> None:
        self._slot_freed.set()

    async def _claim_loop(self, qs: _QueueState) -> None:
        failures = 0
        while self._claiming:
            await qs.wake.wait()
            qs.wake = anyio.Event()
            source = Source.EVENT if qs.woken_by_event else Source.POLL
            qs.woken_by_event = False
            backlog = False
            while self._claiming:
                free = self.free_slots
                # While the last claim came back full (a backlog), wait until a good share of
                # the slots is free: one claim of 50 costs the server little more than a claim
                # of 1, so refilling slot by slot would multiply the round trips.
                if free <= 0 or (backlog and free < self.refill_at):
                    await self._wait_slot()
                    continue
                if qs.woken_by_event:  # a notification arrived while this loop was busy
                    source, qs.woken_by_event = Source.EVENT, False
                want = min(self.batch_size, free)
                skip = self.circuits.skipped() if self.circuits.circuits else ()
                skip_msgs = qs.left_alone(time.monotonic()) if qs.rejected else ()
                try:
                    msgs = await self.client.claim(
                        qs.name,
                        self.vt_seconds,
                        want,
                        source,
                        worker_id=self.worker_id,
                        skip_handlers=skip,
                        skip_msgs=skip_msgs,
                    )
                    failures = 0
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    failures += 1
                    self.stats.incr("db_errors")
                    self.last_error = f"claim on {qs.name}: {exc}"
                    # The first failure is most often a pooled connection that died while idle
                    # (the pool has discarded it by now): try again at once, then back off.
                    delay = 0.0 if failures == 1 else backoff_delay(failures - 1, CLAIM_RETRY_BASE, CLAIM_RETRY_CAP)
                    log.warning(
                        "claim on %s failed; retrying in %.2fs",
                        qs.name,
                        delay,
                        extra={"queue": qs.name, "source": source.value, **error_fields(exc)},
                    )
                    # The claim may have gone through with its reply lost: those messages
                    # reappear after their vt, and must be looked for then in every mode.
                    self.schedule(qs.name, self.vt_seconds + VT_MARGIN_S, Source.POLL)
                    await anyio.sleep(delay)
                    continue
                self.stats.incr(f"claims_{source.value}")
                self.stats.incr(f"claimed_{source.value}", len(msgs))
                for msg in msgs:
                    self._accept(qs, msg)
                if len(msgs) < want:
                    break
                backlog = True

    def _accept(self, qs: _QueueState, msg: ClaimedMessage) -> None:
        key = (msg.queue, msg.msg_id)
        current = self.in_flight.get(key)
        if current is not None:
            # Redelivered while still running here (our vt lapsed): we hold the newest claim,
            # so adopt its read_ct for the ack and keep running the first copy only.
            self.stats.incr("dedup_hits")
            current.msg.read_ct = msg.read_ct
            current.vt_deadline = msg.received_mono + self.vt_seconds
            return
        since = self.listening_since() if msg.source is Source.POLL and msg.read_ct == 1 else None
        if since is not None:
            # Only a message sent while LISTEN was up can be a missed wakeup. Both times are
            # read on the server's clock: the listener's start is placed there by how long ago
            # (locally) it was, counted back from the claim's server time.
            listening_for = msg.received_mono - since
            sent_after_listen = (msg.claimed_at - msg.enqueued_at).total_seconds() < listening_for
            ready_for = (msg.claimed_at - msg.enqueued_at).total_seconds()
            if sent_after_listen and ready_for > MISSED_WAKEUP_GRACE_S and not qs.was_announced(msg.msg_id):
                self.stats.incr("missed_wakeups")
        entry = self.in_flight[key] = _InFlight(msg, msg.received_mono + self.vt_seconds)
        entry.task = asyncio.get_running_loop().create_task(self._run_step(msg, entry))

    async def _vt_keeper(self) -> None:
        """Extend the vt of steps running past half of it, in one statement per queue."""
        tick = min(1.0, max(0.05, self.vt_seconds / 4))
        vt_ms = self.vt_seconds * 1000
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            due: dict[str, list[_InFlight]] = {}
            for item in self.in_flight.values():
                if item.vt_deadline - now < self.vt_seconds / 2:
                    due.setdefault(item.msg.queue, []).append(item)
            for queue, items in due.items():
                try:
                    extended = await self.client.extend_vt(queue, [i.msg for i in items], vt_ms)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    self.stats.incr("db_errors")
                    log.warning("extending vt on %s failed", queue, extra={"queue": queue, **error_fields(exc)})
                    continue
                after = time.monotonic()
                for item in items:
                    if item.msg.msg_id in extended:
                        item.vt_deadline = after + self.vt_seconds
                        self.stats.incr("vt_extensions")

    # --- running a step --------------------------------------------------------------------

    async def _run_step(self, msg: ClaimedMessage, entry: _InFlight) -> None:
        #: Whether the outcome went to the batched writer, which then ends the step (``_recorded``).
        handed = False
        try:
            if msg.already_done:
                self.stats.incr("dedup_hits")
                handed = self._record_later(msg, Outcome(msg, None))
                return
            try:
                step = StepMessage.decode(msg.body)
            except StepValidationError as exc:
                await self._dead_letter(msg, exc, OutcomeStatus.DEAD_LETTERED, None)
                return
            msg.step = step
            # The UUID's integer: hashing a UUID object is a Python-level call per step.
            step_key = step.step_uuid.int
            if step_key in self.steps_in_flight:
                # Another message of the same step runs here now: come back when it is done,
                # then find its outcome recorded and settle without running.
                self.stats.incr("dedup_hits")
                request = RetryRequest(
                    msg,
                    DUPLICATE_RETRY_MS,
                    None,
                    count_attempt=False,
                    event=STEP_ASSIGNMENT_REJECTED,
                    event_data={"reason": "duplicate_in_flight"},
                )
                self._settle(msg, await self.writer.retry(request))
                self.schedule(msg.queue, DUPLICATE_RETRY_MS / 1000 + 0.05, Source.POLL)
                return
            self.steps_in_flight[step_key] = (msg.queue, msg.msg_id)
            entry.step_key = step_key
            if self.step_filter is not None and not await self.step_filter(msg, step):
                return
            handed = await self._execute(msg, step, entry.task)
        except Exception:
            # Whatever went wrong, it stays with this step: the message returns after its vt
            # (and its outcome, if one was committed, is found by dedup then).
            self.stats.incr("internal_errors")
            log.exception(
                "step msg %s of %s failed inside the runtime; it returns after its vt",
                msg.msg_id,
                msg.queue,
                extra=step_fields(msg),
            )
        finally:
            if not handed:
                self._end_step(msg)

    def _end_step(self, msg: ClaimedMessage) -> None:
        """The step of ``msg`` is over here: forget it, free its slot, and look for its message
        again at its vt if no write about it went through."""
        entry = self.in_flight.pop((msg.queue, msg.msg_id), None)
        if entry is not None:
            if entry.step_key is not None:
                self.steps_in_flight.pop(entry.step_key, None)
            if entry.handed_off:
                self.handed_off -= 1
            if not entry.settled:
                self._revisit(msg)
        self._free_slot()

    async def _execute(self, msg: ClaimedMessage, step: StepMessage, task: asyncio.Task[None] | None) -> bool:
        """Run the step; True when its outcome went to the batched writer (see ``_run_step``)."""
        spec = self.registry.get(step.handler)
        if spec is None:
            error = UnknownHandler(
                f"no handler {step.handler!r} in this worker (has: {', '.join(self.registry.names)})"
            )
            await self._dead_letter(msg, error, OutcomeStatus.DEAD_LETTERED, None)
            return False
        if spec.requires is not None:
            needed = spec.requires(step.inputs)
            if needed not in spec.capabilities:
                await self._reject(msg, step, needed)
                return False
        circuits = self.circuits
        if not circuits.circuits:  # the common case: no handler reported an unavailable dependency
            return await self._run_handler(msg, step, spec, task)
        if not circuits.allow(step.handler):
            await self._hold_for_circuit(msg, step)
            return False
        probe = circuits.state_of(step.handler) is CircuitState.HALF_OPEN
        try:
            return await self._run_handler(msg, step, spec, task)
        finally:
            if probe:
                circuits.release_probe(step.handler)
                # The handler's other steps were left unclaimed while the probe ran: look for
                # them now, in every mode (no notification comes for messages already queued).
                for queue in self.queues:
                    self.schedule(queue, 0.0, Source.POLL)

    async def _run_handler(
        self, msg: ClaimedMessage, step: StepMessage, spec: HandlerSpec, task: asyncio.Task[None] | None
    ) -> bool:
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
            _pool=self.pool,
        )
        timeout = self._timeout(step, spec.timeout)
        try:
            result = await self.executor.run(spec.func, spec.is_async, (ctx, step), timeout, task=task)
        except Exception as exc:
            self.stats.handler_duration.append(time.monotonic() - start_mono)
            # A StepFailed is the handler's verdict, not an error of the handler.
            self.stats.handler_outcomes.record(isinstance(exc, StepFailed))
            await ctx._finish(exc)
            self._judge_circuit(msg, step, exc)
            return await self._on_failure(msg, step, exc, started_at)
        elapsed = time.monotonic() - start_mono
        self.stats.handler_duration.append(elapsed)
        self.stats.handler_outcomes.record(True)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step succeeded", extra={**step_fields(msg), "execution_ms": round(elapsed * 1000, 3)})
        if self.circuits.circuits:
            self._judge_circuit(msg, step, None)
        outcome = Outcome(msg, OutcomeStatus.SUCCEEDED, result, None, started_at, time.time())
        if ctx.has_transaction:
            await self._record_in_handler_transaction(ctx, outcome)
            return False
        return self._record_later(msg, outcome)

    async def _record_in_handler_transaction(self, ctx: StepContext, outcome: Outcome) -> None:
        conn = await ctx.transaction()
        msg = outcome.msg
        try:
            acked = msg.msg_id in await self.client.settle(msg.queue, self.worker_id, [outcome], conn=conn)
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error):
                await ctx._finish(exc)
            self.stats.incr("db_errors")
            log.warning(
                "could not record msg %s of %s; it returns after its vt",
                msg.msg_id,
                msg.queue,
                extra={**step_fields(msg), **error_fields(exc)},
            )
            return
        if not acked:
            self._settle(msg, False)
            with contextlib.suppress(psycopg.Error):
                await ctx._finish(_StaleAck())
            self.stats.incr("stale_acks")
            return
        try:
            await ctx._finish(None)
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
            return
        self._settle(msg, True)
        self._count_outcome(outcome.status)

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
                for queue in self.queues:
                    self.schedule(queue, retry_in + READY_MARGIN_S, Source.POLL)
        elif circuits.record_other(step.handler):
            log.info("circuit of handler %s closed: the probe went through", step.handler, extra=step_fields(msg))

    async def _hold_for_circuit(self, msg: ClaimedMessage, step: StepMessage) -> None:
        """The handler's circuit is open (or its probe is running): give the step back, no
        attempt used, until the circuit lets steps through again."""
        self.stats.incr("circuit_held")
        delay_s = max(0.05, self.circuits.retry_after(step.handler))
        request = RetryRequest(
            msg,
            int(delay_s * 1000),
            None,
            count_attempt=False,
            event=STEP_ASSIGNMENT_REJECTED,
            event_data={"reason": "circuit_open", "handler": step.handler},
        )
        if self._settle(msg, await self.writer.retry(request)):
            self.stats.incr("released")
            self.schedule(msg.queue, delay_s + READY_MARGIN_S, Source.POLL)

    async def _reject(self, msg: ClaimedMessage, step: StepMessage, capability: str) -> None:
        """This worker lacks what the step needs: give it back for a capable worker, or
        dead-letter it when nobody running offers it or it bounced too often."""
        self.stats.incr("rejections")
        rejections = int((msg.headers or {}).get("tasker_rejections", 0)) + 1
        fresh = self.config.registry.stale_timeout.total_seconds()
        limit = self.config.worker.max_rejections
        try:
            someone = rejections < limit and await self.client.capable_worker_exists(capability, fresh, self.worker_id)
        except psycopg.Error:
            someone = rejections < limit  # cannot tell: keep bouncing until the limit
        log.info(
            "step %s needs %s, which this worker lacks (rejection %d)",
            step.step_uuid,
            capability,
            rejections,
            extra=step_fields(msg),
        )
        if not someone:
            reason = "no_capable_worker" if rejections < limit else "too_many_rejections"
            error = StepError(
                f"no running worker offers {capability} (rejected {rejections} times)", reason=reason
            ).to_json()
            await self._dead_letter(msg, None, OutcomeStatus.DEAD_LETTERED, None, error=error)
            return
        # Jitter keeps a fleet of lacking workers from coming back in step.
        delay_s = backoff_delay(rejections, REJECT_DELAY_BASE, REJECT_DELAY_CAP)
        request = RetryRequest(
            msg,
            int(delay_s * 1000),
            {"tasker_rejections": rejections},
            count_attempt=False,
            event=STEP_ASSIGNMENT_REJECTED,
            event_data={"reason": "missing_capability", "capability": capability, "rejections": rejections},
        )
        if self._settle(msg, await self.writer.retry(request)):
            self.stats.incr("released")
            qs = self.queues.get(msg.queue)
            if qs is not None:
                qs.leave_alone(msg.msg_id, time.monotonic() + delay_s + LEAVE_REJECTED_S)
            try:
                await self.client.announce_ready(msg.queue, msg.msg_id, delay_s)
            except psycopg.Error as exc:  # the pollers of the other modes still find it
                self.stats.incr("db_errors")
                log.warning(
                    "could not announce released msg %s", msg.msg_id, extra={**step_fields(msg), **error_fields(exc)}
                )

    def _timeout(self, step: StepMessage, handler_timeout: timedelta | None) -> timedelta:
        if step.timeout is not None:
            return timedelta(seconds=step.timeout)
        return handler_timeout or self.config.event_system.processing_timeout

    async def _on_failure(self, msg: ClaimedMessage, step: StepMessage, exc: Exception, started_at: float) -> bool:
        """Decide and apply what a failed run leads to; True when the outcome went to the
        batched writer (see ``_run_step``)."""
        error = _error_json(exc)
        verdict = judge_failure(
            exc,
            attempt=msg.read_ct,
            attempt_limit=step.attempt_limit,
            releases=int((msg.headers or {}).get("tasker_releases", 0)),
            policy=self.retry_policy,
            # A broken database connection (the step's own transaction, or a handler's query)
            # says nothing about the step: like DependencyUnavailable it gives the attempt back.
            unavailable=isinstance(exc, DependencyUnavailable | psycopg.OperationalError | psycopg.InterfaceError),
        )
        kind = verdict.kind
        if kind is VerdictKind.FAILED:
            outcome = Outcome(msg, OutcomeStatus.FAILED, None, error, started_at, time.time())
            return self._record_later(msg, outcome)
        if kind is VerdictKind.DEAD_LETTER:
            await self._dead_letter(
                msg, exc if isinstance(exc, StepError) else None, OutcomeStatus.DEAD_LETTERED, started_at
            )
            return False
        self.stats.incr("handler_errors")
        if kind is VerdictKind.RELEASE:
            await self._retry(
                msg,
                verdict.delay_s,
                error,
                count_attempt=False,
                event=STEP_FAILED,
                extra={"tasker_releases": verdict.releases},
            )
            return False
        if kind is VerdictKind.EXHAUSTED:
            error = {
                **error,
                "reason": "retries_exhausted",
                "last_reason": error.get("reason"),
                "attempts": msg.read_ct,
            }
            await self._dead_letter(msg, None, OutcomeStatus.FAILED, started_at, error=error)
            return False
        log.info(
            "step %s attempt %d failed; retrying in %.2fs",
            step.step_uuid,
            msg.read_ct,
            verdict.delay_s,
            extra={**step_fields(msg), "error_type": error.get("type"), "error_detail": error.get("message")},
        )
        event = STEP_ASSIGNMENT_TIMED_OUT if verdict.timed_out else STEP_FAILED
        await self._retry(msg, verdict.delay_s, error, count_attempt=True, event=event)
        return False

    async def _retry(
        self,
        msg: ClaimedMessage,
        delay_s: float,
        error: dict[str, Any] | None,
        *,
        count_attempt: bool,
        event: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        headers = {"tasker_last_error": error} if error is not None else None
        if extra:
            headers = {**(headers or {}), **extra}
        data = {"final": False, "reason": (error or {}).get("reason"), "retry_in_s": round(delay_s, 3)}
        request = RetryRequest(msg, int(delay_s * 1000), headers, count_attempt, event=event, event_data=data)
        applied = self._settle(msg, await self.writer.retry(request))
        if applied:
            self.stats.incr("retried" if count_attempt else "released")
            # Wake this queue when the message is due, whatever the deployment mode.
            self.schedule(msg.queue, delay_s + 0.01, Source.POLL)
        elif applied is False:
            self.stats.incr("stale_acks")

    async def _dead_letter(
        self,
        msg: ClaimedMessage,
        exc: StepError | None,
        status: OutcomeStatus,
        started_at: float | None,
        error: dict[str, Any] | None = None,
    ) -> None:
        error = error or (exc.to_json() if exc else {"reason": "unknown"})
        log.warning(
            "dead-lettering msg %s of %s: %s",
            msg.msg_id,
            msg.queue,
            error.get("reason"),
            extra={
                **step_fields(msg),
                "error_type": error.get("type"),
                "error_detail": error.get("message", error.get("reason")),
            },
        )
        outcome = Outcome(msg, status, None, error, started_at, time.time())
        applied = self._settle(msg, await self.writer.dead_letter(outcome))
        if applied:
            self.stats.incr("processed")
            self.stats.incr("dead_lettered")
            if status is OutcomeStatus.FAILED:
                self.stats.incr("failed")
        elif applied is False:
            self.stats.incr("stale_acks")

    def _record_later(self, msg: ClaimedMessage, outcome: Outcome) -> bool:
        """Free the step's slot and hand ``outcome`` to the batched writer, which ends the step
        when the write is over (``_recorded``). Returns True: the step is the writer's now."""
        self._hand_off(msg)
        self.writer.record_then(outcome, self._recorded)
        return True

    def _recorded(self, outcome: Outcome, applied: bool | None) -> None:
        """The writer is done with ``outcome``: count it and end its step."""
        msg = outcome.msg
        self._settle(msg, applied)
        if applied:
            if outcome.status is not None:
                self._count_outcome(outcome.status)
        elif applied is False:
            self.stats.incr("stale_acks")
        self._end_step(msg)

    def _hand_off(self, msg: ClaimedMessage) -> None:
        """The handler is done and only the outcome write is left: free the step's slot, so the
        next step starts while the writer batches this outcome with others. The message stays
        in in_flight (its vt kept, released at shutdown) until the write settles it."""
        entry = self.in_flight.get((msg.queue, msg.msg_id))
        if entry is not None and not entry.handed_off and self.handed_off < self.max_concurrent:
            entry.handed_off = True
            self.handed_off += 1
            self._free_slot()

    def _settle(self, msg: ClaimedMessage, applied: bool | None) -> bool | None:
        """Note that a write about ``msg`` went through (``applied`` not None); pass it on."""
        entry = self.in_flight.get((msg.queue, msg.msg_id))
        if applied is not None and entry is not None:
            entry.settled = True
        return applied

    def _revisit(self, msg: ClaimedMessage) -> None:
        """A step ended here without any write about its message going through (a write that
        gave up, a commit in doubt, an error inside the runtime): wake its queue when its vt
        lapses, so that it is settled even in EventDrivenOnly, where no poller comes back."""
        remaining = self.vt_seconds - (time.monotonic() - msg.received_mono)
        self.schedule(msg.queue, max(0.0, remaining) + VT_MARGIN_S, Source.POLL)

    def _count_outcome(self, status: OutcomeStatus | None) -> None:
        counters = self.stats.counters  # both keys are always there (COUNTERS)
        counters["processed"] += 1
        if status is OutcomeStatus.SUCCEEDED:
            counters["succeeded"] += 1
        elif status is OutcomeStatus.FAILED:
            counters["failed"] += 1

    async def _release_all(self) -> None:
        """Give every still-running step's message back at once (not counted as an attempt)."""
        items = [i.msg for i in self.in_flight.values()]
        log.info("releasing %d unfinished steps back to their queues", len(items))
        by_queue: dict[str, list[ClaimedMessage]] = {}
        for m in items:
            by_queue.setdefault(m.queue, []).append(m)
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            for queue, msgs in by_queue.items():
                try:
                    requests = [
                        RetryRequest(
                            m,
                            0,
                            None,
                            count_attempt=False,
                            event=STEP_ASSIGNMENT_REJECTED,
                            event_data={"reason": "shutdown"},
                        )
                        for m in msgs
                    ]
                    done = await self.client.retry(queue, requests, worker_id=self.worker_id)
                    self.stats.incr("released", sum(done.values()))
                except psycopg.Error as exc:
                    log.error(
                        "could not release %d messages of %s (they return after their vt): %s", len(msgs), queue, exc
                    )


class _StaleAck(Exception):
    """Rolls back a handler transaction whose ack was fenced out."""


def step_fields(msg: ClaimedMessage) -> dict[str, Any]:
    """The log fields of a claimed message (and of its step, once parsed)."""
    fields: dict[str, Any] = {
        "queue": msg.queue,
        "msg_id": msg.msg_id,
        "source": msg.source.value,
        "attempt": msg.read_ct,
    }
    step = msg.step
    if step is not None:
        fields.update(
            namespace=step.namespace,
            step_uuid=str(step.step_uuid),
            correlation_id=str(step.correlation_id),
            handler=step.handler,
        )
    return fields


def _error_json(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, StepError):
        return exc.to_json()
    return {"type": type(exc).__name__, "reason": "handler_error", "message": str(exc)[:2000]}
