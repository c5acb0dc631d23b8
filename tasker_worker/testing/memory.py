"""HandlerHarness: run handlers against scripted step messages, in memory, on a clock you move.

No database and no waiting: a retry due in 30 s is run by ``advance(30)``. The harness applies
the runtime's own rulebook (``domain.verdicts`` for retries, releases and dead letters,
``domain.circuits`` for circuit breaking) and its own executor (timeouts, thread pool), so what
a handler does here is what it does in a worker. What it leaves out: SQL, LISTEN/NOTIFY, vt
expiry of a crashed worker, and ``ctx.transaction()`` (there is no database; use the pytest
plugin's real one for that).

::

    harness = HandlerHarness(make_config(overrides={"retry.max_attempts": 2}))

    @harness.handler("charge")
    async def charge(ctx, step):
        raise DependencyUnavailable("bank is down")

    step = harness.send("charge", {"amount": 5})
    await harness.run_ready()
    assert harness.pending()[0].releases == 1
"""

from __future__ import annotations

import itertools
import json
import logging
import types
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tasker_worker.config.models import TaskerConfig
from tasker_worker.domain.circuits import CircuitBreakers, CircuitState
from tasker_worker.domain.clock import ManualClock
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.steps import StepMessage
from tasker_worker.domain.verdicts import RetryPolicy, VerdictKind, decide_failure, step_timeout
from tasker_worker.errors import (
    DependencyUnavailable,
    StepValidationError,
    UnknownHandler,
    first_line,
)
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry, RegistersHandlers
from tasker_worker.runtime.executor import HandlerExecutor

log = logging.getLogger("tasker_worker.testing")

#: Bounds of one call, so a handler that always retries cannot loop a test forever.
MAX_RUNS_PER_CALL = 10_000
MAX_PERIODIC_RUNS_PER_ADVANCE = 10_000


@dataclass
class MemoryMessage:
    """A message in the in-memory queue (pgmq's columns that matter to the runtime)."""

    msg_id: int
    body: Any
    vt: datetime
    read_ct: int = 0
    headers: dict[str, Any] = field(default_factory=dict)

    @property
    def releases(self) -> int:
        """Retries that gave the attempt back."""
        return int(self.headers.get("tasker_releases", 0))


@dataclass(frozen=True)
class StepOutcome:
    """The one recorded outcome of a step."""

    step_uuid: str
    status: str
    result: Any
    error: dict[str, Any] | None
    attempts: int


@dataclass(frozen=True)
class RunRecord:
    """One handler run (or one decision without a run) and what followed."""

    msg_id: int
    step_uuid: str | None
    attempt: int
    verdict: str
    delay_s: float = 0.0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


