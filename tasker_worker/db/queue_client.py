"""Thin async calls on pgmq and the tasker SQL functions.

Each method is one round trip. Methods take an optional ``conn`` so that a caller can run them
inside its own transaction (a handler's rows, its outcome and the ack commit together).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from tasker_worker.db import queries
from tasker_worker.domain.flow import ClaimBatch, FlowHold, HoldReason
from tasker_worker.domain.names import namespace_of, queue_name, validate_handler_name, validate_namespace
from tasker_worker.domain.replica import ReplicaState
from tasker_worker.domain.steps import ClaimedMessage, Outcome, Source
from tasker_worker.domain.verdicts import jsonb_safe
from tasker_worker.errors import (
    ConfigError,
    DatabaseError,
    InvalidName,
    QueueNotFound,
    TaskerError,
    UsageError,
    first_line,
)

AsyncConn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True)
class QueueMetrics:
    """pgmq.metrics of one queue."""

    queue_name: str
    queue_length: int
    visible_length: int
    newest_msg_age_sec: int | None
    oldest_msg_age_sec: int | None
    total_messages: int


@dataclass(frozen=True)
class RetryRequest:
    """Put one claimed message back after ``delay_ms`` (fenced on its read_ct)."""

    msg: ClaimedMessage
    delay_ms: int
    #: Merged into the message's headers (``{"tasker_last_error": ...}``).
    headers: dict[str, Any] | None
    count_attempt: bool = True
    #: The step event this put-back is (StepFailed, StepAssignmentRejected, ...TimedOut);
    #: appended in the same transaction when the put-back applies.
    event: str | None = None
    event_data: dict[str, Any] | None = None


def pooler_error(exc: psycopg.Error) -> ConfigError:
    """A prepared statement that the server lost or already had: the connection goes through a
    transaction pooler that does not keep prepared statements, so say which setting fixes it."""
    return ConfigError(
        f"{first_line(exc)}: the database URL seems to go through a transaction pooler (PgBouncer "
        'pool_mode = transaction before 1.21); set [database] pooler = "transaction" '
        "(TASKER__DATABASE__POOLER=transaction) and run PollingOnly, or connect directly",
        key="database.pooler",
    )


def translate_error(exc: psycopg.Error) -> TaskerError:
    """Map a server error raised by our SQL helpers to the matching ``TaskerError``."""
    diag = exc.diag
    message = diag.message_primary or str(exc).strip().splitlines()[0]
    if diag.message_hint:
        message += f" ({diag.message_hint})"
    if exc.sqlstate in ("22023", "P0001") and "name" in message:
        return InvalidName(message)
    if exc.sqlstate == "22023":
        return UsageError(message)
    if exc.sqlstate == "42P01":
        return QueueNotFound(message)
    return DatabaseError(message)


_ENCODER = msgspec.json.Encoder()
#: The largest put-back delay (milliseconds) the retry statement's integer takes.
_INT4_MAX = 2**31 - 1


def _outcome_row(o: Outcome) -> dict[str, Any]:
    msg = o.msg
    row: dict[str, Any] = {"msg_id": msg.msg_id, "read_ct": msg.read_ct, "source": msg.source.value}
    if o.status is not None:
        row["status"] = o.status.value
        if o.result is not None:
            row["result"] = o.result
        if o.error is not None:
            row["error"] = o.error
        row["started_at"] = o.started_at
        row["finished_at"] = o.finished_at
    step = msg.step
    if step is not None:
        # The parsed ids spare the server from extracting and validating them from the message.
        row["step_uuid"] = step.step_uuid
        row["task_uuid"] = step.task_uuid
        row["correlation_id"] = step.correlation_id
        row["handler"] = step.handler
    return row


def _storable(value: Any) -> Any:
    """``value`` if it encodes as JSON, else its repr (a handler's result never breaks a batch)."""
    try:
        _ENCODER.encode(value)
        return value
    except (TypeError, ValueError, OverflowError):
        return {"repr": repr(value)[:2000]}


def encode_outcomes(outcomes: Sequence[Outcome]) -> str:
    """The JSON array the settle statement takes, in one compiled call (msgspec: a tenth of the
    cost of ``json.dumps``). Results msgspec cannot encode are stored as their repr, found by a
    second, per-item pass only when needed; a float that is not finite is stored as null."""
    rows = [_outcome_row(o) for o in outcomes]
    try:
        encoded = _ENCODER.encode(rows)
    except (TypeError, ValueError, OverflowError):
        for row in rows:
            if "result" in row:
                row["result"] = _storable(row["result"])
        encoded = _ENCODER.encode(rows)
    if b"\\u0000" in encoded:  # rare: a result with a NUL character, which jsonb refuses
        for row in rows:
            if "result" in row:
                row["result"] = jsonb_safe(row["result"])
        encoded = _ENCODER.encode(rows)
    return encoded.decode()


def _timestamp(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


class QueueClient:
    """pgmq and tasker operations over a pool (or a caller's connection).

    ``archive`` decides per namespace whether a settled message is kept in pgmq's archive;
    ``store_events`` writes every step event as a row (``[events] step_events = "stored"``);
    ``prepare`` (off behind a transaction pooler) sends statements as server-side prepared ones.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        archive: Callable[[str], bool] | None = None,
        store_events: bool = False,
        prepare: bool = True,
    ) -> None:
        self.pool = pool
        self.archive = archive or (lambda namespace: False)
        self.store_events = store_events
        #: The claim's header stamp per claimant, encoded once.
        self._stamps: dict[str | None, str] = {}
        self.prepare = prepare
        self._statements: dict[str, queries.QueueStatements] = {}
        #: The queues whose namespace is under flow control (claimed through tasker.claim_flow),
        #: as the last claim of each said.
        self.flow_queues: set[str] = set()
        self._visible: dict[tuple[str, ...], str] = {}

    def statements(self, queue: str) -> queries.QueueStatements:
        """The step-path statements of ``queue`` (built on first use)."""
        found = self._statements.get(queue)
        if found is None:
            namespace = namespace_of(queue) or queue
            found = queries.QueueStatements.build(
                queue, namespace, archive=self.archive(namespace), store_events=self.store_events
            )
            self._statements[queue] = found
        return found

    @asynccontextmanager
    async def _conn(self, conn: AsyncConn | None) -> AsyncIterator[AsyncConn]:
        if conn is not None:
            yield conn
            return
        async with self.pool.connection() as pooled:
            yield pooled

    async def _fetch(
        self, query: str, params: Sequence[Any] | Mapping[str, Any], conn: AsyncConn | None = None
    ) -> list[tuple[Any, ...]]:
        try:
            if conn is None:  # no context manager of our own around the pool's: a hot path
                async with self.pool.connection() as pooled:
                    cur = await pooled.execute(query, params, prepare=self.prepare)
                    return await cur.fetchall()
            cur = await conn.execute(query, params, prepare=self.prepare)
            return await cur.fetchall()
        except psycopg.errors.RaiseException as exc:
            raise translate_error(exc) from exc
        except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedTable) as exc:
            raise translate_error(exc) from exc
        except (psycopg.errors.DuplicatePreparedStatement, psycopg.errors.InvalidSqlStatementName) as exc:
            raise pooler_error(exc) from exc

    # --- queues ------------------------------------------------------------------------------

    async def create_namespace_queue(self, namespace: str) -> str:
        """Create ``worker_<namespace>_queue`` and its DLQ (idempotent); return the name."""
        queue_name(namespace)  # validate here too: a clear error before any round trip
        rows = await self._fetch(queries.CREATE_NAMESPACE_QUEUE, (namespace,))
        return str(rows[0][0])

    async def create_namespace_queues(self, namespaces: Sequence[str]) -> list[str]:
        """``create_namespace_queue`` for each of ``namespaces``, in one statement: a worker's
        start costs one transaction for its queues, not one per namespace."""
        for namespace in namespaces:
            queue_name(namespace)  # each name checked before any round trip, as one at a time
        rows = await self._fetch(queries.CREATE_NAMESPACE_QUEUES, (list(namespaces),))
        return [str(r[0]) for r in rows]

    async def queue_exists(self, queue: str) -> bool:
        """Whether a pgmq queue of that name exists."""
        rows = await self._fetch(queries.QUEUE_EXISTS, (queue,))
        return bool(rows[0][0])

    async def list_queues(self) -> list[tuple[str, bool, bool, datetime]]:
        """``(queue_name, is_partitioned, is_unlogged, created_at)`` of every queue."""
        return [(str(r[0]), bool(r[1]), bool(r[2]), r[3]) for r in await self._fetch(queries.LIST_QUEUES, ())]

    async def metrics(self, queue: str | None = None) -> list[QueueMetrics]:
        """pgmq metrics of one queue, or of all."""
        if queue is not None and not await self.queue_exists(queue):
            raise QueueNotFound(f"queue {queue} does not exist")
        rows = await self._fetch(
            queries.QUEUE_METRICS if queue else queries.ALL_QUEUE_METRICS, (queue,) if queue else ()
        )
        return [QueueMetrics(str(r[0]), int(r[1]), int(r[2]), r[3], r[4], int(r[5])) for r in rows]

    async def purge(self, queue: str) -> int:
        """Delete every message of a queue; return how many."""
        if not await self.queue_exists(queue):
            raise QueueNotFound(f"queue {queue} does not exist")
        rows = await self._fetch(queries.PURGE_QUEUE, (queue,))
        return int(rows[0][0])

    async def ensure_notify_triggers(self) -> int:
        """Attach the notify trigger to every queue lacking it; return how many."""
        rows = await self._fetch(queries.ENSURE_NOTIFY_TRIGGERS, ())
        return int(rows[0][0])

    # --- producing ---------------------------------------------------------------------------

    async def send_step(
        self,
        namespace: str,
        handler: str,
        inputs: dict[str, Any] | None = None,
        *,
        delay: int = 0,
        attempt_limit: int | None = None,
        timeout: float | None = None,
        headers: dict[str, Any] | None = None,
        conn: AsyncConn | None = None,
    ) -> int:
        """Enqueue one step through ``tasker.send_step``; return its msg_id. ``headers`` become
        the message's (a W3C ``traceparent``: see ``tracecontext.trace_headers``)."""
        queue_name(namespace)
        validate_handler_name(handler)
        rows = await self._fetch(
            queries.SEND_STEP,
            (
                namespace,
                handler,
                Jsonb(inputs or {}),
                delay,
                attempt_limit,
                timeout,
                Jsonb(headers) if headers else None,
            ),
            conn,
        )
        return int(rows[0][0])

    async def send_batch(
        self, queue: str, messages: Sequence[Any], *, delay: int = 0, conn: AsyncConn | None = None
    ) -> list[int]:
        """``pgmq.send_batch``: one statement, one notification."""
        rows = await self._fetch(queries.SEND_BATCH, (queue, [Jsonb(m) for m in messages], delay), conn)
        return [int(r[0]) for r in rows]

    # --- the step path -----------------------------------------------------------------------

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
        """Claim up to ``qty`` ready messages (SKIP LOCKED, as pgmq.read), each with its dedup
        flag. Messages for ``skip_handlers`` (open circuits) and those with an id in
        ``skip_msgs`` are left in the queue untouched. ``worker_id`` is the claimant that stored
        StepAssigned events name. ``announce``: say what was claimed on ``tasker_claimed.<ns>``
        (a worker with peers, see ``domain.herd``).

        A namespace without flow control is claimed oldest first by the queue's own statement,
        which refuses (and says so) once the namespace has any; one with flow control through
        ``tasker.claim_flow``, which applies its pause, limits and order and answers (``hold``)
        what held steps back. Each answer also says when to switch, so a change made by an
        operator or another worker takes effect at this worker's next claim."""
        stamp = self._stamps.get(worker_id)
        if stamp is None:
            stamp = self._stamps[worker_id] = json.dumps({queries.CLAIM_HEADER: {"worker_id": worker_id}})
        hold: FlowHold | None = None
        sent = time.monotonic()  # the vt is counted from here: ClaimedMessage.vt_deadline
        for _switch in range(2):  # at most one switch between the two claims per call
            if queue in self.flow_queues:
                rows = await self._fetch(
                    queries.CLAIM_FLOW,
                    {
                        "queue": queue,
                        "qty": qty,
                        "vt": vt_seconds,
                        "stamp": stamp,
                        "worker_id": worker_id,
                        "skip_msgs": list(skip_msgs),
                        "skip_handlers": list(skip_handlers),
                        "announce": announce,
                        "stored": self.store_events,
                    },
                )
            else:
                rows = await self._fetch(
                    self._claim_text(queue, announce, bool(skip_handlers or skip_msgs)),
                    {
                        "qty": qty,
                        "vt": vt_seconds,
                        "worker_id": worker_id,
                        "stamp": stamp,
                        "skip_handlers": list(skip_handlers),
                        "skip_msgs": list(skip_msgs),
                    },
                )
            marker = rows[-1][8] if rows and rows[-1][0] is None else None
            if marker == "flow":
                self.flow_queues.add(queue)
                continue
            if marker == "none":
                self.flow_queues.discard(queue)
                continue
            if marker is not None:
                retry_after = rows.pop()[9]
                hold = FlowHold(HoldReason(marker), None if retry_after is None else float(retry_after))
            break
        else:
            rows = []
        return ClaimBatch(self._claimed(queue, rows, source, sent), hold)

    def _claim_text(self, queue: str, announce: bool, skipping: bool) -> str:
        statements = self.statements(queue)
        if skipping:
            return statements.claim_skipping_announcing if announce else statements.claim_skipping
        return statements.claim_announcing if announce else statements.claim

    @staticmethod
    def _claimed(queue: str, rows: list[tuple[Any, ...]], source: Source, sent: float) -> list[ClaimedMessage]:
        now = time.monotonic()
        out = []
        for r in rows:
            headers, lapsed = r[5], None
            if headers is not None and not isinstance(headers, dict):
                # pgmq takes any JSON as headers: what a raw producer wrote as `[1]` or `"x"`
                # carries none of ours, and the runtime reads headers as an object. The claim
                # stored them as this object (migration 0025): the same from the first run on.
                headers = {queries.RAW_HEADERS: headers}
            if headers is not None and queries.CLAIM_HEADER in headers:
                # The previous claim was neither settled nor put back: it lapsed.
                headers = dict(headers)
                holder = headers.pop(queries.CLAIM_HEADER)
                if not isinstance(holder, dict):
                    holder = {}
                at = r[7].isoformat() if r[7] is not None else None
                lapsed = {"worker_id": holder.get("worker_id"), "read_ct": r[1] - 1, "at": at}
                headers = headers or None
            out.append(
                ClaimedMessage(
                    queue,
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    headers,
                    r[6],
                    source,
                    now,
                    lapsed_claim=lapsed,
                    claim_sent_mono=sent,
                )
            )
        return out

    def flow_controlled(self, queue: str) -> bool:
        """Whether ``queue``'s namespace was under flow control at this worker's last claim."""
        return queue in self.flow_queues

    async def note_flow_fields(self, namespace: str, priority: bool, groups: bool) -> None:
        """Steps of ``namespace`` carry priorities or groups: from now on every worker claims it
        in priority order, round-robin across groups."""
        await self._fetch(queries.NOTE_FLOW_FIELDS, (namespace, priority, groups))

    # --- notifications at many producers (migration 0020, runtime/drains.py) ------------------

    async def keep_listening(
        self, worker_id: str, namespaces: Sequence[str], alive_s: float
    ) -> tuple[dict[str, datetime | None], datetime]:
        """Say that ``worker_id`` listens for ``namespaces`` for ``alive_s`` more seconds; return
        the namespaces whose sends are not announced (``notify = false``, with when it was set)
        and the server's time."""
        rows = await self._fetch(queries.KEEP_LISTENING, (worker_id, list(namespaces), alive_s))
        quiet = {str(r[0]): r[2] for r in rows if not r[1]}
        return quiet, rows[0][3] if rows else datetime.now(UTC)

    async def stop_listening(self, worker_id: str) -> None:
        """``worker_id`` listens no more (it leaves, or polls only now)."""
        await self._fetch(queries.STOP_LISTENING, (worker_id,))

    async def take_drain(self, namespace: str, worker_id: str, lease_s: float, alive_s: float) -> datetime:
        """``worker_id`` drains ``namespace`` for ``lease_s`` seconds: producers may skip notifying.
        Returns the server's time."""
        rows = await self._fetch(queries.TAKE_DRAIN, (namespace, worker_id, lease_s, alive_s))
        return rows[0][0]  # type: ignore[no-any-return]

    async def end_drain(self, namespace: str, worker_id: str) -> datetime:
        """``worker_id`` no longer drains ``namespace``: producers notify again. Returns the
        server's time."""
        rows = await self._fetch(queries.END_DRAIN, (namespace, worker_id))
        return rows[0][0]  # type: ignore[no-any-return]

    async def await_skipped_sends(self, namespace: str, timeout_ms: int) -> bool:
        """Wait (at most ``timeout_ms``) until no send of ``namespace`` that skipped its
        notification is in flight; True when none is."""
        rows = await self._fetch(queries.AWAIT_SKIPPED_SENDS, (namespace, timeout_ms))
        return bool(rows[0][0])

    async def set_queue_notify(self, namespace: str, notify: bool, by: str | None) -> bool:
        """Turn the notifications of ``namespace``'s sends on or off; whether that changed them."""
        validate_namespace(namespace)
        rows = await self._fetch(queries.SET_QUEUE_NOTIFY, (namespace, notify, by))
        return bool(rows[0][0])

    async def quiet_namespaces(self) -> list[tuple[str, datetime, str | None]]:
        """``(namespace, changed_at, changed_by)`` of every namespace whose sends are not announced."""
        return [(str(r[0]), r[1], r[2]) for r in await self._fetch(queries.QUIET_NAMESPACES, ())]

    async def record_lapsed_claims(self, queue: str, worker_id: str | None, msgs: Sequence[ClaimedMessage]) -> None:
        """One ``StepAssignmentTimedOut`` event (reason ``vt_lapsed``) per message whose previous
        claim lapsed, naming that claim's worker; with derived step events the event also carries
        the lapsed claim's time, so that the event log shows that attempt's StepAssigned."""
        rows = []
        for m in msgs:
            prior = m.lapsed_claim or {}
            data: dict[str, Any] = {
                "reason": "vt_lapsed",
                "attempt": prior.get("read_ct"),
                "previous_worker_id": prior.get("worker_id"),
                "reclaimed_by": worker_id,
            }
            if not self.store_events and prior.get("at"):
                data["claimed_at"] = prior["at"]
            rows.append((prior.get("worker_id"), m.step_uuid, queue, m.msg_id, Jsonb(data)))
        async with self.pool.connection() as conn, conn.cursor() as cur:
            await cur.executemany(queries.RECORD_LAPSED_CLAIM, rows)

    async def visible_queues(self, queues: Sequence[str]) -> set[str]:
        """Which of ``queues`` have a message visible now (one statement for all of them)."""
        key = tuple(queues)
        text = self._visible.get(key)
        if text is None:
            text = self._visible[key] = queries.visible_queues_statement(list(queues))
        return {r[0] for r in await self._fetch(text, ())}

    async def write_progress(self, rows: Sequence[Mapping[str, Any]], worker_id: str) -> None:
        """Store what running steps reported (``ctx.progress``): one row per step, the newest
        value winning."""
        if rows:
            # jsonb_safe: one step's NaN (json.dumps writes it; jsonb refuses it) or NUL would
            # otherwise lose every step's report of this round, and again at each round.
            await self._fetch(queries.WRITE_PROGRESS, (json.dumps(jsonb_safe(list(rows)), default=str), worker_id))

    async def pending_cancellations(self, step_uuids: Sequence[str]) -> dict[str, str | None]:
        """The cancel requests (``{step_uuid: who asked}``) of these steps."""
        if not step_uuids:
            return {}
        rows = await self._fetch(queries.PENDING_CANCELLATIONS, (list(step_uuids),))
        return {str(r[0]): r[1] for r in rows}

    async def announce_ready(self, queue: str, msg_ids: Sequence[int], delay_s: float = 0.0) -> None:
        """Notify the workers listening on ``queue``'s namespace that ``msg_ids`` are ready again
        in ``delay_s`` seconds (steps given back, which no INSERT announces): one notification,
        ``message_ready`` or ``batch_ready`` as the trigger would send for them."""
        if msg_ids:
            await self._fetch(queries.ANNOUNCE_READY, {"queue": queue, "ids": sorted(msg_ids), "delay": delay_s})

    async def settle(
        self, queue: str, worker_id: str, outcomes: Sequence[Outcome], conn: AsyncConn | None = None
    ) -> set[int]:
        """Settle finished claims (fenced DELETE, plus the archive where configured) and record
        their outcomes, in one statement; return the msg_ids settled (the rest were stale)."""
        rows = await self._fetch(
            self.statements(queue).settle, {"outcomes": encode_outcomes(outcomes), "worker_id": worker_id}, conn
        )
        return {r[0] for r in rows}

    async def settle_in_transaction(self, outcome: Outcome, worker_id: str, conn: AsyncConn) -> tuple[bool, bool]:
        """Settle one claim inside the caller's transaction (a handler's own): whether the
        message was settled (False: a stale ack) and whether its outcome row was written
        (False with a status: another run of the step recorded first)."""
        rows = await self._fetch(
            self.statements(outcome.msg.queue).settle_reporting,
            {"outcomes": encode_outcomes([outcome]), "worker_id": worker_id},
            conn,
        )
        return (True, bool(rows[0][1])) if rows else (False, False)

    async def dead_letter(
        self, queue: str, worker_id: str, outcomes: Sequence[Outcome], conn: AsyncConn | None = None
    ) -> dict[int, bool]:
        """Move messages to ``<queue>_dlq`` with their error and record outcomes (fenced)."""
        waited = [o.msg for o in outcomes if o.msg.headers and o.msg.headers.get("tasker_notify")]
        rows = await self._fetch(
            queries.DEAD_LETTER_STEPS,
            (
                queue,
                worker_id,
                [o.msg.msg_id for o in outcomes],
                [o.msg.read_ct for o in outcomes],
                [o.status.value if o.status else None for o in outcomes],
                [Jsonb(o.error or {}) for o in outcomes],
                [_timestamp(o.started_at) for o in outcomes],
                [_timestamp(o.finished_at) for o in outcomes],
                [o.msg.source.value for o in outcomes],
                self.store_events,
                [m.msg_id for m in waited],
                [m.step_uuid for m in waited],
            ),
            conn,
        )
        return {int(r[0]): bool(r[1]) for r in rows}

    async def retry(
        self, queue: str, requests: Sequence[RetryRequest], *, worker_id: str | None = None
    ) -> dict[int, bool]:
        """Put messages back with a delay (fenced); ``{msg_id: applied}``.

        All requests of one call must agree on ``count_attempt``. With ``worker_id``, the
        requests' step events are appended for the applied ones in the same transaction.
        """
        if not requests:
            return {}
        params = (
            queue,
            [r.msg.msg_id for r in requests],
            [r.msg.read_ct for r in requests],
            # int4 milliseconds in the statement: one delay past ~24.8 days must not fail the batch.
            [min(max(0, int(r.delay_ms)), _INT4_MAX) for r in requests],
            [Jsonb(r.headers) if r.headers is not None else None for r in requests],
            requests[0].count_attempt,
        )
        with_events = worker_id is not None and any(r.event for r in requests)
        if not with_events:
            rows = await self._fetch(queries.RETRY_STEPS, params)
            return {int(r[0]): bool(r[1]) for r in rows}
        async with self._conn(None) as conn, conn.transaction():
            cur = await conn.execute(queries.RETRY_STEPS, params)
            applied = {int(r[0]): bool(r[1]) for r in await cur.fetchall()}
            logged = [r for r in requests if r.event and applied.get(r.msg.msg_id)]
            if logged:
                await conn.execute(
                    queries.LOG_STEP_EVENTS,
                    (
                        queue,
                        worker_id,
                        [r.event for r in logged],
                        [r.msg.msg_id for r in logged],
                        [r.msg.step_uuid for r in logged],
                        [Jsonb(self._event_data(r)) for r in logged],
                    ),
                )
        return applied

    def _event_data(self, request: RetryRequest) -> dict[str, Any]:
        data: dict[str, Any] = {"attempt": request.msg.read_ct, **(request.event_data or {})}
        if not self.store_events:
            # No StepAssigned row was stored at the claim: the view tasker.event_log derives it
            # from the put-back that ended this attempt.
            data["claimed_at"] = request.msg.claimed_at.isoformat()
        return data

    async def extend_vt(self, queue: str, msgs: Sequence[ClaimedMessage], vt_ms: int) -> dict[int, datetime]:
        """Push the vt of messages still held here (fenced); ``{msg_id: new vt}``."""
        rows = await self._fetch(
            queries.EXTEND_VT,
            (queue, [m.msg_id for m in msgs], [m.read_ct for m in msgs], int(vt_ms)),
        )
        return {int(r[0]): r[1] for r in rows}

    # --- dead-letter queues ------------------------------------------------------------------

    async def peek(self, queue: str, limit: int = 100) -> list[tuple[Any, ...]]:
        """``(msg_id, enqueued_at, read_ct, message, headers)`` without claiming."""
        return await self._fetch(queries.PEEK_MESSAGES, (queue, limit))

    async def requeue_dead_letters(
        self, queue: str, msg_ids: Sequence[int] | None = None, *, actor: str = "cli", limit: int | None = None
    ) -> list[tuple[int, int]]:
        """Send DLQ messages (the ones named, else all, oldest first, at most ``limit``) back to
        ``queue``, each recorded as a DeadLetterRequeued event by ``actor``;
        ``[(dlq_msg_id, new_msg_id)]``."""
        ids = list(msg_ids) if msg_ids else None
        rows = await self._fetch(queries.REQUEUE_DEAD_LETTERS, (queue, ids, actor, limit))
        return [(int(r[0]), int(r[1])) for r in rows]

    # --- dashboard reads -----------------------------------------------------------------------

    async def queue_glance(self, cap: int) -> list[tuple[str, int, int, bool, datetime | None]]:
        """``(queue, depth, visible, capped, oldest_enqueued_at)`` of every queue, each count
        stopping at ``cap`` (``capped``: there are more)."""
        rows = await self._fetch(queries.QUEUE_GLANCE, (cap,))
        return [(str(r[0]), int(r[1]), int(r[2]), bool(r[3]), r[4]) for r in rows]

    async def outcome_buckets(self, bucket_s: int, window_s: int) -> list[tuple[str, int, int, int]]:
        """``(namespace, bucket, outcomes, errors)`` over the last ``window_s`` seconds, a bucket
        being ``floor(epoch / bucket_s)`` of the outcome's finished_at."""
        rows = await self._fetch(queries.OUTCOME_BUCKETS, {"bucket": bucket_s, "window": window_s})
        return [(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    async def step_events(self, step_uuid: str, limit: int) -> list[tuple[Any, ...]]:
        """``(event_id, event_type, worker_id, queue_name, msg_id, data, occurred_at)`` of one
        step, oldest first."""
        return await self._fetch(queries.STEP_EVENTS, (step_uuid, limit))

    # --- worker registry -------------------------------------------------------------------

    async def capable_worker_exists(self, capability: str, fresh_within_s: float, other_than: str) -> bool:
        """Whether another live worker (recent sign of life) offers ``capability``."""
        rows = await self._fetch(queries.CAPABLE_WORKER_EXISTS, (fresh_within_s, capability, other_than))
        return bool(rows[0][0])

    # --- health ------------------------------------------------------------------------------

    async def database_horizon(self) -> tuple[float, int, float]:
        """``(oldest transaction age in s, max age(backend_xmin) in xids, notify queue usage)``."""
        rows = await self._fetch(queries.DATABASE_HORIZON, ())
        age_s, xmin_age, usage = rows[0]
        return float(age_s or 0.0), int(xmin_age or 0), float(usage or 0.0)

    async def replica_state(self) -> ReplicaState:
        """How stale this pool's reads are (``[database] read_url``: a standby, or a primary)."""
        standby, streaming, caught_up, paused, age_s = (await self._fetch(queries.REPLICA_STATE, ()))[0]
        return ReplicaState(
            standby=bool(standby),
            streaming=None if streaming is None else bool(streaming),
            caught_up=bool(caught_up),
            paused=bool(paused),
            replay_age_s=None if age_s is None else float(age_s),
        )

    async def queue_table_tuples(self) -> dict[str, tuple[int, int]]:
        """``{queue_name: (live, dead)}`` rows of every pgmq queue table (statistics collector)."""
        rows = await self._fetch(queries.QUEUE_DEAD_TUPLES, ())
        return {str(r[0])[2:]: (int(r[1]), int(r[2])) for r in rows}

    async def schema_installed(self) -> bool:
        """Whether the migrations that the registry needs are applied."""
        rows = await self._fetch(queries.SCHEMA_INSTALLED, ())
        return bool(rows[0][0])
