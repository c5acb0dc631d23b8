"""OutcomeWriter: batches outcome writes, acks, retries and dead-letters.

A finished step hands its outcome to the writer and is done: the writer settles the message
(fenced DELETE and outcome row, ``QueueClient.settle``) and then calls back the processor, which
ends the step's bookkeeping there, so a step that succeeds costs one task and no wake-up after its
handler. Rarer writes (retries, releases, dead letters) are awaited by their step. The processor
frees a step's slot when its handler returns (``CommandProcessor._hand_off``) but lets at most
``max_concurrent_processors`` outcomes wait here, so unwritten outcomes never pile up beyond
that. The writer flushes whatever has accumulated as soon as it is idle: one statement per
(kind, queue) however many steps finished meanwhile, and no added delay when the worker is quiet.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import anyio
import psycopg

from tasker_worker.db.queue_client import QueueClient, RetryRequest
from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.domain.steps import Outcome
from tasker_worker.logs import error_fields
from tasker_worker.runtime.stats import WorkerStats

log = logging.getLogger(__name__)

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
        """Flush until cancelled (then flush what is left)."""
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                self._closed = True
                await self.flush()

    async def flush(self) -> None:
        """Write everything pending now."""
        while self._pending:
            batch, self._pending = self._pending, []
            groups: dict[tuple[WriteKind, str], list[_Pending]] = defaultdict(list)
            for item in batch:
                groups[(item.kind, item.queue)].append(item)
            for (kind, queue), items in groups.items():
                await self._write_group(kind, queue, items)

    async def _write_group(self, kind: WriteKind, queue: str, items: list[_Pending]) -> None:
        deadline = anyio.current_time() + WRITE_RETRY_BUDGET.total_seconds()
        attempt = 0
        while True:
            attempt += 1
            try:
                results = await self._write(kind, queue, items)
                break
            except (psycopg.OperationalError, psycopg.errors.AdminShutdown, psycopg.InterfaceError) as exc:
                self.stats.incr("db_errors")
                if anyio.current_time() >= deadline:
                    log.error(
                        "giving up writing %d %s results to %s; they return after their vt",
                        len(items),
                        kind.value,
                        queue,
                        extra={"queue": queue, **error_fields(exc)},
                    )
                    results = {}
                    break
                # Once at once (a pooled connection that died idle is the usual cause), then back off.
                delay = (
                    0.0
                    if attempt == 1
                    else backoff_delay(attempt - 1, timedelta(milliseconds=50), timedelta(seconds=2))
                )
                log.warning(
                    "database unavailable while writing results; retrying in %.2fs",
                    delay,
                    extra={"queue": queue, **error_fields(exc)},
                )
                await anyio.sleep(delay)
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
