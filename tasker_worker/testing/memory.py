"""HandlerHarness: run handlers against scripted step messages, in memory, on a clock you move.

No database and no waiting: a retry due in 30 s is run by ``advance(30)``. The harness runs the
runtime's own ``StepRunner`` and ``OutcomeWriter`` (``runtime/steps.py``, ``runtime/writer.py``:
the rulebook, the executor with its timeouts, the circuit breakers, the dedup of a step run
twice) on ``MemoryStore``, an in-memory implementation of the same ``StepStore`` port the
database client implements, so what a handler does here is what it does in a worker; this module
holds no step rule of its own. What it leaves out: SQL, LISTEN/NOTIFY, vt expiry of a crashed
worker, and ``ctx.transaction()`` (there is no database; use the pytest plugin's real one for
that).

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
import math
import time
import types
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import RetryRequest, encode_outcomes
from tasker_worker.domain.circuits import CircuitState
from tasker_worker.domain.clock import ManualClock
from tasker_worker.domain.flow import (
    ClaimBatch,
    FlowHold,
    HoldReason,
    QueueFlow,
    Rate,
    claim_order,
    step_concurrency_key,
    step_group,
    step_priority,
)
from tasker_worker.domain.names import namespace_of, queue_name
from tasker_worker.domain.steps import ClaimedMessage, Outcome, Source, StepMessage
from tasker_worker.domain.verdicts import STEP_ASSIGNMENT_TIMED_OUT
from tasker_worker.errors import UsageError
from tasker_worker.handlers.registry import HandlerRegistry, RegistersHandlers
from tasker_worker.runtime.executor import HandlerExecutor
from tasker_worker.runtime.inflight import InFlight
from tasker_worker.runtime.ports import NoWakeups
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.steps import StepRunner, StepSettings, circuit_breakers
from tasker_worker.runtime.writer import OutcomeWriter

log = logging.getLogger("tasker_worker.testing")

#: Bounds of one call, so a handler that always retries cannot loop a test forever.
MAX_RUNS_PER_CALL = 10_000
MAX_PERIODIC_RUNS_PER_ADVANCE = 10_000
#: The worker id the harness's runs carry.
HARNESS_WORKER = "harness"


@dataclass
class MemoryMessage:
    """A message in the in-memory queue (pgmq's columns that matter to the runtime)."""

    msg_id: int
    body: Any
    vt: datetime
    read_ct: int = 0
    headers: dict[str, Any] = field(default_factory=dict)
    enqueued_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: The worker whose claim holds it (the database's tasker_claim header); None once put back.
    claimed_by: str | None = None

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
    """One write about a claimed message (what a run, or a decision without a run, led to)."""

    msg_id: int
    step_uuid: str | None
    attempt: int
    verdict: str
    delay_s: float = 0.0
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


#: The ``verdict`` of a put-back that gives the attempt back, by the reason of its event.
_PUT_BACK_VERDICTS = {
    "circuit_open": "circuit_open",
    "duplicate_in_flight": "duplicate_in_flight",
    "missing_capability": "rejected",
    "shutdown": "released",
    "snoozed": "snoozed",
}


class MemoryStore:
    """pgmq's queues and ``tasker.step_results`` in memory, on a manual clock: the
    ``runtime.ports.StepStore`` port, as ``db.queue_client.QueueClient`` implements it on
    PostgreSQL (``tests/test_store.py`` runs one conformance suite against both).

    Messages live per queue; a DLQ is ``<queue>_dlq``. Every write about a claimed message is
    fenced on its read_ct. Outcome rows are kept by step_uuid, the first one winning, with what
    the database would store (the same JSON encoding)."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.clock = clock or ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.queues: dict[str, dict[int, MemoryMessage]] = {}
        #: Outcome rows by step_uuid: at most one per step, as in ``tasker.step_results``.
        self.outcomes: dict[str, StepOutcome] = {}
        #: Settled messages (kept, as pgmq's archive with ``[queues] archive = true``).
        self.archived: list[MemoryMessage] = []
        #: Every write about a claimed message, in order.
        self.runs: list[RunRecord] = []
        #: Step events recorded with put-backs: (event type, msg_id, data).
        self.events: list[tuple[str, int, dict[str, Any]]] = []
        #: Announcements of messages ready again: (queue, msg_ids, delay_s).
        self.announcements: list[tuple[str, list[int], float]] = []
        #: Capabilities that some other live worker offers (``capable_worker_exists``).
        self.capable_peers: set[str] = set()
        #: Progress reported by running steps (``ctx.progress``), by step_uuid.
        self.progress: dict[str, dict[str, Any]] = {}
        #: Cancel requests of running steps: step_uuid -> who asked (``HandlerHarness.cancel``).
        self.cancellations: dict[str, str | None] = {}
        #: Flow control by namespace (``tasker.queue_flow``): ``pause``, ``limit``, and the
        #: priority and group flags a claimed step sets.
        self.flow: dict[str, QueueFlow] = {}
        #: The rate's token bucket by namespace: (tokens, when they were counted).
        self._buckets: dict[str, tuple[float, datetime]] = {}
        self._ids = itertools.count(1)

    # --- producing and looking (not part of the port) ---------------------------------------

    def send(self, queue: str, body: Any, *, delay: float = 0, headers: dict[str, Any] | None = None) -> int:
        """Enqueue ``body`` (any JSON value, malformed steps included); return its msg_id."""
        msg_id = next(self._ids)
        now = self.clock.now()
        self.queues.setdefault(queue, {})[msg_id] = MemoryMessage(
            msg_id, body, now + timedelta(seconds=delay), headers=dict(headers or {}), enqueued_at=now
        )
        return msg_id

    def messages(self, queue: str) -> dict[int, MemoryMessage]:
        """The messages of ``queue`` by msg_id (the harness's live view)."""
        return self.queues.setdefault(queue, {})

    # --- flow control (as tasker.pause_queue, resume_queue, set_queue_limits) ---------------

    def pause(self, namespace: str) -> None:
        """No step of ``namespace`` starts until ``resume``; those running finish."""
        self.flow[namespace] = replace(self.flow.get(namespace) or QueueFlow(namespace), paused=True)

    def resume(self, namespace: str) -> None:
        """Lift ``pause``."""
        if namespace in self.flow:
            self.flow[namespace] = replace(self.flow[namespace], paused=False)

    def limit(
        self,
        namespace: str,
        *,
        max_running: int | None = None,
        key_max_running: int | None = None,
        rate: Rate | str | None = None,
    ) -> None:
        """Set fleet-wide limits (None leaves one as it is, 0 removes it), as ``queue limit``."""
        flow = self.flow.get(namespace) or QueueFlow(namespace)
        if max_running is not None:
            flow = replace(flow, max_running=max_running or None)
        if key_max_running is not None:
            flow = replace(flow, key_max_running=key_max_running or None)
        if rate is not None:
            flow = replace(flow, rate=Rate.parse(rate) if isinstance(rate, str) else rate)
            self._buckets.pop(namespace, None)  # a new rate starts with a full bucket
        self.flow[namespace] = flow

    def _tokens(self, namespace: str, rate: Rate) -> float:
        """The rate's tokens now (refilled since they were last counted, up to the burst)."""
        now = self.clock.now()
        tokens, at = self._buckets.get(namespace, (float(rate.burst), now))
        return min(float(rate.burst), tokens + rate.per_second * max(0.0, (now - at).total_seconds()))

    def next_start_at(self, queue: str) -> datetime | None:
        """When a rate-limited namespace can start its next step (None: not rate-limited)."""
        namespace = namespace_of(queue) or queue
        flow = self.flow.get(namespace)
        if flow is None or flow.rate is None:
            return None
        tokens = self._tokens(namespace, flow.rate)
        return self.clock.now() + timedelta(seconds=max(0.0, (1 - tokens) / flow.rate.per_second))

    # --- the StepStore port -----------------------------------------------------------------

    async def claim(
        self,
        queue: str,
        vt_seconds: int,
        qty: int,
        source: Source,
        *,
        worker_id: str | None = None,
        skip_handlers: Sequence[str] = (),
        skip_msgs: Sequence[int] = (),
        announce: bool = False,
    ) -> ClaimBatch[ClaimedMessage]:
        """Up to ``qty`` visible messages, each invisible for ``vt_seconds``: oldest first, or
        under the namespace's flow control as ``tasker.claim_flow`` applies it (pause, limits
        counted over the messages claimed and not yet lapsed, priority, groups); messages of
        ``skip_handlers`` and with an id in ``skip_msgs`` are left untouched."""
        now = self.clock.now()
        skipped, left = set(skip_handlers), set(skip_msgs)
        messages = self.messages(queue)
        ready = [
            m
            for m in messages.values()
            if m.vt <= now and m.msg_id not in left and not (skipped and _handler_of(m.body) in skipped)
        ]
        namespace = namespace_of(queue) or queue
        flow = self.flow.get(namespace)
        if flow is None:
            chosen = sorted(ready, key=lambda m: m.msg_id)[:qty]
            return ClaimBatch(self._take(queue, chosen, vt_seconds, source, worker_id))
        if flow.paused:
            return ClaimBatch([], FlowHold(HoldReason.PAUSED))
        running = [m for m in messages.values() if m.claimed_by is not None and m.vt > now]
        budget = qty
        if flow.max_running is not None:
            budget = min(budget, flow.max_running - len(running))
        tokens = 0.0
        if flow.rate is not None:
            tokens = self._tokens(namespace, flow.rate)
            budget = min(budget, math.floor(tokens + 1e-9))
        retry_after = None
        if flow.rate is not None and tokens < 1:
            retry_after = (1 - tokens) / flow.rate.per_second
        if budget <= 0:
            return ClaimBatch([], FlowHold(HoldReason.LIMITED, retry_after) if ready else None)
        by_key: dict[str, int] = {}
        for m in running:
            key = step_concurrency_key(m.body)
            if key:
                by_key[key] = by_key.get(key, 0) + 1
        by_id = {m.msg_id: m for m in ready}
        order = claim_order(
            ((m.msg_id, step_priority(m.body), step_group(m.body)) for m in ready), groups=flow.uses_groups
        )
        chosen = []
        for msg_id in order:
            if len(chosen) == budget:
                break
            key = step_concurrency_key(by_id[msg_id].body)
            if flow.key_max_running is not None and key:
                if by_key.get(key, 0) >= flow.key_max_running:
                    continue
                by_key[key] = by_key.get(key, 0) + 1
            chosen.append(by_id[msg_id])
        if flow.rate is not None:
            self._buckets[namespace] = (tokens - len(chosen), now)
        hold = None
        if flow.key_max_running is not None and len(chosen) < budget and len(chosen) < len(ready):
            hold = FlowHold(HoldReason.LIMITED)  # the per-key cap held ready steps back
        elif budget < qty and len(chosen) == budget:
            left_tokens = tokens - len(chosen)
            after = (1 - left_tokens) / flow.rate.per_second if flow.rate is not None and left_tokens < 1 else None
            hold = FlowHold(HoldReason.LIMITED, after)
        return ClaimBatch(self._take(queue, chosen, vt_seconds, source, worker_id), hold)

    def _take(
        self, queue: str, chosen: list[MemoryMessage], vt_seconds: int, source: Source, worker_id: str | None
    ) -> list[ClaimedMessage]:
        """Claim ``chosen``: each invisible for ``vt_seconds``, its read count up by one."""
        now = self.clock.now()
        claimed = []
        for m in chosen:
            m.read_ct += 1
            m.vt = now + timedelta(seconds=vt_seconds)
            m.claimed_by = worker_id or ""
            step_uuid = _step_uuid_of(m.body)
            claimed.append(
                ClaimedMessage(
                    queue,
                    m.msg_id,
                    m.read_ct,
                    m.enqueued_at,
                    now,
                    json.dumps(m.body),
                    dict(m.headers) or None,
                    step_uuid is not None and step_uuid in self.outcomes,
                    source,
                    time.monotonic(),
                )
            )
        return claimed

    async def note_flow_fields(self, namespace: str, priority: bool, groups: bool) -> None:
        """From now on, claim ``namespace`` by priority (and round-robin across groups)."""
        flow = self.flow.get(namespace) or QueueFlow(namespace)
        self.flow[namespace] = replace(
            flow, uses_priority=flow.uses_priority or priority, uses_groups=flow.uses_groups or groups
        )

    async def settle(self, queue: str, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        """Delete (archive) each message still held by its claim and record its outcome row."""
        settled = set()
        for outcome in outcomes:
            m = self._held(queue, outcome.msg)
            if m is None:
                continue
            del self.messages(queue)[m.msg_id]
            self.archived.append(m)
            key = self._record(m, outcome)
            verdict = outcome.status.value if outcome.status is not None else "duplicate"
            self.runs.append(RunRecord(m.msg_id, key, m.read_ct, verdict, 0.0, self.clock.now()))
            settled.add(m.msg_id)
        return settled

    async def dead_letter(self, queue: str, worker_id: str, outcomes: Sequence[Outcome]) -> dict[int, bool]:
        """Move each message still held by its claim to ``<queue>_dlq`` (the error in its
        headers, as ``tasker.dead_letter_steps`` writes it) and record its outcome row."""
        moved = {}
        for outcome in outcomes:
            m = self._held(queue, outcome.msg)
            moved[outcome.msg.msg_id] = m is not None
            if m is None:
                continue
            del self.messages(queue)[m.msg_id]
            error = outcome.error or {}
            m.headers["tasker_dlq"] = {
                "reason": error.get("reason"),
                "error": error,
                "status": outcome.status.value if outcome.status else None,
                "source_queue": queue,
                "source_msg_id": m.msg_id,
                "attempts": m.read_ct,
                "worker_id": worker_id,
            }
            # The harness's name for the error (docs/workers.md), kept beside the database's.
            m.headers["tasker_dead_letter"] = error
            self.messages(queue + "_dlq")[m.msg_id] = m
            key = self._record(m, outcome)
            self.runs.append(RunRecord(m.msg_id, key, m.read_ct, "dead_letter", 0.0, self.clock.now()))
        return moved

    async def retry(
        self, queue: str, requests: Sequence[RetryRequest], *, worker_id: str | None = None
    ) -> dict[int, bool]:
        """Put each message still held by its claim back after its delay, its headers patched,
        the attempt given back unless it counts."""
        applied = {}
        for request in requests:
            m = self._held(queue, request.msg)
            applied[request.msg.msg_id] = m is not None
            if m is None:
                continue
            m.vt = self.clock.now() + timedelta(milliseconds=max(0, request.delay_ms))
            m.claimed_by = None
            if not request.count_attempt:
                m.read_ct = max(0, m.read_ct - 1)
            if request.headers:
                m.headers.update(request.headers)
            data = dict(request.event_data or {})
            if request.event is not None:
                self.events.append((request.event, m.msg_id, {"attempt": request.msg.read_ct, **data}))
            if request.count_attempt:
                verdict = "timeout" if request.event == STEP_ASSIGNMENT_TIMED_OUT else "retry"
            else:
                verdict = _PUT_BACK_VERDICTS.get(str(data.get("reason")), "release")
            self.runs.append(
                RunRecord(
                    m.msg_id, _step_uuid_of(m.body), m.read_ct, verdict, request.delay_ms / 1000, self.clock.now()
                )
            )
        return applied

    async def extend_vt(self, queue: str, msgs: Sequence[ClaimedMessage], vt_ms: int) -> dict[int, datetime]:
        """Push the vt of messages still held by their claims."""
        extended = {}
        for msg in msgs:
            m = self._held(queue, msg)
            if m is not None:
                m.vt = self.clock.now() + timedelta(milliseconds=vt_ms)
                extended[m.msg_id] = m.vt
        return extended

    async def write_progress(self, rows: Sequence[Mapping[str, Any]], worker_id: str) -> None:
        """Kept in ``progress`` by step_uuid, the newest value winning."""
        for row in rows:
            self.progress[str(row["step_uuid"])] = dict(row)

    async def pending_cancellations(self, step_uuids: Sequence[str]) -> dict[str, str | None]:
        """The steps of ``step_uuids`` in ``cancellations``."""
        return {u: self.cancellations[u] for u in step_uuids if u in self.cancellations}

    async def announce_ready(self, queue: str, msg_ids: Sequence[int], delay_s: float = 0.0) -> None:
        """Noted in ``announcements`` (nobody listens in memory)."""
        if msg_ids:
            self.announcements.append((queue, sorted(msg_ids), delay_s))

    async def capable_worker_exists(self, capability: str, fresh_within_s: float, other_than: str) -> bool:
        """Whether ``capability`` is among ``capable_peers``."""
        return capability in self.capable_peers

    async def settle_in_transaction(self, outcome: Outcome, worker_id: str, conn: Any) -> tuple[bool, bool]:
        """There are no transactions in memory (``ctx.transaction()`` raises first)."""
        raise UsageError("the in-memory store has no transactions")

    # --- inside ------------------------------------------------------------------------------

    def _held(self, queue: str, msg: ClaimedMessage) -> MemoryMessage | None:
        """The message, if the claim ``msg`` still holds it (its read_ct unchanged)."""
        m = self.messages(queue).get(msg.msg_id)
        return m if m is not None and m.read_ct == msg.read_ct else None

    def _record(self, m: MemoryMessage, outcome: Outcome) -> str | None:
        """Record the outcome row (the first per step_uuid wins), encoded as the settle encodes
        it for the database; return the step_uuid."""
        key = _step_uuid_of(m.body)
        if outcome.status is not None and key is not None and key not in self.outcomes:
            row = json.loads(encode_outcomes([outcome]))[0]
            self.outcomes[key] = StepOutcome(key, outcome.status.value, row.get("result"), outcome.error, m.read_ct)
        return key


class HandlerHarness(RegistersHandlers):
    """Handlers, the runtime's step runner on an in-memory store, and a manual clock."""

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
        self.store = MemoryStore(self.clock)
        self.circuits = circuit_breakers(self.config, self.clock)
        self.stats = WorkerStats(window=self.config.worker.stats_window)
        self._settings = StepSettings.from_config(self.config, HARNESS_WORKER)
        self._executor = HandlerExecutor("thread", self.config.worker.executor_workers)
        held = InFlight(self._settings.max_concurrent, self._settings.vt_seconds)
        wakeups = NoWakeups()  # the harness moves the clock and claims by itself
        self._writer = OutcomeWriter(self.store, HARNESS_WORKER, self.stats, held, wakeups)
        self._runner = StepRunner(
            self._settings,
            store=self.store,
            held=held,
            writer=self._writer,
            registry=self.registry,
            executor=self._executor,
            circuits=self.circuits,
            wakeups=wakeups,
            stats=self.stats,
            queue_names=[self.queue],
            state=self.state,
        )
        #: Every periodic run: (job name, clock time, the exception it raised or None).
        self.periodic_runs: list[tuple[str, datetime, BaseException | None]] = []
        self._started = self.clock.now()
        self._periodic_due: dict[str, datetime] = {}

    # --- the store's contents --------------------------------------------------------------

    @property
    def messages(self) -> dict[int, MemoryMessage]:
        """The queue's messages by msg_id (waiting for their vt, or ready)."""
        return self.store.messages(self.queue)

    @property
    def outcomes(self) -> dict[str, StepOutcome]:
        """Outcomes by step_uuid: at most one per step, as in ``tasker.step_results``."""
        return self.store.outcomes

    @property
    def dead_letters(self) -> list[MemoryMessage]:
        """The messages moved to the DLQ, oldest first."""
        return list(self.store.messages(self.queue + "_dlq").values())

    @property
    def archived(self) -> list[MemoryMessage]:
        """The settled messages."""
        return self.store.archived

    @property
    def runs(self) -> list[RunRecord]:
        """Every write about a claimed message, in order."""
        return self.store.runs

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
        return self.store.send(self.queue, body, delay=delay)

    # --- flow control (as ``tasker-worker queue pause|resume|limit``) ------------------------

    def pause(self) -> None:
        """Pause the namespace: ``run_ready`` starts nothing until ``resume``."""
        self.store.pause(self.namespace)

    def resume(self) -> None:
        """Resume the namespace."""
        self.store.resume(self.namespace)

    def limit(
        self, *, max_running: int | None = None, key_max_running: int | None = None, rate: Rate | str | None = None
    ) -> None:
        """Fleet-wide limits of the namespace (None leaves one as it is, 0 removes it); ``rate``
        as ``"20/s"``. The harness runs one step at a time, so ``max_running`` shows in how many
        a claim takes; a rate shows on the manual clock."""
        self.store.limit(self.namespace, max_running=max_running, key_max_running=key_max_running, rate=rate)

    # --- running -------------------------------------------------------------------------

    async def run_ready(self) -> int:
        """Claim every message visible now and run them one after another, oldest first, until
        none is visible; return how many ran. As the worker's claim, the steps of handlers whose
        circuit is open stay untouched."""
        count = 0
        while count < MAX_RUNS_PER_CALL:
            circuits = self.circuits
            skip = circuits.skipped() if circuits.circuits else ()
            claimed = await self.store.claim(
                self.queue,
                self._settings.vt_seconds,
                MAX_RUNS_PER_CALL - count,
                Source.POLL,
                worker_id=HARNESS_WORKER,
                skip_handlers=skip,
            )
            if not claimed:
                return count
            for msg in claimed:
                entry = self._runner.start(msg)
                assert entry.task is not None
                await entry.task
                await self._writer.flush()
                if self._runner.progress:
                    await self.store.write_progress(self._runner.progress.take(), HARNESS_WORKER)
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
            next_start = self.store.next_start_at(self.queue)
            if next_start is not None:
                moments.append(next_start)
            upcoming = [t for t in moments if t > now]
            if not upcoming or min(upcoming) > end:
                break
            await self.advance(min(upcoming) - now)
        await self.advance(max(timedelta(0), end - self.clock.now()))
        await self.run_ready()

    def cancel(self, step: StepMessage | str | uuid.UUID, by: str = "harness") -> str:
        """Cancel a step as ``client.cancel`` does: a queued one is taken off the queue and
        recorded ``cancelled`` (``"cancelled"``); one running now (call this from inside a
        handler, or from another task) is asked to stop: ``ctx.cancelled`` (``"cancelling"``)."""
        key = str(step.step_uuid if isinstance(step, StepMessage) else step)
        if key in self.outcomes:
            return "finished"
        now = self.clock.now()
        for m in list(self.messages.values()):
            if _step_uuid_of(m.body) == key and (m.claimed_by is None or m.vt <= now):
                del self.messages[m.msg_id]
                error = {"reason": "cancelled", "by": by}
                self.outcomes[key] = StepOutcome(key, "cancelled", None, error, m.read_ct)
                return "cancelled"
        self.store.cancellations[key] = by
        return "cancelling" if self._runner.request_cancel(uuid.UUID(key), by) else "not_found"

    def progress(self, step: StepMessage | str | uuid.UUID) -> dict[str, Any] | None:
        """The last progress the step reported (``ctx.progress``): fraction, note, data."""
        key = str(step.step_uuid if isinstance(step, StepMessage) else step)
        return self.store.progress.get(key)

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


def _step_uuid_of(body: Any) -> str | None:
    """The message's step_uuid as the database reads it (``tasker.try_uuid``), or None."""
    value = body.get("step_uuid") if isinstance(body, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


__all__ = ["HandlerHarness", "MemoryMessage", "MemoryStore", "RunRecord", "StepOutcome"]
