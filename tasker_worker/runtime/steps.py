"""One step's life: from a claimed message to its written outcome.

``StepRunner`` runs each message the claim side (``processor.py``) hands it as a task: decode
and deduplicate it, find its handler, run it under its timeout, and judge what follows with the
rulebook (``domain/verdicts.py``). ``OutcomeWriter`` writes what it decided, batched: the
outcome and the settle (a fenced DELETE of the message, archived where configured) in one
statement per batch, retries and releases through the message's vt, dead letters to
``<queue>_dlq``. It also keeps the slots: a step's slot is free again once its handler
returned, and the step ends when its write is over.

What happens to a claimed message (every write fenced on the read_ct it was claimed with):

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

A step whose outcome goes to the batched writer ends there: the writer calls ``_recorded`` when
the write is over, and that ends the step's bookkeeping (no task waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import QueueClient, RetryRequest
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff, retry_transient
from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.domain.circuits import CircuitBreakers, CircuitState
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source, StepMessage
from tasker_worker.domain.verdicts import RetryPolicy, VerdictKind, decide_failure, error_json, step_timeout
from tasker_worker.domain.workers import WorkerEventType
from tasker_worker.errors import (
    DependencyUnavailable,
    StepError,
    StepFailed,
    StepTimeout,
    StepValidationError,
    UnknownHandler,
    first_line,
)
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry, HandlerSpec
from tasker_worker.logs import error_fields
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.tracing import step_tracer

# The logger the step lines have always had (docs/troubleshooting.md shows it; operators filter on it).
log = logging.getLogger("tasker_worker.runtime.processor")

STEP_ASSIGNMENT_REJECTED = WorkerEventType.STEP_ASSIGNMENT_REJECTED.value
STEP_ASSIGNMENT_TIMED_OUT = WorkerEventType.STEP_ASSIGNMENT_TIMED_OUT.value
STEP_FAILED = WorkerEventType.STEP_FAILED.value

#: How long after a vt lapses a message whose fate was unknown is looked for again.
VT_MARGIN_S = 0.05
#: A duplicate step_uuid claimed while its first message runs here comes back after this.
DUPLICATE_RETRY_MS = 1_000
#: Wake slightly after a ready_at so the claim does not run a hair early and find nothing.
READY_MARGIN_S = 0.05
#: A step given back for lack of a capability is not claimed again by the same worker for this
#: long after its release: time for a capable worker's poll to find it (a lacking worker whose
#: poll ticks line up with its own releases would otherwise win it back again and again).
LEAVE_REJECTED_S = 30.0
#: Release delays of a rejected step: exponential from 0.1 s to 5 s, with jitter.
REJECT_DELAY_BASE = timedelta(milliseconds=100)
REJECT_DELAY_CAP = timedelta(seconds=5)


@dataclass
class _InFlight:
    msg: ClaimedMessage
    vt_deadline: float  # monotonic time at which our claim expires
    #: A write about this message went through (recorded, settled, put back or fenced out).
    settled: bool = False
    #: Its handler is done and its outcome waits for the writer: the slot is free again.
    handed_off: bool = False
    #: The step_uuid this message holds in ``steps_in_flight`` (None: it holds none).
    step_key: int | None = None
    #: The task running its step.
    task: asyncio.Task[None] | None = None
    #: An extension of its vt was refused: someone else holds the message now.
    lost_claim: bool = False


class StepRunner:
    """Runs claimed steps, at most ``max_concurrent`` at once, and ends each one once."""

    def __init__(
        self,
        *,
        config: TaskerConfig,
        worker_id: str,
        client: QueueClient,
        pool: AsyncConnectionPool,
        registry: HandlerRegistry,
        executor: HandlerExecutor,
        stats: WorkerStats,
        state: Any,
        queue_names: list[str],
        wake_later: Callable[[str, float, Source], None],
        leave_alone: Callable[[str, int, float], None],
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.client = client
        self.pool = pool
        self.registry = registry
        self.executor = executor
        self.stats = stats
        self.state = state
        self.queue_names = queue_names
        #: Wake a queue's claim loop after a delay (the claim side's timers).
        self.wake_later = wake_later
        #: Do not claim a message of a queue before a monotonic time (a step given back).
        self.leave_alone = leave_alone
        self.writer = OutcomeWriter(client, worker_id, stats)
        self.max_concurrent = config.event_system.max_concurrent_processors
        self.vt_seconds = max(1, math.ceil(config.event_system.fallback_poller.visibility_timeout.total_seconds()))
        #: Every claimed message this worker holds: running, or waiting for its write.
        self.in_flight: dict[tuple[str, int], _InFlight] = {}
        #: How many of in_flight are handed off (outcome waiting for the writer); at most
        #: max_concurrent, so that at most twice max_concurrent messages are held.
        self.handed_off = 0
        #: The steps running here by the integer of their step_uuid, with their (queue, msg_id).
        self.steps_in_flight: dict[int, tuple[str, int]] = {}
        self._slot_freed = anyio.Event()
        retry = config.retry
        #: OpenTelemetry (the otel extra); None costs the step path one ``is None`` test.
        self.tracer = step_tracer(config.worker.tracing)
        self.retry_policy = RetryPolicy.from_settings(retry)
        self._policies: dict[str, RetryPolicy] = {}
        breaker = config.circuit_breaker
        self.circuits = CircuitBreakers(
            failure_threshold=breaker.failure_threshold,
            cooldown=breaker.cooldown,
            max_cooldown=breaker.max_cooldown,
            enabled=breaker.enabled,
        )

    # --- slots ------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """How many more steps may start now."""
        return self.max_concurrent - len(self.in_flight) + self.handed_off

    async def wait_slot(self) -> None:
        """Until a slot frees up (one more than ``free_slots`` said just before)."""
        # A set event is from frees already counted in free_slots (checked just before, with
        # no await in between): wait for the next one. Renewing the event here rather than at
        # every free keeps an allocation off each step.
        if self._slot_freed.is_set():
            self._slot_freed = anyio.Event()
        await self._slot_freed.wait()

    def _free_slot(self) -> None:
        self._slot_freed.set()

    def start(self, msg: ClaimedMessage) -> None:
        """Run the step of a message just claimed (not held here yet), in a task of its own.

        One plain asyncio task per step: an anyio task group's bookkeeping cost more than a
        no-op step itself. The task is referenced by the message's in_flight entry until the
        step ends; ``cancel_all`` cancels those still running at shutdown."""
        entry = self.in_flight[(msg.queue, msg.msg_id)] = _InFlight(msg, msg.received_mono + self.vt_seconds)
        entry.task = asyncio.get_running_loop().create_task(self._run_step(msg, entry))

    async def cancel_all(self) -> None:
        """Cancel the step tasks still running and wait (bounded) until they are gone."""
        tasks = [e.task for e in self.in_flight.values() if e.task is not None and not e.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded by the caller's scope too (the shutdown deadline).
            with anyio.move_on_after(10):
                await asyncio.gather(*tasks, return_exceptions=True)

    # --- one step -------------------------------------------------------------------------

    async def _run_step(self, msg: ClaimedMessage, entry: _InFlight) -> None:
        """One step's life, from its claimed message to its outcome handed to the writer."""
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
                await self._dead_letter(msg, error_json(exc), OutcomeStatus.DEAD_LETTERED, None)
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
                self.wake_later(msg.queue, DUPLICATE_RETRY_MS / 1000 + 0.05, Source.POLL)
                return
            self.steps_in_flight[step_key] = (msg.queue, msg.msg_id)
            entry.step_key = step_key
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
            await self._dead_letter(msg, error_json(error), OutcomeStatus.DEAD_LETTERED, None)
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
                for queue in self.queue_names:
                    self.wake_later(queue, 0.0, Source.POLL)

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
        timeout = step_timeout(step.timeout, spec.timeout, self.config.worker.handler_timeout)
        try:
            if self.tracer is None:
                result = await self.executor.run(spec.func, spec.is_async, (ctx, step), timeout, task=task)
            else:
                with self.tracer.span(msg, step):
                    result = await self.executor.run(spec.func, spec.is_async, (ctx, step), timeout, task=task)
        except Exception as exc:
            self.stats.observe_handler(spec.name, _handler_outcome(exc), time.monotonic() - start_mono)
            # A StepFailed is the handler's verdict, not an error of the handler.
            self.stats.handler_outcomes.record(isinstance(exc, StepFailed))
            await ctx.rollback(exc)
            self._judge_circuit(msg, step, exc)
            return await self._on_failure(msg, step, exc, started_at, self.policy_for(spec))
        elapsed = time.monotonic() - start_mono
        self.stats.observe_handler(spec.name, "succeeded", elapsed)
        self.stats.handler_outcomes.record(True)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("step succeeded", extra={**step_fields(msg), "execution_ms": round(elapsed * 1000, 3)})
        if self.circuits.circuits:
            self._judge_circuit(msg, step, None)
        outcome = Outcome(msg, OutcomeStatus.SUCCEEDED, result, None, started_at, time.time())
        if ctx.has_transaction:
            return await self._record_in_handler_transaction(ctx, outcome)
        return self._record_later(msg, outcome)

    async def _record_in_handler_transaction(self, ctx: StepContext, outcome: Outcome) -> bool:
        """Settle and record in the handler's transaction, then commit it; True when the step
        went to the batched writer instead (see ``_run_step``)."""
        conn = await ctx.transaction()
        msg = outcome.msg
        try:
            acked, recorded = await self.client.settle_in_transaction(outcome, self.worker_id, conn)
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
            return False
        if not acked:
            self._settle(msg, False)
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(_StaleAck())
            self.stats.incr("stale_acks")
            return False
        if not recorded and outcome.status is not None:
            # Another run of this step (a second message with its step_uuid, claimed elsewhere
            # before either had an outcome) recorded first: this run's writes must not commit.
            # Its message is settled on its own, as a duplicate's is.
            with contextlib.suppress(psycopg.Error):
                await ctx.rollback(_Duplicate())
            self.stats.incr("dedup_hits")
            return self._record_later(msg, Outcome(msg, None))
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
            return False
        self._settle(msg, True)
        self._count_outcome(outcome.status)
        return False

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
                    self.wake_later(queue, retry_in + READY_MARGIN_S, Source.POLL)
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
            self.wake_later(msg.queue, delay_s + READY_MARGIN_S, Source.POLL)

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
            await self._dead_letter(msg, error, OutcomeStatus.DEAD_LETTERED, None)
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
            self.leave_alone(msg.queue, msg.msg_id, time.monotonic() + delay_s + LEAVE_REJECTED_S)
            try:
                await self.client.announce_ready(msg.queue, [msg.msg_id], delay_s)
            except psycopg.Error as exc:  # the pollers of the other modes still find it
                self.stats.incr("db_errors")
                log.warning(
                    "could not announce released msg %s", msg.msg_id, extra={**step_fields(msg), **error_fields(exc)}
                )

    def policy_for(self, spec: HandlerSpec) -> RetryPolicy:
        """``[retry]`` with the handler's own policy applied (computed once per handler)."""
        policy = self._policies.get(spec.name)
        if policy is None:
            policy = self._policies[spec.name] = spec.retry_policy(self.retry_policy)
        return policy

    async def _on_failure(
        self, msg: ClaimedMessage, step: StepMessage, exc: Exception, started_at: float, policy: RetryPolicy
    ) -> bool:
        """Decide and apply what a failed run leads to; True when the outcome went to the
        batched writer (see ``_run_step``)."""
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
        verdict, error = fate.verdict, fate.error
        kind = verdict.kind
        if kind is VerdictKind.FAILED:
            outcome = Outcome(msg, OutcomeStatus.FAILED, None, error, started_at, time.time())
            return self._record_later(msg, outcome)
        if kind is VerdictKind.DEAD_LETTER:
            if not policy.dlq:  # the handler keeps no DLQ copies: the outcome row is the record
                return self._record_later(
                    msg, Outcome(msg, OutcomeStatus.DEAD_LETTERED, None, error, started_at, time.time())
                )
            await self._dead_letter(msg, error, OutcomeStatus.DEAD_LETTERED, started_at)
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
            if not policy.dlq:
                return self._record_later(msg, Outcome(msg, OutcomeStatus.FAILED, None, error, started_at, time.time()))
            await self._dead_letter(msg, error, OutcomeStatus.FAILED, started_at)
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
            self.wake_later(msg.queue, delay_s + 0.01, Source.POLL)
        elif applied is False:
            self.stats.incr("stale_acks")

    async def _dead_letter(
        self,
        msg: ClaimedMessage,
        error: dict[str, Any],
        status: OutcomeStatus,
        started_at: float | None,
    ) -> None:
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
        self.wake_later(msg.queue, max(0.0, remaining) + VT_MARGIN_S, Source.POLL)

    def _count_outcome(self, status: OutcomeStatus | None) -> None:
        counters = self.stats.counters  # both keys are always there (COUNTERS)
        counters["processed"] += 1
        if status is OutcomeStatus.SUCCEEDED:
            counters["succeeded"] += 1
        elif status is OutcomeStatus.FAILED:
            counters["failed"] += 1
        elif status is OutcomeStatus.DEAD_LETTERED:  # a handler with dlq=False
            counters["dead_lettered"] += 1


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


