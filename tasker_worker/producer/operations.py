"""What the producer's clients do, written once for ``AsyncClient`` and ``Client`` alike.

Each public operation is a *plan*: a generator that yields the I/O it needs (``Rows``: run one
statement; ``Hold``: keep one pooled connection for the rest of the plan, optionally LISTENing;
``Notification``: wait for the next notification on it) and gets each answer sent back. The
clients only *drive* plans, ``AsyncClient`` with ``await`` and ``Client`` by blocking, so their
methods cannot drift apart: both are made from these functions (``client.py``), and
``tests/test_client.py`` lists both public surfaces.

A plan that needs the result of another plan delegates to it with ``yield from``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypedDict, TypeVar

import msgspec
import numpy as np
import psycopg
from psycopg import sql as pgsql
from psycopg.types.json import Jsonb

from tasker_worker.config.durations import parse_duration
from tasker_worker.db import queries
from tasker_worker.domain.names import queue_name, validate_namespace
from tasker_worker.domain.notifications import OUTCOME_CHANNEL, decode_outcomes
from tasker_worker.domain.results import CancelState, StepProgress, StepRef, StepResult
from tasker_worker.domain.steps import OutcomeStatus, build_message
from tasker_worker.errors import QueueNotFound, StepValidationError, StepWaitTimeout, UsageError
from tasker_worker.tracecontext import trace_headers

#: ``send_steps`` takes at most this many steps per call (one statement each).
MAX_BATCH = 10_000
#: How often ``wait_for`` looks without a notification, by default.
DEFAULT_POLL_INTERVAL_S = 5.0
#: How often ``wait_for(on_progress=...)`` looks at the step's progress.
PROGRESS_POLL_S = 1.0

_LISTEN_OUTCOMES = pgsql.SQL("LISTEN {}").format(pgsql.Identifier(OUTCOME_CHANNEL))
_STEP_RESULT = queries.STEP_RESULT.format(columns=StepResult.COLUMNS)
_LIST_RESULTS = queries.LIST_STEP_RESULTS.format(columns=StepResult.COLUMNS)
_ENCODE = msgspec.json.Encoder()

#: A caller's own connection (``conn=``): ``AsyncClient`` takes a ``psycopg.AsyncConnection``,
#: ``Client`` a ``psycopg.Connection``; the other kind is refused with a ``UsageError``.
AnyConn = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]


# --- the requests a plan yields ------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """Run ``query`` and answer its rows (``[]`` for a statement without any): on ``conn`` (the
    caller's, or one held by the plan), else on a pooled connection of the cluster that holds
    ``namespace``, or of the cluster named ``database`` (neither: the primary; with one cluster
    there is only the one pool). Server errors arrive in the plan as ``TaskerError``
    (``translate_error``)."""

    query: Any
    params: Any = None
    conn: Any = None
    namespace: str | None = None
    database: str | None = None


@dataclass(frozen=True)
class Hold:
    """Keep one pooled connection (of the cluster of ``namespace``, or of ``database``, as for
    ``Rows``) until the plan ends and answer it; with ``listen``, the connection LISTENs on that
    channel first (UNLISTENed before it goes back to the pool)."""

    listen: Any = None
    namespace: str | None = None
    database: str | None = None


@dataclass(frozen=True)
class Databases:
    """Answer the names of the clusters the client reaches, the primary first (one name when
    every namespace lives on the primary): a plan that knows no namespace looks on each."""


@dataclass(frozen=True)
class Notification:
    """Wait up to ``timeout`` seconds for the next notification on ``conn`` (a held, listening
    connection); answer its payload, or None when none came."""

    conn: Any
    timeout: float


@dataclass(frozen=True)
class Call:
    """Call ``func(arg)`` (awaited when it returns an awaitable, by the async client): a
    caller's callback, such as ``wait_for``'s ``on_progress``."""

    func: Any
    arg: Any


Request = Rows | Hold | Notification | Call | Databases
R = TypeVar("R")
#: A plan that ends with a value of type ``R``.
Plan = Generator[Request, Any, R]


# --- helpers -------------------------------------------------------------------------------


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise UsageError(f"not a UUID: {value!r}") from None


class _Flow(TypedDict):
    """A step message's flow control fields (None: not set)."""

    priority: int | None
    group: str | None
    concurrency_key: str | None


#: No flow control field set.
_NO_FLOW: _Flow = {"priority": None, "group": None, "concurrency_key": None}


def _enqueue_params(
    namespace: str,
    handler: str,
    inputs: dict[str, Any] | None,
    *,
    step_uuid: uuid.UUID | str | None,
    task_uuid: uuid.UUID | str | None,
    correlation_id: uuid.UUID | str | None,
    delay: float | None,
    attempt_limit: int | None,
    timeout: float | None,
    headers: dict[str, Any] | None,
    notify: bool,
    flow: _Flow | None = None,
    unique: tuple[str | None, float | None, bool] = (None, None, False),
) -> dict[str, Any]:
    flow = flow or _NO_FLOW
    # Checked here too, so that a mistake is a UsageError before any round trip.
    build_message(
        namespace,
        handler,
        inputs,
        step_uuid=step_uuid,
        task_uuid=task_uuid,
        correlation_id=correlation_id,
        attempt_limit=attempt_limit,
        timeout=timeout,
        **flow,
    )
    traced = trace_headers(headers)
    return {
        "namespace": namespace,
        "handler": handler,
        "inputs": Jsonb(inputs or {}),
        "step_uuid": str(step_uuid) if step_uuid else None,
        "task_uuid": str(task_uuid) if task_uuid else None,
        "correlation_id": str(correlation_id) if correlation_id else None,
        "delay": _delay(delay),
        "attempt_limit": attempt_limit,
        "timeout": timeout,
        "headers": Jsonb(traced) if traced else None,
        "notify": notify,
        "priority": flow.get("priority"),
        "group": flow.get("group"),
        "concurrency_key": flow.get("concurrency_key"),
        "unique_key": unique[0],
        "unique_for": unique[1],
        "debounce": unique[2],
    }


def _batch_params(
    namespace: str,
    handler: str,
    inputs: Iterable[dict[str, Any]],
    *,
    delay: float | None,
    attempt_limit: int | None,
    timeout: float | None,
    headers: dict[str, Any] | None,
    notify: bool,
    flow: _Flow | None = None,
) -> tuple[dict[str, Any], list[uuid.UUID]]:
    flow = flow or _NO_FLOW
    items = list(inputs)
    if not 1 <= len(items) <= MAX_BATCH:
        raise UsageError(f"send_steps takes 1 to {MAX_BATCH} steps per call, got {len(items)}")
    # What is the same for every step is checked once, by the rules of tasker.step_message;
    # each step adds only its inputs (an object) and three fresh UUIDs.
    build_message(namespace, handler, None, attempt_limit=attempt_limit, timeout=timeout, **flow)
    common: dict[str, Any] = {"namespace": namespace, "handler": handler}
    if attempt_limit is not None:
        common["attempt_limit"] = attempt_limit
    if timeout is not None:
        common["timeout"] = timeout
    common.update({k: v for k, v in flow.items() if v is not None and (k != "priority" or v)})
    for k, step_inputs in enumerate(items):
        if not isinstance(step_inputs, dict):
            raise StepValidationError(f"inputs must be a JSON object (step {k})", reason="malformed_message")
    ids, ints = _uuid4_batch(3 * len(items))
    # The fixed part of every body, encoded once; only the ids and the inputs differ.
    fixed = _ENCODE.encode(common).decode()[1:-1]
    try:
        bodies = [
            f'{{"step_uuid":"{ids[3 * k]}","task_uuid":"{ids[3 * k + 1]}","correlation_id":"{ids[3 * k + 2]}",'
            f'{fixed},"inputs":{_ENCODE.encode(step_inputs).decode()}}}'
            for k, step_inputs in enumerate(items)
        ]
    except (TypeError, msgspec.EncodeError) as exc:
        raise StepValidationError(f"inputs are not JSON: {exc}", reason="malformed_message") from None
    batch_headers = trace_headers(headers)
    if notify:
        batch_headers["tasker_notify"] = True
    params = {
        "queue": queue_name(namespace),
        "bodies": bodies,
        "count": len(bodies),
        "headers": json.dumps(batch_headers) if batch_headers else None,
        "delay": _delay(delay),
    }
    return params, [uuid.UUID(int=n) for n in ints[0::3]]


def _unique(
    unique_key: str | None, unique_for: float | str | timedelta | None, debounce: bool
) -> tuple[str | None, float | None, bool]:
    """A unique window as the database takes it: (key, seconds, debounce)."""
    if unique_key is None:
        if unique_for is not None or debounce:
            raise UsageError("unique_for and debounce go with unique_key")
        return None, None, False
    if not 1 <= len(unique_key) <= 200:
        raise UsageError("unique_key must be 1 to 200 characters")
    if unique_for is None:
        raise UsageError("unique_key needs unique_for (how long the window lasts, e.g. '60s')")
    if isinstance(unique_for, timedelta):
        seconds = unique_for.total_seconds()
    elif isinstance(unique_for, str):
        seconds = parse_duration(unique_for).total_seconds()
    else:
        seconds = float(unique_for)
    if not 0 < seconds <= 366 * 86_400:
        raise UsageError("unique_for must be more than 0 seconds and at most a year")
    return unique_key, seconds, debounce


def _uuid4_batch(n: int) -> tuple[list[str], list[int]]:
    """``n`` random (version 4) UUIDs as strings and as integers, made in bulk: building them
    one ``uuid.uuid4()`` at a time cost a batch more than its INSERT."""
    raw = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    hexed = np.frombuffer(raw.tobytes().hex().encode(), dtype=np.uint8).reshape(n, 32)
    text = np.full((n, 36), ord("-"), dtype=np.uint8)
    for src, dst, width in ((0, 0, 8), (8, 9, 4), (12, 14, 4), (16, 19, 4), (20, 24, 12)):
        text[:, dst : dst + width] = hexed[:, src : src + width]
    joined = text.tobytes().decode()
    halves = raw.view(">u8").reshape(n, 2)
    ints = [(hi << 64) | lo for hi, lo in zip(halves[:, 0].tolist(), halves[:, 1].tolist(), strict=True)]
    return [joined[i : i + 36] for i in range(0, 36 * n, 36)], ints


def _delay(delay: float | None) -> int:
    seconds = int(delay or 0)
    if seconds < 0:
        raise UsageError("delay must be zero or more seconds")
    return seconds


def _outcome_names(payload: str) -> set[str]:
    return decode_outcomes(payload)


def _list_params(namespace: str | None, status: OutcomeStatus | str | None, limit: int) -> dict[str, Any]:
    if namespace is not None:
        validate_namespace(namespace)
    return {
        "namespace": namespace,
        "status": OutcomeStatus(status).value if status is not None else None,
        "limit": max(1, min(int(limit), 1000)),
    }


# --- the operations ------------------------------------------------------------------------


def send_step(
    namespace: str,
    handler: str,
    inputs: dict[str, Any] | None = None,
    *,
    step_uuid: uuid.UUID | str | None = None,
    task_uuid: uuid.UUID | str | None = None,
    correlation_id: uuid.UUID | str | None = None,
    delay: float | None = None,
    attempt_limit: int | None = None,
    timeout: float | None = None,
    headers: dict[str, Any] | None = None,
    notify: bool = True,
    priority: int | None = None,
    group: str | None = None,
    concurrency_key: str | None = None,
    unique_key: str | None = None,
    unique_for: float | str | timedelta | None = None,
    debounce: bool = False,
    conn: AnyConn | None = None,
) -> Plan[StepRef]:
    """Enqueue one step; with ``step_uuid``, idempotently (a step_uuid already sent or done is
    answered with that step, ``created=False``). ``headers`` are the message's (the current
    trace context is added); ``notify`` lets ``wait_for`` be woken; ``priority`` (0 first),
    ``group`` (round-robin) and ``concurrency_key`` (capped together) are the message's flow
    control fields; with ``unique_key`` and ``unique_for`` (``"60s"``) a second send of the key
    within the window is answered with the first step (``created=False``; with ``debounce``
    the queued step's inputs are replaced by these), across producers; ``conn`` sends inside
    the caller's own transaction."""
    params = _enqueue_params(
        namespace,
        handler,
        inputs,
        step_uuid=step_uuid,
        task_uuid=task_uuid,
        correlation_id=correlation_id,
        delay=delay,
        attempt_limit=attempt_limit,
        timeout=timeout,
        headers=headers,
        notify=notify,
        flow={"priority": priority, "group": group, "concurrency_key": concurrency_key},
        unique=_unique(unique_key, unique_for, debounce),
    )
    [row] = yield Rows(queries.ENQUEUE_STEP, params, conn, namespace=namespace)
    return StepRef(step_uuid=row[0], msg_id=int(row[1]), namespace=namespace, created=bool(row[2]))


def send_steps(
    namespace: str,
    handler: str,
    inputs: Iterable[dict[str, Any]],
    *,
    delay: float | None = None,
    attempt_limit: int | None = None,
    timeout: float | None = None,
    headers: dict[str, Any] | None = None,
    notify: bool = False,
    priority: int | None = None,
    group: str | None = None,
    concurrency_key: str | None = None,
    conn: AnyConn | None = None,
) -> Plan[list[StepRef]]:
    """Enqueue one step per ``inputs`` item in one statement (fresh step_uuids: a batch is not
    deduplicated; use ``send_step(step_uuid=...)`` for that); every step of the batch gets the
    same ``priority``, ``group`` and ``concurrency_key``."""
    params, uuids = _batch_params(
        namespace,
        handler,
        inputs,
        delay=delay,
        attempt_limit=attempt_limit,
        timeout=timeout,
        headers=headers,
        notify=notify,
        flow={"priority": priority, "group": group, "concurrency_key": concurrency_key},
    )
    rows = yield Rows(queries.SEND_STEPS, params, conn, namespace=namespace)
    return [StepRef(u, int(r[0]), namespace) for u, r in zip(uuids, rows, strict=True)]


def get_result(
    step_uuid: uuid.UUID | str, *, namespace: str | None = None, conn: AnyConn | None = None
) -> Plan[StepResult | None]:
    """The step's outcome, or None while it has none. With namespaces on several clusters, the
    outcome is on its namespace's: give ``namespace`` to look there only (else each is asked)."""
    wanted = _uuid(step_uuid)
    if conn is not None or namespace is not None:
        rows = yield Rows(_STEP_RESULT, (wanted,), conn, namespace=namespace)
        return StepResult.from_row(rows[0]) if rows else None
    for database in (yield Databases()):
        rows = yield Rows(_STEP_RESULT, (wanted,), database=database)
        if rows:
            return StepResult.from_row(rows[0])
    return None


def list_results(
    *, namespace: str | None = None, status: OutcomeStatus | str | None = None, limit: int = 100
) -> Plan[list[StepResult]]:
    """Outcomes, newest first (at most 1000), of every cluster's namespaces (or of ``namespace``)."""
    params = _list_params(namespace, status, limit)
    if namespace is not None:
        rows = yield Rows(_LIST_RESULTS, params, namespace=namespace)
        return [StepResult.from_row(r) for r in rows]
    databases = yield Databases()
    found: list[StepResult] = []
    for database in databases:
        found += [StepResult.from_row(r) for r in (yield Rows(_LIST_RESULTS, params, database=database))]
    if len(databases) > 1:  # the newest of all of them
        found = sorted(found, key=lambda r: r.finished_at, reverse=True)[: params["limit"]]
    return found


def _cluster_of_step(wanted: uuid.UUID) -> Plan[str | None]:
    """The cluster that knows the step (its outcome, or the key of its idempotent send); with
    one cluster, that one without asking."""
    databases = yield Databases()
    if len(databases) == 1:
        return str(databases[0])
    for database in databases:
        if (yield Rows(_STEP_RESULT, (wanted,), database=database)) or (
            yield Rows(queries.STEP_KEY, (wanted,), database=database)
        ):
            return str(database)
    return None


def wait_for(
    step_uuid: uuid.UUID | str,
    timeout: float,
    *,
    namespace: str | None = None,
    poll_interval: float = DEFAULT_POLL_INTERVAL_S,
    on_progress: Any = None,
) -> Plan[StepResult]:
    """The step's outcome once it is recorded; ``StepWaitTimeout`` after ``timeout`` seconds.

    Woken by the outcome's notification (``tasker_outcome``, for steps sent with
    ``notify=True``); it also looks every ``poll_interval`` seconds, so a step sent by someone
    else, or a lost notification, costs a wait of at most that. A waiter holds one connection.
    ``on_progress(StepProgress)`` (sync, or async with ``AsyncClient``) is called with each new
    progress the step reports while it runs (looked at every second).

    With namespaces on several clusters the wait is on the step's namespace's cluster:
    ``namespace`` names it (``ref.namespace`` of the send); without it, the cluster that knows
    the step (its outcome, or its ``step_uuid`` key) is found first, and a step that no cluster
    knows yet is a ``UsageError`` asking for ``namespace``.
    """
    wanted = _uuid(step_uuid)
    deadline = time.monotonic() + timeout
    if on_progress is not None:
        poll_interval = min(poll_interval, PROGRESS_POLL_S)
    seen: tuple[Any, ...] | None = None
    database = None
    if namespace is None:
        database = yield from _cluster_of_step(wanted)
        if database is None:
            raise UsageError(
                f"step {wanted} is on no cluster yet (no outcome, no step_uuid key): namespaces live on several "
                "clusters, so give wait_for its namespace (StepRef.namespace of the send)"
            )
    # LISTEN before the first look: an outcome recorded in between is not missed.
    conn = yield Hold(listen=_LISTEN_OUTCOMES, namespace=namespace, database=database)
    while True:
        result = yield from get_result(wanted, conn=conn)
        if result is not None:
            return result
        if on_progress is not None:
            rows = yield Rows(queries.STEP_PROGRESS, (str(wanted),), conn)
            if rows and tuple(rows[0]) != seen:
                seen = tuple(rows[0])
                fraction, note, data, worker_id, updated_at = rows[0]
                yield Call(on_progress, StepProgress(wanted, fraction, note, data, worker_id, updated_at))
        left = deadline - time.monotonic()
        if left <= 0:
            raise StepWaitTimeout(str(wanted), timeout)
        look_again = time.monotonic() + min(left, poll_interval)
        # Other steps' outcomes wake the wait too; only ours (or the poll interval) ends it.
        while (wait := look_again - time.monotonic()) > 0:
            payload = yield Notification(conn, wait)
            if payload is None or str(wanted) in _outcome_names(payload):
                break


def find_queued(step_uuid: uuid.UUID | str, *, namespace: str | None = None) -> Plan[dict[str, Any] | None]:
    """Where a step without an outcome is: its message's queue, msg_id, state (queued, delayed,
    waiting to retry, running and by whom), attempts and times; found through its idempotency
    key, else (given ``namespace``) by a scan of that namespace's queue."""
    wanted = _uuid(step_uuid)
    database = None if namespace is not None else (yield from _cluster_of_step(wanted))
    conn = yield Hold(namespace=namespace, database=database)
    keys = yield Rows(queries.STEP_KEY, (wanted,), conn)
    queue = keys[0][0] if keys else (queue_name(namespace) if namespace else None)
    if queue is None:
        return None
    try:
        found = yield Rows(queries.queued_step(queue), (str(wanted),), conn)
    except QueueNotFound:  # a namespace without a queue holds no message
        return None
    if not found:
        return None
    msg_id, read_ct, vt, enqueued_at, headers, visible = found[0]
    claim = (headers or {}).get(queries.CLAIM_HEADER)
    if claim and not visible:
        state = "running"
    elif read_ct and not visible:
        state = "waiting to retry"
    elif not visible:
        state = "delayed"
    else:
        state = "queued"
    return {
        "step_uuid": str(wanted),
        "queue": queue,
        "msg_id": msg_id,
        "state": state,
        "attempts": read_ct,
        "visible_at": vt.isoformat(),
        "enqueued_at": enqueued_at.isoformat(),
        "claimed_by": claim.get("worker_id") if claim and state == "running" else None,
    }


def cancel(namespace: str, step_uuid: uuid.UUID | str, *, by: str | None = None) -> Plan[CancelState]:
    """Cancel a step: one still queued is taken off its queue (recorded ``cancelled`` at once);
    one running is asked to stop (``cancelling``: its worker tells the handler through
    ``ctx.cancelled``, cancels an async one after ``[worker] cancel_grace``, and records
    ``cancelled``, naming ``by``); a finished one is left alone. The answer says which."""
    [row] = yield Rows(queries.CANCEL_STEP, (namespace, str(_uuid(step_uuid)), by), namespace=namespace)
    state: CancelState = row[1]
    return state


def get_progress(step_uuid: uuid.UUID | str, *, namespace: str | None = None) -> Plan[StepProgress | None]:
    """The last progress the step reported while running (``ctx.progress``), if any (kept on
    its namespace's cluster: ``namespace`` looks there only, else each cluster is asked)."""
    wanted = _uuid(step_uuid)
    rows = []
    for database in [None] if namespace is not None else (yield Databases()):
        rows = yield Rows(queries.STEP_PROGRESS, (str(wanted),), namespace=namespace, database=database)
        if rows:
            break
    if not rows:
        return None
    fraction, note, data, worker_id, updated_at = rows[0]
    return StepProgress(wanted, fraction, note, data, worker_id, updated_at)


#: Every operation, in the order the clients list them.
OPERATIONS = (send_step, send_steps, get_result, list_results, wait_for, find_queued, cancel, get_progress)

__all__ = [
    "DEFAULT_POLL_INTERVAL_S",
    "MAX_BATCH",
    "OPERATIONS",
    "AnyConn",
    "Databases",
    "Hold",
    "Notification",
    "Plan",
    "Request",
    "Rows",
    "cancel",
    "find_queued",
    "get_progress",
    "get_result",
    "list_results",
    "send_step",
    "send_steps",
    "wait_for",
]
