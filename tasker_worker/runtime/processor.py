"""CommandProcessor: the claim side. Commands wake queues, claims fill the free slots.

Every source (listener, poller, timers, catch-up after a reconnect) only *wakes* a queue; the
claim itself is always the queue's claim statement (``db/queries.py``: pgmq.read's SKIP LOCKED
claim and the dedup probe), never more than the free slots. One claim loop per queue keeps
claiming while it gets full batches. Each claimed message goes to ``StepRunner``
(``steps.py``), which runs its step and writes its outcome; meanwhile this side keeps the vt of
the messages it holds and, at shutdown, gives back those whose steps did not finish.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff
from tasker_worker.domain.flow import FlowHold, HoldReason
from tasker_worker.domain.herd import ClaimedMemory, ClaimRanking
from tasker_worker.domain.names import namespace_of
from tasker_worker.domain.notifications import MessageReady
from tasker_worker.domain.steps import ClaimedMessage, Source
from tasker_worker.domain.verdicts import released
from tasker_worker.errors import TaskerError, first_line
from tasker_worker.logs import error_fields
from tasker_worker.runtime.commands import (
    CancelStep,
    ClaimsSeen,
    MessagesAnnounced,
    Shutdown,
    WakeClaims,
    WorkerCommand,
)
from tasker_worker.runtime.drains import Drains, DrainSettings
from tasker_worker.runtime.inflight import HeldStep
from tasker_worker.runtime.ports import WAKE_MARGIN_S
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.steps import PREFETCH_MAX_STEP_S, StepRunner

CLAIM_RETRY_BASE = timedelta(milliseconds=100)
CLAIM_RETRY_CAP = timedelta(seconds=5)

log = logging.getLogger(__name__)

MAX_TIMERS = 10_000
ANNOUNCED_MEMORY = 2_048
#: A message found by a poll counts as a missed wakeup only if it was ready this long before.
MISSED_WAKEUP_GRACE_S = 1.0
#: A claim that fails with these is retried (a timeout: ``[event_system] processing_timeout``).
CLAIM_FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, TimeoutError)
#: At most this many rejected messages per queue are left alone (the oldest go first).
LEAVE_REJECTED_MAX = 256
#: The most of the shutdown budget kept for the final writes (see ``write_reserve_s``).
MAX_WRITE_RESERVE_S = 2.0
#: A claim held back by a fleet-wide limit is tried again after this (or as soon as a slot frees
#: here): a slot freed by another worker is found within it.
FLOW_RECHECK_S = 0.25
#: A prefetched step starts only while at least this share of its vt is left (the keeper extends
#: it at half): one that waited longer, its claim at risk of lapsing while it runs, goes back.
PREFETCH_SAFE_SHARE = 0.25
#: A rate-limited claim comes back this long after the next token is due.
RATE_MARGIN_S = 0.005
#: Progress reported by running steps is written at most this often (the newest value wins).
PROGRESS_WRITE_S = 1.0


@dataclass
class _QueueState:
    name: str
    namespace: str = ""
    wake: anyio.Event = field(default_factory=anyio.Event)
    woken_by_event: bool = False
    # (min_id, max_id, explicit ids) of recent notifications, to detect missed wakeups
    announced: deque[tuple[int, int, frozenset[int]]] = field(default_factory=lambda: deque(maxlen=ANNOUNCED_MEMORY))
    #: msg_id -> monotonic time until which this worker does not claim it (steps.LEAVE_REJECTED_S)
    rejected: dict[int, float] = field(default_factory=dict)
    #: Messages recently claimed by anyone (``StepsClaimed`` notices and this worker's claims).
    claimed: ClaimedMemory = field(default_factory=ClaimedMemory)
    #: What held back the last claim (flow control: paused, or at a limit), None when nothing.
    hold: FlowHold | None = None
    #: Its flow control changed since the last claim: claim (or just look, with no room) now.
    flow_changed: bool = False
    #: Set when its flow control changes (a rate's wait ends at once).
    flow_event: anyio.Event = field(default_factory=anyio.Event)
    #: Woken with steps to claim and no room: other queues' prefetched steps yield to it
    #: (``CommandProcessor._set_waiting`` keeps the count of such queues).
    waiting: bool = False
    #: How many of the prefetched entries (``CommandProcessor.ready``) are this queue's.
    buffered: int = 0

    def poke(self, source: Source) -> None:
        if source is Source.EVENT:
            self.woken_by_event = True
        self.wake.set()

    #: The highest id any forgotten notification named: below it, whether a message was
    #: announced is no longer known, so it is not counted as a missed wakeup.
    forgotten_hi: int = -1

    def announce(self, lo: int, hi: int, ids: frozenset[int]) -> None:
        if len(self.announced) == self.announced.maxlen:
            _, old_hi, old_ids = self.announced[0]
            self.forgotten_hi = max(self.forgotten_hi, old_hi, max(old_ids, default=-1))
        self.announced.append((lo, hi, ids))

    def was_announced(self, msg_id: int) -> bool:
        if msg_id <= self.forgotten_hi:
            return True
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


class ClaimTimers:
    """The claim side's queues and timers: what wakes a queue's claim loop later.

    Built before everything that asks for wakeups (the step runner, the outcome writer, the
    processor itself), so that they are handed it rather than calling back into each other.
    Implements ``ports.Wakeups``."""

    def __init__(self, queues: list[str], stats: WorkerStats) -> None:
        self.queues = {q: _QueueState(q, namespace_of(q) or q) for q in queues}
        self.stats = stats
        #: (due, sequence, queue, source, ids): a wakeup of ``queue``; with ``ids``, only if one
        #: of them is not known to be claimed by then (a deferred claim, ``domain.herd``).
        self._timers: list[tuple[float, int, str, Source, tuple[int, ...] | None]] = []
        self._timer_seq = 0
        self._timer_changed = anyio.Event()

    def schedule(self, queue: str, delay_s: float, source: Source) -> None:
        """Wake ``queue`` after ``delay_s`` (delayed messages, put-backs, lapsing vts)."""
        self.push(delay_s, queue, source, None)

    def leave_alone(self, queue: str, msg_id: int, until: float) -> None:
        """Do not claim ``msg_id`` of ``queue`` before monotonic time ``until``."""
        qs = self.queues.get(queue)
        if qs is not None:
            qs.leave_alone(msg_id, until)

    def push(self, delay_s: float, queue: str, source: Source, ids: tuple[int, ...] | None) -> None:
        """A wakeup of ``queue`` after ``delay_s``; with ``ids``, a deferred claim of them."""
        if len(self._timers) >= MAX_TIMERS:
            self.stats.incr("timers_dropped")
            if ids is not None:  # a deferred claim must not be lost: claim now instead
                self.stats.incr("claims_taken_over")
                self.queues[queue].poke(source)
            return
        self._timer_seq += 1
        heapq.heappush(self._timers, (anyio.current_time() + max(0.0, delay_s), self._timer_seq, queue, source, ids))
        self._timer_changed.set()

    async def run(self) -> None:
        """Wake the queues whose timers fall due, until cancelled."""
        while True:
            self._timer_changed = anyio.Event()
            if not self._timers:
                await self._timer_changed.wait()
                continue
            due, _, queue, source, ids = self._timers[0]
            wait = due - anyio.current_time()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._timer_changed.wait()
                continue
            heapq.heappop(self._timers)
            entries = [ids]
            # Timers for the same queue and moment collapse into one wakeup.
            while self._timers and self._timers[0][2] == queue and self._timers[0][0] <= due + 0.01:
                entries.append(heapq.heappop(self._timers)[4])
            qs = self.queues[queue]
            needed = False
            for entry in entries:
                if entry is None:  # a plain wakeup
                    needed = True
                    continue
                # A deferred claim (domain/herd.py): only if its messages were not seen claimed.
                taken = not qs.claimed.covers(entry)
                self.stats.incr("claims_taken_over" if taken else "claims_left_to_peers")
                needed = needed or taken
            if needed:
                qs.poke(source)


@dataclass(frozen=True)
class ClaimSettings:
    """What the claim side reads of the configuration."""

    worker_id: str
    #: At most this many messages per claim (``[event_system.fallback_poller] batch_size``).
    batch_size: int
    #: The claim's visibility timeout, whole seconds.
    vt_seconds: int
    #: tasker-core's meaning: how long the processing of one command (here, a wakeup's claim)
    #: may take before it is abandoned, counted and retried.
    processing_timeout_s: float
    claim_grace_s: float
    #: The whole shutdown budget (``[worker] shutdown_timeout``).
    shutdown_timeout_s: float
    #: Steps claimed ahead of free slots while working through a backlog (``[worker] prefetch``).
    prefetch: int = 0
    #: How often cancel requests of held steps are looked for without a notification (a
    #: worker that does not listen, or missed one): ``[registry] heartbeat_interval``.
    cancel_check_s: float = 30.0
    #: ``[event_system.fallback_poller] polling_interval``: how often a namespace whose
    #: notifications are off is polled when no poller runs (``drains.py``).
    polling_interval_s: float = 5.0

    @classmethod
    def from_config(cls, config: TaskerConfig, worker_id: str) -> ClaimSettings:
        """The settings of a worker's configuration."""
        es = config.event_system
        return cls(
            worker_id=worker_id,
            batch_size=es.fallback_poller.batch_size,
            vt_seconds=max(1, math.ceil(es.fallback_poller.visibility_timeout.total_seconds())),
            processing_timeout_s=es.processing_timeout.total_seconds(),
            claim_grace_s=es.listener.claim_grace.total_seconds(),
            shutdown_timeout_s=config.worker.shutdown_timeout.total_seconds(),
            prefetch=config.worker.prefetch,
            cancel_check_s=config.registry.heartbeat_interval.total_seconds(),
            polling_interval_s=es.fallback_poller.polling_interval.total_seconds(),
        )