# --- the outcome writer ---------------------------------------------------------------------

#: How long a flush retries a broken database before giving up on that batch.
WRITE_RETRY_BUDGET = timedelta(seconds=60)


class WriteKind(enum.Enum):
    """What to do with a claimed message."""

    RECORD = "record"  # outcome + settle (fenced DELETE, archive where configured)
    DEAD_LETTER = "dead_letter"  # outcome + move to <queue>_dlq
    RETRY = "retry"  # back to the queue after a delay (counts as an attempt)
    RELEASE = "release"  # back to the queue, attempt given back


@dataclass(slots=True)
class _Pending:
    kind: WriteKind
    queue: str
    outcome: Outcome | None = None
    retry: RetryRequest | None = None
    #: Resolved with True (applied), False (fenced out) or None (not written: database
    #: unavailable). A bare future: an anyio.Event per step cost measurable throughput.
    done: asyncio.Future[bool | None] | None = None
    #: Instead of ``done``: called with the same value when the write is over.
    then: Callable[[Outcome, bool | None], None] | None = None

    @property
    def msg_id(self) -> int:
        if self.outcome is not None:
            return self.outcome.msg.msg_id
        assert self.retry is not None
        return self.retry.msg.msg_id


class OutcomeWriter:
    """Coalesces writes from many steps into few statements."""

    def __init__(self, client: QueueClient, worker_id: str, stats: WorkerStats) -> None:
        self.client = client
        self.worker_id = worker_id
        self.stats = stats
        self._pending: list[_Pending] = []
        self._wake = anyio.Event()
        self._closed = False
        #: Items taken from ``_pending`` whose write is not over yet.
        self._writing = 0
        #: The end of the final flush at shutdown (anyio time; set by the processor).
        self.final_deadline = float("inf")

    async def record(self, outcome: Outcome) -> bool | None:
        """Record ``outcome`` and settle its message; ``False`` for a stale ack."""
        return await self._submit(_Pending(WriteKind.RECORD, outcome.msg.queue, outcome=outcome))

    def record_then(self, outcome: Outcome, then: Callable[[Outcome, bool | None], None]) -> None:
        """Record ``outcome`` and settle its message, then call ``then(outcome, applied)`` (True,
        False for a stale ack, None when the database stayed unavailable) without awaiting."""
        if self._closed:
            raise RuntimeError("outcome writer is closed")
        self._pending.append(_Pending(WriteKind.RECORD, outcome.msg.queue, outcome=outcome, then=then))
        self._wake.set()

    async def dead_letter(self, outcome: Outcome) -> bool | None:
        """Move the message to its DLQ and record ``outcome``; ``False`` when fenced out."""
        return await self._submit(_Pending(WriteKind.DEAD_LETTER, outcome.msg.queue, outcome=outcome))

    async def retry(self, request: RetryRequest) -> bool | None:
        """Put the message back after ``request.delay_ms``; ``False`` when fenced out."""
        kind = WriteKind.RETRY if request.count_attempt else WriteKind.RELEASE
        return await self._submit(_Pending(kind, request.msg.queue, retry=request))

    async def _submit(self, item: _Pending) -> bool | None:
        if self._closed:
            raise RuntimeError("outcome writer is closed")
        item.done = asyncio.get_running_loop().create_future()
        self._pending.append(item)
        self._wake.set()
        return await item.done

    async def run(self) -> None:
        """Flush until cancelled (then flush what is left, until ``final_deadline``)."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True, deadline=self.final_deadline) as scope:
                self._closed = True
                await self.flush()
            if scope.cancelled_caught:
                left = len(self._pending) + self._writing
                log.error("shutdown deadline: %d results not written; their messages return after their vt", left)

    async def flush(self) -> None:
        """Write everything pending now."""
        while self._pending:
            batch, self._pending = self._pending, []
            self._writing = len(batch)
            groups: dict[tuple[WriteKind, str], list[_Pending]] = defaultdict(list)
            for item in batch:
                groups[(item.kind, item.queue)].append(item)
            for (kind, queue), items in groups.items():
                await self._write_group(kind, queue, items)
                self._writing -= len(items)

    async def _write_group(self, kind: WriteKind, queue: str, items: list[_Pending]) -> None:
        async def write() -> dict[int, bool]:
            began = time.monotonic()
            written = await self._write(kind, queue, items)
            self.stats.observe_write(kind.value, time.monotonic() - began)
            return written

        def count(_: BaseException) -> None:
            self.stats.incr("db_errors")

        backoff = Backoff(timedelta(milliseconds=50), timedelta(seconds=2), first_at_once=True)
        try:
            results = await retry_transient(
                write,
                what=f"writing results to {queue}",
                backoff=backoff,
                budget_s=WRITE_RETRY_BUDGET.total_seconds(),
                on_failure=count,
            )
        except TRANSIENT_DB_ERRORS as exc:
            log.error(
                "giving up writing %d %s results to %s; they return after their vt",
                len(items),
                kind.value,
                queue,
                extra={"queue": queue, **error_fields(exc)},
            )
            results = {}
        for item in items:
            applied = results.get(item.msg_id)
            if item.then is not None and item.outcome is not None:
                try:
                    item.then(item.outcome, applied)
                except Exception:  # the writer must go on for the other steps
                    log.exception("ending msg %s of %s failed", item.msg_id, queue, extra={"queue": queue})
            # A step cancelled while waiting (shutdown) has cancelled its future.
            elif item.done is not None and not item.done.done():
                item.done.set_result(applied)

    async def _write(self, kind: WriteKind, queue: str, items: list[_Pending]) -> dict[int, bool]:
        if kind is WriteKind.RECORD:
            outcomes = [i.outcome for i in items if i.outcome]
            settled = await self.client.settle(queue, self.worker_id, outcomes)
            return {o.msg.msg_id: o.msg.msg_id in settled for o in outcomes}
        if kind is WriteKind.DEAD_LETTER:
            return await self.client.dead_letter(queue, self.worker_id, [i.outcome for i in items if i.outcome])
        return await self.client.retry(queue, [i.retry for i in items if i.retry], worker_id=self.worker_id)
