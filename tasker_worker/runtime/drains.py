"""Drains: the worker's side of sending fewer notifications (migration 0020).

A producer whose transaction sent a NOTIFY takes a database-wide lock at commit, so notifying
producers commit one at a time. The send trigger therefore announces nothing while every live
listening worker of the namespace *drains* it: its claim loop claims again without being told,
oldest first, because its last claim came back full (a backlog), or because steps arrive faster
than one claim each (busy: a short claim found several; it claims again every
``BUSY_INTERVAL_S`` until its claims have found nothing for ``BUSY_LINGER_S``). What this module
keeps true, so that no step is stranded in any mode:

- **Rows that tell the truth.** A worker with a listener (Hybrid, EventDrivenOnly) keeps a row
  per namespace in ``tasker.queue_listeners``, alive for three heartbeat intervals and renewed
  every one; a PollingOnly worker has none (it polls; a notification is nothing to it). An idle
  listener's row makes every send of its namespace notify: an idle worker hears of new steps as
  before, so pickup latency is unchanged. A worker that dies stops counting when its row lapses.
- **A lease only while draining.** ``draining`` takes a drain lease (seconds ahead, renewed at
  half) when the claim loop got a full claim, or ``short_claim`` when it is busy, before its next
  claim; in doubt (an error), the lease counts as held until it has surely lapsed.
- **A drain ends with a handshake.** ``ended`` hands the lease to the queue's closer: the lease
  is released (committed), then ``tasker.await_skipped_sends`` waits for every producer that
  skipped its notification while the lease was visible (each holds a shared lock of the
  namespace until its transaction ends: it took it before it read the leases), then the queue is
  woken and claims once more. That claim starts after those sends committed, so it sees them; a
  send made after the release is notified. The wait is cut into slices, and the queue claims
  what committed after each, so a producer's long transaction delays nobody else's step.
- **Quiet namespaces are polled.** A namespace whose notifications are off (``notify = false``,
  ``tasker.set_queue_notify``) is polled every ``polling_interval`` in every mode, EventDrivenOnly
  included (it has nothing else): ``keep_listening`` reads the switches, and re-reads them when
  the namespace is announced (a change of a switch announces it).

The spans of this worker's leases and of quiet periods are kept too, on the server's clock: a
message enqueued within one may have been found without a notification on purpose, which is no
missed wakeup.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio

from tasker_worker.db.queue_client import QueueClient
from tasker_worker.db.retry import TRANSIENT_DB_ERRORS, Backoff
from tasker_worker.domain.names import namespace_of, queue_name
from tasker_worker.domain.steps import Source
from tasker_worker.errors import first_line
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)

#: A drain lease lasts this long unless renewed (renewed once half of it is left): what a worker
#: that died while draining keeps producers from notifying, at most.
LEASE_S = 10.0
#: Busy (steps arrive faster than one claim each): a short claim that found at least this many
#: steps makes the claim loop claim again after BUSY_INTERVAL_S, holding its lease, until no
#: claim has found a step for BUSY_LINGER_S. A step sent meanwhile is found within the interval,
#: about what its notification would have taken; and a busy worker claims no more often than
#: steps come (each claim but the lingering ones finds one).
BUSY_ENTER = 2
BUSY_INTERVAL_S = 0.002
BUSY_LINGER_S = 0.02
#: A write of a lease whose answer was lost counts as held this much longer than the lease.
IN_DOUBT_MARGIN_S = 1.0
#: The wait for the sends that skipped their notification, in slices: the queue claims what
#: committed after each slice (a producer's long transaction holds back nobody else's step).
AWAIT_SLICE_MS = 100
#: How often the worker looks whether it listens now (a mode change), without a round trip.
LISTEN_CHECK_S = 1.0
#: How many lease and quiet spans per queue are kept for the missed-wakeup count.
SPANS_KEPT = 64
#: A message enqueued up to this long before a span began may still have been sent within it
#: (``enqueued_at`` is its transaction's start); one enqueued after its end (the server's time of
#: the release, just before it committed) was announced.
SPAN_BEFORE = timedelta(seconds=1)
SPAN_AFTER = timedelta(milliseconds=1)
#: The end of a span still open.
OPEN = datetime.max.replace(tzinfo=UTC)
#: The failures this module retries (a timeout: ``processing_timeout``).
FAILURES: tuple[type[BaseException], ...] = (*TRANSIENT_DB_ERRORS, TimeoutError)


@dataclass
class _QueueLease:
    """One queue's drain lease as this worker holds it."""

    namespace: str
    #: Monotonic time by which a lease this worker may hold has surely lapsed (None: none held).
    until: float | None = None
    #: Monotonic time of the last claim that found a step.
    found_at: float = 0.0
    #: The span ``[start, end]`` of the lease held now, on the server's clock (end: OPEN).
    span: list[datetime] | None = None
    #: Ended drains waiting for the closer: the latest time their leases lapse, and their spans.
    closing_at: float = 0.0
    closing_spans: list[list[datetime]] = field(default_factory=list)
    close_requested: anyio.Event = field(default_factory=anyio.Event)
    #: Lease and quiet spans, oldest first (see ``may_be_unannounced``).
    spans: deque[list[datetime]] = field(default_factory=lambda: deque(maxlen=SPANS_KEPT))
    #: The span of the quiet period now (its namespace's notifications are off), if any.
    quiet_span: list[datetime] | None = None


