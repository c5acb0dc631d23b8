"""OutcomeWriter: the one place where every step ends.

The step runner hands each step's ``Settlement`` (``domain/settlement.py``) to ``end``, which
never waits: the writer batches the ends of many steps into few statements (one per kind and
queue: the settle, the dead letters, the put-backs, each through the ``StepStore``), then
``finish``es each step with how its write went (``Written``): it counts it, asks the claim side
to come back when a put-back falls due (or when the vt of a message nothing was written about
lapses), announces what listening workers cannot otherwise know of, and stops holding the
message. A step that ended without a write (an error inside the runtime, a commit in doubt) is
``finish``ed here too, so nothing else in the runtime ends a step.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import anyio
import psycopg

from tasker_worker.db.queue_client import RetryRequest
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff, retry_transient
from tasker_worker.domain.settlement import DeadLetter, PutBack, Record, Settlement, Written
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source
from tasker_worker.logs import error_fields
from tasker_worker.runtime.inflight import HeldStep, InFlight
from tasker_worker.runtime.ports import WAKE_MARGIN_S, StepStore, Wakeups
from tasker_worker.runtime.stats import WorkerStats

# The logger the step lines have always had (docs/troubleshooting.md shows it; operators filter on it).
log = logging.getLogger("tasker_worker.runtime.processor")

#: How long a flush retries a broken database before giving up on that batch.
WRITE_RETRY_BUDGET = timedelta(seconds=60)
#: How long announcing put-backs may take (a listening worker finds them at its poll otherwise).
ANNOUNCE_TIMEOUT_S = 2.0

_Item = tuple[HeldStep, Settlement]


class OutcomeWriter:
    """Ends steps: batches their writes, then counts, wakes and forgets each one."""

    def __init__(self, store: StepStore, worker_id: str, stats: WorkerStats, held: InFlight, wakeups: Wakeups) -> None:
        self.store = store
        self.worker_id = worker_id
        self.stats = stats
        self.held = held
        self.wakeups = wakeups
        self._pending: list[_Item] = []
        self._wake = anyio.Event()
        self._closed = False
        #: Items taken from ``_pending`` whose write is not over yet.
        self._writing = 0
        #: The end of the final flush at shutdown (anyio time; set by the processor).
        self.final_deadline = float("inf")

    # --- the one call ----------------------------------------------------------------------

    def end(self, entry: HeldStep, settlement: Settlement) -> None:
        """End the step of ``entry`` with ``settlement``: written with the next batch, then
        ``finish``ed. Its slot is free at once (see ``InFlight.hand_off``). A step already
        ending (released at shutdown while its handler still ran) is left to that end."""
        if entry.ending:
            return
        entry.ending = True
        if type(settlement) is DeadLetter:
            msg = entry.msg
            log.warning(
                "dead-lettering msg %s of %s: %s",
                msg.msg_id,
                msg.queue,
                settlement.error.get("reason"),
                extra={
                    **step_fields(msg),
                    "error_type": settlement.error.get("type"),
                    "error_detail": settlement.error.get("message", settlement.error.get("reason")),
                },
            )
        if self._closed:  # after the final flush: its message returns at its vt
            self.finish(entry, settlement, Written.NOT_WRITTEN)
            return
        self.held.hand_off(entry)
        self._pending.append((entry, settlement))
        self._wake.set()

    def abandon(self, entry: HeldStep) -> None:
        """The step of ``entry`` ended without a write (an error inside the runtime, a commit
        in doubt, a cancellation): its message returns at its vt. Nothing if its end was
        handed to the writer already."""
        if not entry.ending:
            self.finish(entry, None, Written.NOT_WRITTEN)

    def finish(self, entry: HeldStep, settlement: Settlement | None, written: Written) -> None:
        """The write that ends ``entry``'s step is over (here, or in the handler's own
        transaction; ``settlement`` None: there was none): count it, schedule what follows, and
        stop holding its message."""
        if entry.ended:
            return
        entry.ending = True
        msg = entry.msg
        if written is Written.APPLIED:
            kind = type(settlement)
            counters = self.stats.counters  # every key is always there (COUNTERS)
            if kind is Record:
                assert isinstance(settlement, Record)
                if settlement.status is not None:
                    _count_outcome(counters, settlement.status)
                    if entry.step_key is not None:
                        self.held.note_recorded(entry.step_key)
            elif kind is DeadLetter:
                assert isinstance(settlement, DeadLetter)
                counters["processed"] += 1
                counters["dead_lettered"] += 1
                if settlement.status is OutcomeStatus.FAILED:
                    counters["failed"] += 1
            elif isinstance(settlement, PutBack):
                if settlement.counter is not None:
                    counters[settlement.counter] += 1
                if settlement.leave_alone_s is not None:
                    until = time.monotonic() + settlement.delay_s + settlement.leave_alone_s
                    self.wakeups.leave_alone(msg.queue, msg.msg_id, until)
                else:
                    # Come back when it is due, whatever the deployment mode (no notification
                    # comes for a put-back).
                    self.wakeups.schedule(msg.queue, settlement.delay_s + WAKE_MARGIN_S, Source.POLL)
        elif written is Written.FENCED:
            self.stats.incr("stale_acks")
        else:
            # Nothing about its message went through: look for it again when its vt lapses,
            # so that it is settled even in EventDrivenOnly, where no poller comes back.
            remaining = entry.vt_deadline - time.monotonic()
            self.wakeups.schedule(msg.queue, max(0.0, remaining) + WAKE_MARGIN_S, Source.POLL)
        self.held.release_hold(entry)

    # --- writing ---------------------------------------------------------------------------

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
            groups: dict[tuple[str, str], list[_Item]] = defaultdict(list)
            for item in batch:
                groups[(_kind(item[1]), item[0].msg.queue)].append(item)
            for (kind, queue), items in groups.items():
                await self._write_group(kind, queue, items)
                self._writing -= len(items)

    async def _write_group(self, kind: str, queue: str, items: list[_Item]) -> None:
        async def write() -> dict[int, bool]:
            began = time.monotonic()
            written = await self._write(kind, queue, items)
            self.stats.observe_write(kind, time.monotonic() - began)
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
                kind,
                queue,
                extra={"queue": queue, **error_fields(exc)},
            )
            results = {}
        except Exception as exc:  # not the database's weather: still never the writer's end
            self.stats.incr("internal_errors")
            log.exception(
                "writing %d %s results to %s failed; they return after their vt",
                len(items),
                kind,
                queue,
                extra={"queue": queue, **error_fields(exc)},
            )
            results = {}
        for entry, settlement in items:
            applied = results.get(entry.msg.msg_id)
            written = Written.NOT_WRITTEN if applied is None else Written.APPLIED if applied else Written.FENCED
            try:
                self.finish(entry, settlement, written)
            except Exception:  # the writer must go on for the other steps
                log.exception("ending msg %s of %s failed", entry.msg.msg_id, queue, extra={"queue": queue})
        if kind in _PUT_BACK_KINDS:
            # After the steps are finished, so that a claim it prompts does not find the message
            # still held here (and take it for a redelivery of the step that just ended); shielded
            # and bounded, as at shutdown the last step finished lets the worker stop while its
            # announcement is still to go out.
            deadline = min(self.final_deadline, anyio.current_time() + ANNOUNCE_TIMEOUT_S)
            with anyio.CancelScope(shield=True, deadline=deadline):
                await self._announce(queue, [(e.msg.msg_id, s) for e, s in items if results.get(e.msg.msg_id)])

    async def _write(self, kind: str, queue: str, items: list[_Item]) -> dict[int, bool]:
        if kind == "record":
            outcomes = [_outcome(e.msg, s) for e, s in items]  # type: ignore[arg-type]
            settled = await self.store.settle(queue, self.worker_id, outcomes)
            return {o.msg.msg_id: o.msg.msg_id in settled for o in outcomes}
        if kind == "dead_letter":
            outcomes = [_outcome(e.msg, s) for e, s in items]  # type: ignore[arg-type]
            return await self.store.dead_letter(queue, self.worker_id, outcomes)
        requests = []
        for e, s in items:
            assert isinstance(s, PutBack)
            requests.append(
                RetryRequest(
                    e.msg, int(s.delay_s * 1000), s.headers, s.count_attempt, event=s.event, event_data=s.event_data
                )
            )
        return await self.store.retry(queue, requests, worker_id=self.worker_id)

    async def _announce(self, queue: str, applied: list[tuple[int, Settlement]]) -> None:
        """Tell the listening workers of the put-backs that ask for it (one notification per
        delay: a shutdown's releases are one)."""
        by_delay: dict[float, list[int]] = defaultdict(list)
        for msg_id, settlement in applied:
            if isinstance(settlement, PutBack) and settlement.announce:
                by_delay[settlement.delay_s].append(msg_id)
        for delay_s, msg_ids in by_delay.items():
            try:
                await self.store.announce_ready(queue, msg_ids, delay_s)
            except psycopg.Error as exc:  # given back all the same; pollers of the other modes find them
                self.stats.incr("db_errors")
                log.warning("gave back %d messages of %s but could not announce them: %s", len(msg_ids), queue, exc)


_PUT_BACK_KINDS = frozenset({"retry", "release"})


def _kind(settlement: Settlement) -> str:
    """The batch a settlement is written with (also the ``kind`` label of the write metrics)."""
    kind = type(settlement)
    if kind is Record:
        return "record"
    if kind is DeadLetter:
        return "dead_letter"
    assert isinstance(settlement, PutBack)
    return "retry" if settlement.count_attempt else "release"


def _outcome(msg: ClaimedMessage, settlement: Record | DeadLetter) -> Outcome:
    if type(settlement) is Record:
        return Outcome(
            msg, settlement.status, settlement.result, settlement.error, settlement.started_at, settlement.finished_at
        )
    return Outcome(msg, settlement.status, None, settlement.error, settlement.started_at, settlement.finished_at)


def _count_outcome(counters: dict[str, int], status: OutcomeStatus) -> None:
    counters["processed"] += 1
    if status is OutcomeStatus.SUCCEEDED:
        counters["succeeded"] += 1
    elif status is OutcomeStatus.FAILED:
        counters["failed"] += 1
    elif status is OutcomeStatus.DEAD_LETTERED:  # a handler with dlq=False
        counters["dead_lettered"] += 1


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


__all__ = ["WRITE_RETRY_BUDGET", "OutcomeWriter", "step_fields"]