class CommandProcessor:
    """Consumes WorkerCommands: wakes claim loops, claims, and hands each message to the steps."""

    def __init__(
        self,
        settings: ClaimSettings,
        *,
        client: QueueClient,
        timers: ClaimTimers,
        runner: StepRunner,
        stats: WorkerStats,
        listening_since: Callable[[], float | None] = lambda: None,
        ranking: ClaimRanking | None = None,
        listens: Callable[[], bool] = lambda: False,
        polled: Callable[[], bool] = lambda: True,
        shares_slots: bool = False,
    ) -> None:
        self.settings = settings
        self.worker_id = settings.worker_id
        self.client = client
        self.stats = stats
        self.listening_since = listening_since
        #: Who claims a notified message first (None: this worker claims every notification).
        self.ranking = ranking
        self.claim_grace = settings.claim_grace_s
        self.timers = timers
        self.queues = timers.queues
        #: The step side: the runner, the messages it holds and the writer that ends its steps.
        self.steps = runner
        self.held = runner.held
        self.writer = runner.writer
        self.max_concurrent = self.held.max_concurrent
        self.vt_seconds = settings.vt_seconds
        self.batch_size = settings.batch_size
        self.processing_timeout_s = settings.processing_timeout_s
        self.prefetch = settings.prefetch
        self.refill_at = max(1, min(self.batch_size, self.max_concurrent) // 2)
        self.refill_prefetching_at = max(1, min(self.batch_size, self.max_concurrent + self.prefetch) // 2)
        #: Prefetched entries in the order they were claimed, started by ``_starter`` as slots free.
        self.ready: deque[HeldStep] = deque()
        #: How many queues wait for a free slot (``_QueueState.waiting``).
        self._waiting = 0
        self._ready_added = anyio.Event()
        self._probe_wanted = anyio.Event()
        self._probe_source = Source.POLL
        self._claiming = True
        self.last_error: str | None = None
        #: Drain leases and their handshakes, the listener rows, quiet namespaces (``drains.py``):
        #: what lets producers skip a notification with no step stranded.
        self.drains = Drains(
            DrainSettings(
                settings.worker_id,
                renew_s=settings.cancel_check_s,
                poll_s=settings.polling_interval_s,
                timeout_s=settings.processing_timeout_s,
            ),
            client=client,
            queues=list(self.queues),
            wake=lambda queue, source: self.queues[queue].poke(source),
            stats=stats,
            listens=listens,
            polled=polled,
        )
        #: The held messages (and slots) are shared with the processors of the worker's other
        #: clusters (``runtime/assembly.py``): what this one extends, watches and gives back is
        #: only its own queues' messages, through its own cluster's client.
        self.shares_slots = shares_slots

    # --- public ----------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        """How many more steps may start now."""
        return self.held.free_slots

    async def run(
        self, commands: MemoryObjectReceiveStream[WorkerCommand], shutdown_deadline: Callable[[], float]
    ) -> None:
        """Process commands until ``Shutdown``; then drain within the budget and release."""
        async with anyio.create_task_group() as outer:
            outer.start_soon(self.writer.run)
            # Through the drain too: the steps still running keep their vt, report progress and
            # can be cancelled until the worker stops.
            outer.start_soon(self._vt_keeper)
            outer.start_soon(self._progress_writer)
            outer.start_soon(self._cancel_watch)
            try:
                async with anyio.create_task_group() as loops:
                    for qs in self.queues.values():
                        loops.start_soon(self._claim_loop, qs)
                    loops.start_soon(self.timers.run)
                    loops.start_soon(self.drains.run)
                    loops.start_soon(self._probe_loop)
                    loops.start_soon(self._starter)
                    async with commands:
                        async for command in commands:
                            if isinstance(command, Shutdown):
                                log.info("shutdown: %s", command.reason)
                                break
                            self.handle(command)
                    self._claiming = False
                    loops.cancel_scope.cancel()
                # Nothing more is claimed: producers must not count on this worker's drains.
                with anyio.CancelScope(shield=True, deadline=self.final_deadline(shutdown_deadline())):
                    await self.drains.leave()
                # Prefetched steps never start after a shutdown was asked for: they go back at
                # once, with the attempt given back (as unfinished ones do below).
                buffered = self._take_buffered()
                if buffered:
                    with anyio.CancelScope(shield=True, deadline=self.final_deadline(shutdown_deadline())):
                        await self._release_all(buffered, "shutdown")
                # Sources are stopped and nothing new is claimed: let in-flight steps finish
                # until the deadline less the reserve for the final writes, then cancel them and
                # give their messages back.
                deadline = self.final_deadline(shutdown_deadline())
                with anyio.move_on_after(max(0.0, deadline - self.write_reserve_s - anyio.current_time())):
                    while self._holding():
                        await self.held.wait_slot()
            finally:
                self._claiming = False
                deadline = self.final_deadline(shutdown_deadline())
                # Everything from here on ends by the one deadline, whatever the database does.
                with anyio.CancelScope(shield=True, deadline=deadline):
                    self._take_buffered()
                    running = self._own(self.held.running())
                    # Stop the handlers first, then give their messages back: released first, a
                    # message could be claimed by a peer while its handler still ran here.
                    for entry in running:
                        entry.releasing = True
                    await self.steps.cancel(running)
                    # A sync handler's thread outlives its task's cancellation: its message
                    # returns at its vt, not now (released now, a peer could run the step while
                    # the thread here still does).
                    still_running = [e for e in running if self.steps.may_run_on(e)]
                    for entry in still_running:
                        self.writer.abandon(entry)
                    running = [e for e in running if not e.ending]
                    if running:
                        await self._release_all(running, "shutdown")
                self.writer.final_deadline = deadline
            outer.cancel_scope.cancel()

    @property
    def write_reserve_s(self) -> float:
        """The share of the shutdown budget kept for the final writes (releases, outcomes,
        deregistration) rather than waiting for handlers: 30% of it, at most 2 s."""
        return min(MAX_WRITE_RESERVE_S, 0.3 * self.settings.shutdown_timeout_s)

    def final_deadline(self, requested: float) -> float:
        """The shutdown's deadline: the one set when it was requested, else (a crash, a
        cancellation) the budget from now."""
        if requested != float("inf"):
            return requested
        return anyio.current_time() + self.settings.shutdown_timeout_s

    def handle(self, command: WorkerCommand) -> None:
        """Apply one non-shutdown command (no I/O: it only wakes claim loops)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("command", extra={"command_type": type(command).__name__})
        if isinstance(command, MessagesAnnounced):
            self._on_event(command.event)
        elif isinstance(command, ClaimsSeen):
            notice = command.notice
            seen = self.queues.get(notice.queue)
            if seen is not None:
                seen.claimed.add(notice.msg_ids, *((notice.lo, notice.hi) if notice.truncated else (None, None)))
        elif isinstance(command, CancelStep):
            try:
                self.steps.request_cancel(uuid.UUID(command.request.step_uuid), command.request.by)
            except ValueError:
                log.warning("a cancel request named no step: %r", command.request.step_uuid)
        elif isinstance(command, WakeClaims):
            if command.queue in self.queues:
                self.queues[command.queue].poke(command.source)
            elif len(self.queues) == 1:
                for qs in self.queues.values():
                    qs.poke(command.source)
            else:
                # Every queue: one probe for all of them first (``_probe_loop``).
                self._probe_source = command.source
                self._probe_wanted.set()

    def status(self) -> dict[str, Any]:
        """Statistics and in-flight work."""
        snap = self.stats.snapshot()
        snap["in_flight"] = len(self.held)
        snap["outcomes_waiting"] = self.held.handed_off
        snap["prefetched"] = self.held.buffered
        snap["free_slots"] = self.free_slots
        snap["queues"] = sorted(self.queues)
        snap["circuits"] = self.steps.circuits.open_circuits()
        return snap

    # --- waking ----------------------------------------------------------------------------

    def _on_event(self, event: MessageReady) -> None:
        qs = self.queues.get(event.queue_name)
        if qs is None:
            return
        self.stats.incr("notifications_received")
        if event.message_count == 0 and not event.msg_ids:
            # The namespace's flow control changed (tasker.announce_namespace: paused, resumed, a
            # limit set): every worker looks at once, also one whose slots and buffer are full.
            qs.flow_changed = True
            qs.flow_event.set()
            self.drains.refresh()  # or its notify switch changed (tasker.set_queue_notify)
            qs.poke(Source.EVENT)
            self.held.nudge()  # a claim loop waiting for room wakes and looks
            return
        lo = event.min_msg_id if event.min_msg_id is not None else min(event.msg_ids, default=0)
        hi = event.max_msg_id if event.max_msg_id is not None else max(event.msg_ids, default=-1)
        qs.announce(lo, hi, frozenset(event.msg_ids))
        # Announced now, so ready now (or at ready_at): an earlier claim of these ids no longer
        # counts (notifications arrive in commit order, a later claim's notice after this).
        qs.claimed.forget(event.msg_ids or (lo,))
        wait = 0.0
        if event.ready_at is not None:
            wait = (event.ready_at - datetime.now(UTC)).total_seconds()
            wait = wait + WAKE_MARGIN_S if wait > 0.005 else 0.0
        ranking = self.ranking
        if ranking is not None and ranking.fleet(qs.namespace) > 1:
            rank = ranking.rank(qs.namespace, lo)
            first = ranking.immediate(qs.namespace, event.message_count, self.batch_size)
            if rank >= first:
                # Another worker is first in line: come back after the grace, and claim only if
                # it has not (see domain/herd.py).
                ids = event.msg_ids if hi in event.msg_ids or not event.msg_ids else (*event.msg_ids, hi)
                self.stats.incr("claims_deferred")
                self.timers.push(wait + self.claim_grace * (rank - first + 1), qs.name, Source.EVENT, ids or (hi,))
                return
        if wait > 0:
            self.timers.schedule(qs.name, wait, Source.EVENT)
            return
        qs.poke(Source.EVENT)

    async def _probe_loop(self) -> None:
        """Wake only the queues that have a visible message, asked in one statement: a poll of
        a worker with many namespaces costs one round trip when there is nothing to do (one
        claim per queue before). Requests arriving during a probe coalesce into the next one."""
        queues = list(self.queues)
        if not queues:
            return  # the primary's processor of a worker whose namespaces all live elsewhere
        while True:
            await self._probe_wanted.wait()
            self._probe_wanted = anyio.Event()
            source = self._probe_source
            try:
                found = await self.client.visible_queues(queues)
                self.stats.incr("queue_probes")
            except TRANSIENT_DB_ERRORS as exc:
                # Let the claims find out (they retry with their own backoff).
                self.stats.incr("db_errors")
                log.warning("probing %d queues failed; claiming from each", len(queues), extra=error_fields(exc))
                found = set(queues)
            except TaskerError as exc:  # a queue dropped behind the worker's back: each claim says which
                log.warning("probing queues failed (%s); claiming from each", exc)
                found = set(queues)
            for name in found:
                self.queues[name].poke(source)

    # --- claiming --------------------------------------------------------------------------

    async def _claim_loop(self, qs: _QueueState) -> None:
        backoff = Backoff(CLAIM_RETRY_BASE, CLAIM_RETRY_CAP, first_at_once=True)
        while self._claiming:
            await qs.wake.wait()
            qs.wake = anyio.Event()
            source = Source.EVENT if qs.woken_by_event else Source.POLL
            qs.woken_by_event = False
            backlog = False
            while self._claiming:
                free, refill_at = self._room(qs, backlog)
                # While the last claim came back full (a backlog), wait until a good share of
                # the room is free: one claim of 50 costs the server little more than a claim
                # of 1, so refilling slot by slot would multiply the round trips.
                if free <= 0 or (backlog and free < refill_at):
                    if not qs.flow_changed:
                        # Woken with steps and no room: the other queues' prefetched steps let
                        # this one have the next free slot (no namespace waits out another's
                        # backlog).
                        self._set_waiting(qs, not backlog)
                        await self.held.wait_slot()  # or a nudge: see _on_event
                        continue
                    free = 0  # no room, but look: a pause must reach what was prefetched
                qs.flow_changed = False
                if backlog:
                    # A claim's source is what triggered *it*: a notification that came while
                    # the previous claim ran, or else the backlog this loop is working through,
                    # which it found by looking (a poll), whatever woke the loop at first.
                    source = Source.EVENT if qs.woken_by_event else Source.POLL
                    qs.woken_by_event = False
                want = min(self.batch_size, free)
                circuits = self.steps.circuits
                skip = circuits.skipped() if circuits.circuits else ()
                skip_msgs = qs.left_alone(time.monotonic()) if qs.rejected else ()
                # With peers listening, say what was claimed, so that they need not look.
                with_peers = self.ranking is not None and self.ranking.fleet(qs.namespace) > 1
                began = time.monotonic()
                holds_ended = self.held.holds_ended.get(qs.name, 0)
                try:
                    # anyio's scope, not asyncio.timeout (5 us against 22 us a claim): its
                    # cancellation is delivered until the claim gives up, where asyncio's once
                    # left psycopg's cancel waiting on a dead network path for as long as it was.
                    with anyio.fail_after(self.processing_timeout_s):
                        msgs = await self.client.claim(
                            qs.name,
                            self.vt_seconds,
                            want,
                            source,
                            worker_id=self.worker_id,
                            skip_handlers=skip,
                            skip_msgs=skip_msgs,
                            announce=with_peers,
                        )
                    backoff.succeeded()
                except CLAIM_FAILURES as exc:
                    if isinstance(exc, TimeoutError):
                        self.stats.incr("claims_timed_out")
                        exc = TimeoutError(f"no answer within processing_timeout ({self.processing_timeout_s:g}s)")
                    else:
                        self.stats.incr("db_errors")
                    self.last_error = f"claim on {qs.name}: {exc}"
                    delay = backoff.failed()
                    log.warning(
                        "claim on %s failed; retrying in %.2fs",
                        qs.name,
                        delay,
                        extra={"queue": qs.name, "source": source.value, **error_fields(exc)},
                    )
                    # The claim may have gone through with its reply lost: those messages
                    # reappear after their vt, and must be looked for then in every mode.
                    self.timers.schedule(qs.name, self.vt_seconds + WAKE_MARGIN_S, Source.POLL)
                    await anyio.sleep(delay)
                    continue
                self.stats.observe_claim(time.monotonic() - began, len(msgs))
                self.stats.incr(f"claims_{source.value}")
                self.stats.incr(f"claimed_{source.value}", len(msgs))
                if with_peers and msgs:
                    qs.claimed.add(m.msg_id for m in msgs)
                for msg in msgs:
                    self._accept(qs, msg)
                if qs.waiting:  # its claim has taken the slots it waited for
                    self._set_waiting(qs, False)
                    self.held.nudge()  # the starter may hand out prefetched steps again
                lapsed = [m for m in msgs if m.lapsed_claim is not None]
                if lapsed:
                    await self._record_lapsed(qs, lapsed)
                hold = msgs.hold
                qs.hold = hold
                if qs.name in self.client.flow_queues and any(e.msg.queue == qs.name for e in self.ready):
                    # Flow control came in (or a pause): what this queue prefetched before it does
                    # not start; it goes back, with the attempt given back.
                    await self._release_all(self._take_buffered(qs.name), "flow_control")
                if hold is not None:
                    if want:
                        self.stats.incr("claims_held")
                    if hold.reason is HoldReason.PAUSED:
                        self.drains.ended(qs.name)
                        break  # resuming announces the namespace; the poller looks anyway
                    # Held by a limit with steps ready: come back when the rate allows the next
                    # start, or when a slot frees here, or after a moment (one freed elsewhere),
                    # or at once when the namespace's flow control changes.
                    if hold.retry_after_s is None:
                        # A step of ours ending (its write over) may free the namespace's count,
                        # including those that ended during the claim; the flow changing nudges.
                        if not qs.flow_changed:
                            with anyio.move_on_after(FLOW_RECHECK_S):
                                await self.held.wait_hold_ended(qs.name, holds_ended)
                    elif not qs.flow_changed:
                        qs.flow_event = anyio.Event()
                        with anyio.move_on_after(hold.retry_after_s + RATE_MARGIN_S):
                            await qs.flow_event.wait()
                    continue
                if len(msgs) < want:
                    # Busy (steps keep coming): claim again in a moment, holding the lease. Or
                    # the drain ends here: if producers skipped notifying because of it, the
                    # lease goes and the sends that skipped are claimed after they commit.
                    again = await self.drains.short_claim(qs.name, len(msgs))
                    if again is not None:
                        self.timers.schedule(qs.name, again, Source.POLL)
                    break
                if want:
                    # A full claim: this loop claims again without being told (producers may
                    # skip notifying while every listening worker does so: drains.py).
                    await self.drains.draining(qs.name)
                backlog = True

    def _room(self, qs: _QueueState, backlog: bool) -> tuple[int, int]:
        """How many steps ``qs`` may claim now, and the room worth a claim while in a backlog.

        The free slots, less the prefetched steps that will take them; while ``qs`` works
        through a backlog of short steps, the prefetch buffer too (claimed ahead, so the next
        steps start without waiting for a claim). No prefetch for a namespace under flow control
        (a step is claimed when it can start), for steps long enough that a claim's round trip
        does not matter (the buffer would only hold them back from idle peers), nor while
        another queue waits for a slot: then that queue's slots are not this one's buffer's."""
        others_waiting = self._waiting > qs.waiting
        reserved = qs.buffered if others_waiting or qs.waiting else self.held.buffered
        free = self.held.free_slots - reserved
        if (
            backlog
            and self.prefetch
            and not others_waiting
            and qs.name not in self.client.flow_queues
            and self.steps.typical_step_s < PREFETCH_MAX_STEP_S
        ):
            return free + self.prefetch, self.refill_prefetching_at
        return free, self.refill_at

    def _holding(self) -> bool:
        """Whether messages of this processor's queues are still held."""
        if not self.shares_slots:
            return bool(self.held)
        return any(True for _ in self._own(self.held.entries.values()))

    def _own(self, entries: Iterable[HeldStep]) -> list[HeldStep]:
        """Those of ``entries`` that are this processor's (all of them unless the slots are
        shared between clusters)."""
        if not self.shares_slots:
            return entries if isinstance(entries, list) else list(entries)
        queues = self.queues
        return [e for e in entries if e.msg.queue in queues]

    def _set_waiting(self, qs: _QueueState, waiting: bool) -> None:
        if qs.waiting is not waiting:
            qs.waiting = waiting
            self._waiting += 1 if waiting else -1

    def _unready(self, entry: HeldStep) -> None:
        """``entry`` left the start order (started, given back, taken)."""
        qs = self.queues.get(entry.msg.queue)
        if qs is not None and qs.buffered:
            qs.buffered -= 1

    async def _record_lapsed(self, qs: _QueueState, msgs: list[ClaimedMessage]) -> None:
        """Say that the previous claims of ``msgs`` lapsed (their steps run here now): a line and
        a StepAssignmentTimedOut event each. A failure to write the events costs only them."""
        self.stats.incr("lapsed_claims", len(msgs))
        for msg in msgs:
            prior = msg.lapsed_claim or {}
            log.warning(
                "msg %d of %s: the claim of %s (attempt %s) lapsed before it settled; claimed again",
                msg.msg_id,
                qs.name,
                prior.get("worker_id"),
                prior.get("read_ct"),
                extra={"queue": qs.name, "msg_id": msg.msg_id, "attempt": msg.read_ct},
            )
        try:
            await self.client.record_lapsed_claims(qs.name, self.worker_id, msgs)
        except Exception as exc:  # events only: whatever the cause (a hostile body too), the claim loop goes on
            if isinstance(exc, TRANSIENT_DB_ERRORS):
                self.stats.incr("db_errors")
            log.warning("lapsed claims on %s not recorded: %s", qs.name, first_line(exc))

    def _accept(self, qs: _QueueState, msg: ClaimedMessage) -> None:
        current = self.held.get(msg.queue, msg.msg_id)
        if current is not None:
            # Redelivered while still running here (our vt lapsed): we hold the newest claim,
            # so adopt its read_ct for the ack and keep running the first copy only.
            self.stats.incr("dedup_hits")
            current.msg.read_ct = msg.read_ct
            current.vt_deadline = msg.vt_deadline(self.vt_seconds)
            current.lost_claim = False
            return
        # A message of a namespace under flow control may wait on purpose: never a missed wakeup.
        since = (
            self.listening_since()
            if msg.source is Source.POLL
            and msg.read_ct == 1
            and qs.hold is None
            and qs.name not in self.client.flow_queues
            else None
        )
        if since is not None:
            # Only a message sent while LISTEN was up can be a missed wakeup. Both times are
            # read on the server's clock: the listener's start is placed there by how long ago
            # (locally) it was, counted back from the claim's server time.
            listening_for = msg.received_mono - since
            sent_after_listen = (msg.claimed_at - msg.enqueued_at).total_seconds() < listening_for
            ready_for = (msg.claimed_at - msg.enqueued_at).total_seconds()
            if (
                sent_after_listen
                and ready_for > MISSED_WAKEUP_GRACE_S
                and not qs.was_announced(msg.msg_id)
                # Sent while this worker drained (or the namespace was quiet): unannounced on purpose.
                and not self.drains.may_be_unannounced(qs.name, msg.enqueued_at)
            ):
                self.stats.incr("missed_wakeups")
        # First in, first started within a queue; another queue's prefetched steps wait for
        # a queue that claimed for a free slot.
        if self.held.free_slots > 0 and not qs.buffered:
            self.steps.start(msg)
            return
        self.ready.append(self.held.hold(msg, buffered=True))
        qs.buffered += 1
        self._ready_added.set()

    async def _starter(self) -> None:
        """Start prefetched steps as slots free: the hand-over costs no round trip. A slot
        goes to a queue waiting for one first (its claim loop takes it), not to the buffer."""
        while True:
            ready, held = self.ready, self.held
            while ready and held.free_slots > 0:
                if not self._someone_waits(ready[0].msg.queue):
                    entry = ready.popleft()
                else:
                    # The slot is a waiting queue's: its own prefetched steps take it. Its claim
                    # loop counts them against its room, so left behind another queue's entry
                    # they would keep it waiting, and the starter waiting for it, for good.
                    found = self._waiting_queues_entry()
                    if found is None:
                        break  # it has none: its claim loop takes the slot
                    entry = found
                self._unready(entry)
                self._start_prefetched(entry)
            if ready:
                await held.wait_slot()
            else:
                if self._ready_added.is_set():
                    self._ready_added = anyio.Event()
                    continue
                await self._ready_added.wait()

    def _waiting_queues_entry(self) -> HeldStep | None:
        """The first prefetched entry of a queue that waits for a slot, out of the start order
        (None when no waiting queue has one). The search is bounded by the buffer's size."""
        queues = self.queues
        for i, entry in enumerate(self.ready):
            qs = queues.get(entry.msg.queue)
            if qs is not None and qs.waiting:
                del self.ready[i]
                return entry
        return None

    def _someone_waits(self, queue: str) -> bool:
        """Whether a queue other than ``queue`` waits for a free slot."""
        if not self._waiting:
            return False
        qs = self.queues.get(queue)
        return self._waiting > (qs.waiting if qs is not None else 0)

    def _start_prefetched(self, entry: HeldStep) -> None:
        """Start a prefetched step, unless its claim is no longer safely ours: a step whose vt
        could lapse while it runs is given back instead (never run twice)."""
        if entry.ending:
            return  # released meanwhile (a shutdown, flow control)
        if entry.lost_claim:
            self.writer.abandon(entry)  # claimed by someone else since: theirs now
            return
        if entry.vt_deadline - time.monotonic() < self.vt_seconds * PREFETCH_SAFE_SHARE:
            self.stats.incr("prefetch_expired")
            self.held.unbuffer(entry)
            self.writer.end(entry, released("prefetch_expired"))
            return
        self.steps.start_buffered(entry)

    def _take_buffered(self, queue: str | None = None) -> list[HeldStep]:
        """Take the prefetched entries (of ``queue``, or all) out of the start order."""
        taken = [e for e in self.ready if queue is None or e.msg.queue == queue]
        if taken:
            self.ready = deque(e for e in self.ready if queue is not None and e.msg.queue != queue)
            for entry in taken:
                self._unready(entry)
        return taken

    async def _progress_writer(self) -> None:
        """Write what running steps reported (``ctx.progress``) at most once a second, in one
        statement for all of them; nothing when nobody reports."""
        board = self.steps.progress
        while True:
            await anyio.sleep(PROGRESS_WRITE_S)
            if not board:
                continue
            rows = board.take()
            try:
                await self.client.write_progress(rows, self.worker_id)
            except Exception as exc:  # progress is a report: losing one must never stop the worker
                self.stats.incr("db_errors")
                log.warning("progress of %d steps not written: %s", len(rows), first_line(exc))

    async def _cancel_watch(self) -> None:
        """Look for cancel requests of the steps held here every ``cancel_check_s``: a worker
        that does not listen (or missed the notice) finds them so."""
        while True:
            await anyio.sleep(self.settings.cancel_check_s)
            running = [str(e.msg.step.step_uuid) for e in self._own(self.held.running()) if e.msg.step is not None]
            if not running:
                continue
            try:
                found = await self.client.pending_cancellations(running)
            except Exception as exc:  # a dropped queue or a missing grant must not stop the worker
                log.warning("cancel requests not looked for: %s", first_line(exc))
                continue
            for step_uuid, by in found.items():
                self.steps.request_cancel(uuid.UUID(step_uuid), by)

    async def _vt_keeper(self) -> None:
        """Extend the vt of steps running past half of it, in one statement per queue."""
        tick = min(1.0, max(0.05, self.vt_seconds / 4))
        vt_ms = self.vt_seconds * 1000
        while True:
            await anyio.sleep(tick)
            now = time.monotonic()
            due: dict[str, list[Any]] = {}
            for item in self.held.entries.values() if not self.shares_slots else self._own(self.held.entries.values()):
                if not item.lost_claim and item.vt_deadline - now < self.vt_seconds / 2:
                    due.setdefault(item.msg.queue, []).append(item)
            for queue, items in due.items():
                # The new vt is set while the statement runs: counted from before it is sent, as
                # a claim's (ClaimedMessage.vt_deadline), not from its reply.
                sent = time.monotonic()
                try:
                    extended = await self.client.extend_vt(queue, [i.msg for i in items], vt_ms)
                except Exception as exc:  # a queue dropped behind the worker too: its steps lapse, the rest go on
                    self.stats.incr("db_errors")
                    log.warning("extending vt on %s failed", queue, extra={"queue": queue, **error_fields(exc)})
                    continue
                refused = 0
                for item in items:
                    if item.msg.msg_id in extended:
                        item.vt_deadline = sent + self.vt_seconds
                        self.stats.incr("vt_extensions")
                    elif not item.ending:
                        # The fence refused it: the message was claimed again elsewhere (our vt
                        # lapsed). The step runs on (its handler may be mid-write), but its
                        # outcome will be refused too; no more extensions are tried for it.
                        item.lost_claim = True
                        refused += 1
                if refused:
                    self.stats.incr("vt_extensions_refused", refused)
                    log.warning(
                        "%d steps on %s were claimed again elsewhere (vt lapsed); their outcomes will be refused",
                        refused,
                        queue,
                        extra={"queue": queue},
                    )

    # --- shutdown --------------------------------------------------------------------------

    async def _release_all(self, running: list[HeldStep], reason: str) -> None:
        """Give every still-running (or prefetched) step's message back at once (not counted as
        an attempt): each ends with the rulebook's ``released`` settlement, through the writer,
        which also announces them (visible again at once, but no INSERT announces them: workers
        that only listen would not know of them until another step came)."""
        log.info("releasing %d unfinished steps back to their queues (%s)", len(running), reason)
        settlement = released(reason)
        for entry in running:
            self.held.unbuffer(entry)
            self.writer.end(entry, settlement)
        # The caller's scope shields this from the shutdown's cancellation and bounds it by the
        # shutdown's deadline (a shield here would hide that deadline).
        try:
            while any(not e.ended for e in running):
                await self.held.wait_slot()
        except anyio.get_cancelled_exc_class():
            left = sum(1 for e in running if not e.ended)
            log.error("shutdown deadline: %d unfinished steps not released; they return after their vt", left)
            raise