@dataclass(frozen=True)
class DrainSettings:
    """What the drains read of the configuration."""

    worker_id: str
    #: The worker's rows are renewed this often (``[registry] heartbeat_interval``) and live three times as long.
    renew_s: float
    #: How often a quiet namespace is polled when no poller runs (``polling_interval``).
    poll_s: float
    #: The most one of these statements may take (``[event_system] processing_timeout``).
    timeout_s: float

    @property
    def alive_s(self) -> float:
        """How long a row stays alive without renewal."""
        return 3 * self.renew_s


class Drains:
    """A worker's rows, drain leases and handshakes, and its quiet namespaces (see the module)."""

    def __init__(
        self,
        settings: DrainSettings,
        *,
        client: QueueClient,
        queues: list[str],
        wake: Callable[[str, Source], None],
        stats: WorkerStats,
        listens: Callable[[], bool] = lambda: False,
        polled: Callable[[], bool] = lambda: True,
    ) -> None:
        self.settings = settings
        self.client = client
        self.stats = stats
        #: Wakes a queue's claim loop (``ClaimTimers``' queue states).
        self.wake = wake
        #: Whether the worker runs a listener now (its mode uses one and LISTEN works).
        self.listens = listens
        #: Whether a poller runs now (PollingOnly, Hybrid): it polls quiet namespaces too.
        self.polled = polled
        self.leases = {q: _QueueLease(namespace_of(q) or q) for q in queues}
        #: The queues whose namespace's sends are not announced (as the last read said).
        self.quiet: set[str] = set()
        self.listening = False
        self._refresh = anyio.Event()

    # --- the claim loop's calls ------------------------------------------------------------

    async def draining(self, queue: str) -> None:
        """The claim loop of ``queue`` got a full claim: it claims again without being told.
        Hold the lease (take or renew it) before that next claim; nothing when not listening."""
        lease = self.leases[queue]
        now = time.monotonic()
        if lease.until is not None and (lease.until - now > LEASE_S / 2 or not self.listens()):
            return  # held (a worker that stopped listening renews nothing: its drain ends as it is)
        if lease.until is None:
            if not self.listens():
                return  # not counted by producers: nothing to promise
            lease.span = [datetime.now(UTC), OPEN]
            lease.spans.append(lease.span)
            self.stats.incr("drains")
        try:
            with anyio.fail_after(self.settings.timeout_s):
                taken_at = await self.client.take_drain(
                    lease.namespace, self.settings.worker_id, LEASE_S, self.settings.alive_s
                )
        except FAILURES as exc:
            # Its write may have gone through: held, as far as the handshake is concerned,
            # until it has lapsed for sure.
            self.stats.incr("db_errors")
            log.warning("drain lease of %s not confirmed: %s", queue, first_line(exc))
            lease.until = time.monotonic() + LEASE_S + IN_DOUBT_MARGIN_S
            return
        lease.until = time.monotonic() + LEASE_S  # the server's lease ends before this
        if lease.span is not None and lease.span[0] > taken_at:
            lease.span[0] = taken_at  # the server's clock, as enqueued_at

    async def short_claim(self, queue: str, found: int) -> float | None:
        """The claim loop of ``queue`` got fewer messages than it asked for (``found``). While
        steps arrive faster than one claim each, it stays busy: it holds its lease and claims
        again after ``BUSY_INTERVAL_S`` without being told (returned: claim again then), so that
        producers need not notify. Busy begins with a claim that found several steps (one each
        is what notifications give at a low rate: no lease churn there) and lasts until no claim
        has found one for ``BUSY_LINGER_S``. Otherwise the drain ends (``ended``; None)."""
        lease = self.leases[queue]
        now = time.monotonic()
        if found:
            lease.found_at = now
        busy = found >= BUSY_ENTER or (lease.until is not None and now - lease.found_at < BUSY_LINGER_S)
        if busy and self.listens():
            await self.draining(queue)
            if lease.until is not None:
                return BUSY_INTERVAL_S
        self.ended(queue)
        return None

    def ended(self, queue: str) -> None:
        """The claim loop of ``queue`` stopped draining (a claim came back short, or a pause):
        its lease goes, then the sends that skipped are waited for and claimed (``_closer``)."""
        lease = self.leases[queue]
        if lease.until is None:
            return
        lease.closing_at = max(lease.closing_at, lease.until)
        if lease.span is not None:
            lease.closing_spans.append(lease.span)
        lease.until = None
        lease.span = None
        lease.close_requested.set()

    def may_be_unannounced(self, queue: str, enqueued_at: datetime) -> bool:
        """Whether a message of ``queue`` enqueued at ``enqueued_at`` (the server's clock) may
        have been left unannounced on purpose: this worker drained its namespace then, or its
        notifications were off."""
        lease = self.leases.get(queue)
        if lease is None:
            return False
        # The margin is taken off enqueued_at, not added to end: an open span ends at OPEN
        # (datetime.max), and OPEN + SPAN_AFTER is out of range.
        return any(start - SPAN_BEFORE <= enqueued_at and enqueued_at - SPAN_AFTER <= end for start, end in lease.spans)

    def refresh(self) -> None:
        """Read the namespaces' switches again soon (a namespace was announced: a switch may
        have changed)."""
        self._refresh.set()

    # --- background ------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the rows, close ended drains and poll quiet namespaces, until cancelled."""
        async with anyio.create_task_group() as tg:
            for queue in self.leases:
                tg.start_soon(self._closer, queue)
            tg.start_soon(self._quiet_poller)
            await self._keeper()

    async def leave(self) -> None:
        """Stop listening (the worker stops claiming): its rows go, so producers no longer
        count on its drains. What it promised is kept by the others, or by the next start."""
        if not self.listening:
            return
        try:
            with anyio.fail_after(self.settings.timeout_s):
                await self.client.stop_listening(self.settings.worker_id)
            self.listening = False
        except FAILURES as exc:
            log.warning("listener rows not removed (they lapse by themselves): %s", first_line(exc))

    async def _keeper(self) -> None:
        """Keep this worker's rows alive while it listens (and read the switches), remove them
        when it stops listening."""
        renew_at = 0.0
        while True:
            now = time.monotonic()
            wanted = self.listens()
            if wanted and (not self.listening or now >= renew_at or self._refresh.is_set()):
                self._refresh = anyio.Event()
                try:
                    with anyio.fail_after(self.settings.timeout_s):
                        quiet, read_at = await self.client.keep_listening(
                            self.settings.worker_id,
                            [lease.namespace for lease in self.leases.values()],
                            self.settings.alive_s,
                        )
                except FAILURES as exc:
                    self.stats.incr("db_errors")
                    log.warning("listener rows not renewed: %s", first_line(exc))
                    renew_at = now + min(self.settings.renew_s, 5.0)
                else:
                    self.listening = True
                    renew_at = now + self.settings.renew_s
                    self._set_quiet({queue_name(ns): since for ns, since in quiet.items()}, read_at)
            elif not wanted and self.listening:
                await self.leave()
            with anyio.move_on_after(max(0.0, min(LISTEN_CHECK_S, renew_at - time.monotonic()))):
                await self._refresh.wait()

    def _set_quiet(self, quiet: dict[str, datetime | None], read_at: datetime) -> None:
        """The queues whose sends are not announced now (with when that was set), as read at
        ``read_at`` on the server's clock."""
        now_quiet = set(quiet) & set(self.leases)
        for queue in now_quiet - self.quiet:
            log.info("sends of %s are not announced (notify = false): polled every %gs", queue, self.settings.poll_s)
            lease = self.leases[queue]
            lease.quiet_span = [quiet[queue] or read_at, OPEN]
            lease.spans.append(lease.quiet_span)
            self.wake(queue, Source.POLL)  # what was sent since the switch went unannounced
        for queue in self.quiet - now_quiet:
            log.info("sends of %s are announced again", queue)
            lease = self.leases[queue]
            if lease.quiet_span is not None:
                lease.quiet_span[1] = read_at
                lease.quiet_span = None
        self.quiet = now_quiet

    async def _quiet_poller(self) -> None:
        """Poll the quiet namespaces when no poller runs (EventDrivenOnly): nothing else would
        find their steps."""
        while True:
            await anyio.sleep(self.settings.poll_s)
            if self.quiet and not self.polled():
                for queue in self.quiet:
                    self.wake(queue, Source.POLL)

    async def _closer(self, queue: str) -> None:
        """Close the ended drains of ``queue``, one handshake at a time."""
        lease = self.leases[queue]
        while True:
            await lease.close_requested.wait()
            lease.close_requested = anyio.Event()
            lapse_at, spans = lease.closing_at, lease.closing_spans
            lease.closing_at, lease.closing_spans = 0.0, []
            released_at = await self._close(queue, lease.namespace, lapse_at)
            for span in spans:
                span[1] = released_at

    async def _close(self, queue: str, namespace: str, lapse_at: float) -> datetime:
        """Release the lease, wait for the sends that skipped their notification while it held,
        and wake the queue (after every slice of the wait, and once none is left). Returns when
        the lease ended, on the server's clock (estimated when its release failed)."""
        try:
            with anyio.fail_after(self.settings.timeout_s):
                released_at = await self.client.end_drain(namespace, self.settings.worker_id)
            lapse_at = time.monotonic()  # released: every send from now on is announced
        except FAILURES as exc:
            # The lease stays until it lapses; the handshake waits for that (producers that
            # read it valid hold their lock from before, those that read it lapsed notify).
            self.stats.incr("db_errors")
            log.warning("drain lease of %s not released (waiting for it to lapse): %s", queue, first_line(exc))
            lapse_at += IN_DOUBT_MARGIN_S
            released_at = datetime.now(UTC) + timedelta(seconds=max(0.0, lapse_at - time.monotonic()))
        if lapse_at > time.monotonic():
            await anyio.sleep(lapse_at - time.monotonic())
        backoff = Backoff(timedelta(milliseconds=100), timedelta(seconds=5), first_at_once=True)
        while True:
            try:
                with anyio.fail_after(self.settings.timeout_s + AWAIT_SLICE_MS / 1000):
                    done = await self.client.await_skipped_sends(namespace, AWAIT_SLICE_MS)
            except FAILURES as exc:
                self.stats.incr("db_errors")
                log.warning("waiting for the skipped sends of %s failed: %s", queue, first_line(exc))
                await anyio.sleep(backoff.failed())
                continue
            backoff.succeeded()
            self.wake(queue, Source.POLL)  # claim what has committed: all of them once done
            if done:
                return released_at
            self.stats.incr("skipped_sends_awaited")


__all__ = ["BUSY_INTERVAL_S", "LEASE_S", "DrainSettings", "Drains"]