class HandlerHarness(RegistersHandlers):
    """Handlers, an in-memory queue and a manual clock."""

    def __init__(
        self,
        config: TaskerConfig | None = None,
        *,
        namespace: str = "default",
        clock: ManualClock | None = None,
        state: Any = None,
        registry: HandlerRegistry | None = None,
    ) -> None:
        self.config = config or TaskerConfig()
        self.namespace = namespace
        self.queue = queue_name(namespace)
        self.clock = clock or ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.state = state if state is not None else types.SimpleNamespace()
        self.registry = registry or HandlerRegistry()
        retry = self.config.retry
        self.policy = RetryPolicy.from_settings(retry)
        breaker = self.config.circuit_breaker
        self.circuits = CircuitBreakers(
            breaker.failure_threshold, breaker.cooldown, breaker.max_cooldown, breaker.enabled, self.clock
        )
        self.messages: dict[int, MemoryMessage] = {}
        #: Outcomes by step_uuid: at most one per step, as in ``tasker.step_results``.
        self.outcomes: dict[str, StepOutcome] = {}
        self.dead_letters: list[MemoryMessage] = []
        self.archived: list[MemoryMessage] = []
        self.runs: list[RunRecord] = []
        #: Every periodic run: (job name, clock time, the exception it raised or None).
        self.periodic_runs: list[tuple[str, datetime, BaseException | None]] = []
        self._ids = itertools.count(1)
        self._executor = HandlerExecutor("thread", self.config.worker.executor_workers)
        self._started = self.clock.now()
        self._periodic_due: dict[str, datetime] = {}

    # --- setting up (handler() and periodic() come from RegistersHandlers) ---------------

    def send(
        self, handler: str, inputs: dict[str, Any] | None = None, *, delay: float = 0, **extra: Any
    ) -> StepMessage:
        """Enqueue a valid step for ``handler``; return it."""
        body = StepMessage.build(self.namespace, handler, inputs, **extra)
        self.send_raw(body, delay=delay)
        return StepMessage.parse(body)

    def send_raw(self, body: Any, *, delay: float = 0) -> int:
        """Enqueue any body (malformed ones included, as ``pgmq.send`` would); return its msg_id.
        A string is taken as JSON text, like a message typed in SQL."""
        if isinstance(body, str):
            body = json.loads(body)
        msg_id = next(self._ids)
        self.messages[msg_id] = MemoryMessage(msg_id, body, self.clock.now() + timedelta(seconds=delay))
        return msg_id

    # --- running -------------------------------------------------------------------------

    async def run_ready(self) -> int:
        """Run every message visible now, oldest first, until none is; return how many ran."""
        count = 0
        while count < MAX_RUNS_PER_CALL:
            now = self.clock.now()
            # As the runtime's claim: the steps of handlers whose circuit is open stay untouched.
            skipped = set(self.circuits.skipped())
            ready = [m for m in self.messages.values() if m.vt <= now and _handler_of(m.body) not in skipped]
            if not ready:
                return count
            for msg in sorted(ready, key=lambda m: m.msg_id):
                await self._process(msg)
                count += 1
        raise RuntimeError(f"more than {MAX_RUNS_PER_CALL} runs without the queue settling")

    async def advance(self, seconds: float | timedelta) -> None:
        """Move the clock forward, running the periodic work that falls due on the way."""
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        target = self.clock.now() + delta
        runs = 0
        while runs < MAX_PERIODIC_RUNS_PER_ADVANCE:
            due = self._next_periodic()
            if due is None or due[1] > target:
                break
            name, at = due
            self.clock.advance(at - self.clock.now())
            await self._run_periodic(name)
            runs += 1
        self.clock.advance(target - self.clock.now())

    async def run_until_settled(self, *, within: float | timedelta = 3600) -> None:
        """Run ready messages and move the clock to the next moment something can run (a vt, a
        circuit's cooldown ending), until the queue is empty or ``within`` (clock time) passed."""
        limit = within if isinstance(within, timedelta) else timedelta(seconds=within)
        end = self.clock.now() + limit
        for _ in range(MAX_RUNS_PER_CALL):
            await self.run_ready()
            if not self.messages:
                return
            now = self.clock.now()
            moments = [m.vt for m in self.messages.values() if m.vt > now]
            moments += [now + timedelta(seconds=self.circuits.retry_after(h)) for h in self.circuits.skipped()]
            upcoming = [t for t in moments if t > now]
            if not upcoming or min(upcoming) > end:
                break
            await self.advance(min(upcoming) - now)
        await self.advance(max(timedelta(0), end - self.clock.now()))
        await self.run_ready()

    # --- looking ---------------------------------------------------------------------------

    def outcome(self, step: StepMessage | str | uuid.UUID) -> StepOutcome | None:
        """The recorded outcome of a step (None while it has none)."""
        key = str(step.step_uuid if isinstance(step, StepMessage) else step)
        return self.outcomes.get(key)

    def pending(self) -> list[MemoryMessage]:
        """Messages still in the queue (waiting for their vt or ready)."""
        return sorted(self.messages.values(), key=lambda m: m.msg_id)

    def circuit(self, handler: str) -> CircuitState:
        """The state of ``handler``'s circuit."""
        return self.circuits.state_of(handler)

    # --- the rulebook in memory ------------------------------------------------------------

    async def _process(self, msg: MemoryMessage) -> None:
        msg.read_ct += 1
        msg.vt = self.clock.now() + self.config.event_system.fallback_poller.visibility_timeout
        try:
            step = StepMessage.parse(msg.body)
        except StepValidationError as exc:
            self._dead_letter(msg, None, "dead_lettered", exc.to_json())
            return
        key = str(step.step_uuid)
        if key in self.outcomes:  # a duplicate of a step already recorded: archive only
            self._archive(msg, key, "duplicate")
            return
        spec = self.registry.get(step.handler)
        if spec is None:
            error = UnknownHandler(f"no handler {step.handler!r} (has: {', '.join(self.registry.names)})")
            self._dead_letter(msg, step, "dead_lettered", error.to_json())
            return
        circuits = self.circuits
        if not circuits.allow(step.handler):
            self._back(msg, step, max(0.05, circuits.retry_after(step.handler)), "circuit_open", give_back=True)
            return
        probe = circuits.state_of(step.handler) is CircuitState.HALF_OPEN
        ctx = StepContext(step=step, attempt=msg.read_ct, worker_id="harness", queue=self.queue, msg_id=msg.msg_id)
        ctx.state = self.state
        timeout = step_timeout(step.timeout, spec.timeout, self.config.worker.handler_timeout)
        try:
            result = await self._executor.run(spec.func, spec.is_async, (ctx, step), timeout)
        except Exception as exc:
            if isinstance(exc, DependencyUnavailable):
                circuits.record_unavailable(step.handler, first_line(exc))
            else:
                circuits.record_other(step.handler)
            self._on_failure(msg, step, exc)
            return
        finally:
            if probe:
                circuits.release_probe(step.handler)
        circuits.record_other(step.handler)
        self._record(msg, step, "succeeded", _roundtrip(result), None)
        self._archive(msg, key, "succeeded")

    def _on_failure(self, msg: MemoryMessage, step: StepMessage, exc: Exception) -> None:
        spec = self.registry.get(step.handler)
        policy = spec.retry_policy(self.policy) if spec is not None else self.policy
        fate = decide_failure(
            exc,
            attempt=msg.read_ct,
            attempt_limit=step.attempt_limit,
            releases=msg.releases,
            policy=policy,
            unavailable=isinstance(exc, DependencyUnavailable),
        )
        verdict, error = fate.verdict, fate.error
        msg.headers["tasker_last_error"] = error
        final = {
            VerdictKind.FAILED: "failed",
            VerdictKind.DEAD_LETTER: "dead_lettered",
            VerdictKind.EXHAUSTED: "failed",
        }
        if verdict.kind is VerdictKind.FAILED or (verdict.kind in final and not policy.dlq):
            # Settled with its outcome row (a handler with dlq=False keeps no DLQ copies).
            self._record(msg, step, final[verdict.kind], None, error)
            self._archive(msg, str(step.step_uuid), final[verdict.kind])
        elif verdict.kind is VerdictKind.DEAD_LETTER:
            self._dead_letter(msg, step, "dead_lettered", error)
        elif verdict.kind is VerdictKind.EXHAUSTED:
            self._dead_letter(msg, step, "failed", error)
        elif verdict.kind is VerdictKind.RELEASE:
            msg.headers["tasker_releases"] = verdict.releases
            self._back(msg, step, verdict.delay_s, "release", give_back=True)
        else:
            self._back(msg, step, verdict.delay_s, "timeout" if verdict.timed_out else "retry", give_back=False)

    def _back(self, msg: MemoryMessage, step: StepMessage, delay_s: float, verdict: str, *, give_back: bool) -> None:
        if give_back:
            msg.read_ct -= 1
        msg.vt = self.clock.now() + timedelta(seconds=delay_s)
        self.runs.append(RunRecord(msg.msg_id, str(step.step_uuid), msg.read_ct, verdict, delay_s, self.clock.now()))

    def _record(self, msg: MemoryMessage, step: StepMessage, status: str, result: Any, error: Any) -> None:
        key = str(step.step_uuid)
        self.outcomes.setdefault(key, StepOutcome(key, status, result, error, msg.read_ct))

    def _archive(self, msg: MemoryMessage, key: str | None, verdict: str) -> None:
        del self.messages[msg.msg_id]
        self.archived.append(msg)
        self.runs.append(RunRecord(msg.msg_id, key, msg.read_ct, verdict, 0.0, self.clock.now()))

    def _dead_letter(self, msg: MemoryMessage, step: StepMessage | None, status: str, error: dict[str, Any]) -> None:
        key = str(step.step_uuid) if step is not None else None
        if key is not None:
            self.outcomes.setdefault(key, StepOutcome(key, status, None, error, msg.read_ct))
        del self.messages[msg.msg_id]
        msg.headers["tasker_dead_letter"] = error
        self.dead_letters.append(msg)
        self.runs.append(RunRecord(msg.msg_id, key, msg.read_ct, "dead_letter", 0.0, self.clock.now()))

    def _next_periodic(self) -> tuple[str, datetime] | None:
        best: tuple[str, datetime] | None = None
        for job in self.registry.periodic_jobs:
            due = self._periodic_due.setdefault(job.name, job.cadence.next_tick(self._started))
            if best is None or due < best[1]:
                best = (job.name, due)
        return best

    async def _run_periodic(self, name: str) -> None:
        job = next(j for j in self.registry.periodic_jobs if j.name == name)
        self._periodic_due[name] = job.cadence.next_tick(self._periodic_due[name])
        # The same attributes as a worker's periodic context, no more (a job must run in both).
        ctx = types.SimpleNamespace(worker_id="harness", state=self.state, job=name, log=log)
        timeout = job.timeout or self.config.worker.periodic_timeout
        at = self.clock.now()
        try:
            await self._executor.run(job.func, job.is_async, (ctx,), timeout)
        except Exception as exc:
            # As in a worker: a failed run is logged and the next one comes at its time.
            log.warning("periodic job %s failed: %s", name, exc)
            self.periodic_runs.append((name, at, exc))
        else:
            self.periodic_runs.append((name, at, None))


def _handler_of(body: Any) -> Any:
    return body.get("handler") if isinstance(body, dict) else None


def _roundtrip(result: Any) -> Any:
    """The result as the database would store it (JSON), so a non-JSON result shows here too."""
    return json.loads(json.dumps(result, default=repr))


__all__ = ["HandlerHarness", "MemoryMessage", "RunRecord", "StepOutcome"]
