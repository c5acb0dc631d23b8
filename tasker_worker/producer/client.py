"""``AsyncClient`` and ``Client``: send steps, read and wait for their outcomes, cancel them.

The producer's half of the runtime, over the same SQL contract as any other producer
(``tasker.enqueue_step``, ``pgmq.send_batch``, ``tasker.step_results``)::

    async with AsyncClient("postgresql://app@db/app") as client:
        ref = await client.send_step("orders", "charge", {"order": 42}, step_uuid=order_step_id)
        result = await client.wait_for(ref.step_uuid, timeout=30)

- ``send_step`` with a ``step_uuid`` is idempotent: a step_uuid already sent or already done is
  answered with that step (``ref.created is False``), never a second message.
- ``conn=`` sends inside the caller's own psycopg transaction: the step exists if and only if
  the caller commits (River's ``InsertTx``, Procrastinate's ``defer_async`` in a transaction).
- ``wait_for`` is woken by the outcome's notification (``tasker_outcome``, sent by the settle
  for steps sent with ``notify=True``, the default); it also looks every ``poll_interval``, so a
  step sent by someone else, or a lost notification, costs a wait of at most that.

``Client`` is the same for code without an event loop. Both own a small connection pool, or use
the one given (``pool=``); without a URL they use ``[database]`` of the configuration (the
embedded server when none is set).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import msgspec
import numpy as np
import psycopg
from psycopg import sql as pgsql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from tasker_worker.config.models import TaskerConfig
from tasker_worker.db import queries
from tasker_worker.db.connection import resolve_database_url
from tasker_worker.db.queue_client import translate_error
from tasker_worker.domain.names import queue_name, validate_namespace
from tasker_worker.domain.notifications import OUTCOME_CHANNEL, decode_outcomes
from tasker_worker.domain.results import CancelState, StepRef, StepResult
from tasker_worker.domain.steps import OutcomeStatus, build_message
from tasker_worker.errors import StepValidationError, StepWaitTimeout, UsageError
from tasker_worker.runtime.tracing import trace_headers

#: ``send_steps`` takes at most this many steps per call (one statement each).
MAX_BATCH = 10_000
#: How often ``wait_for`` looks without a notification, by default.
DEFAULT_POLL_INTERVAL_S = 5.0
_LISTEN = pgsql.SQL("LISTEN {}").format(pgsql.Identifier(OUTCOME_CHANNEL))
_STEP_RESULT = queries.STEP_RESULT.format(columns=StepResult.COLUMNS)
_LIST_RESULTS = queries.LIST_STEP_RESULTS.format(columns=StepResult.COLUMNS)
_ENCODE = msgspec.json.Encoder()

AnyConn = psycopg.Connection[Any] | psycopg.AsyncConnection[Any]


def _uuid(value: uuid.UUID | str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise UsageError(f"not a UUID: {value!r}") from None


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
) -> dict[str, Any]:
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
) -> tuple[dict[str, Any], list[uuid.UUID]]:
    items = list(inputs)
    if not 1 <= len(items) <= MAX_BATCH:
        raise UsageError(f"send_steps takes 1 to {MAX_BATCH} steps per call, got {len(items)}")
    # What is the same for every step is checked once, by the rules of tasker.step_message;
    # each step adds only its inputs (an object) and three fresh UUIDs.
    build_message(namespace, handler, None, attempt_limit=attempt_limit, timeout=timeout)
    common: dict[str, Any] = {"namespace": namespace, "handler": handler}
    if attempt_limit is not None:
        common["attempt_limit"] = attempt_limit
    if timeout is not None:
        common["timeout"] = timeout
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


def _ref(row: tuple[Any, ...], namespace: str) -> StepRef:
    return StepRef(step_uuid=row[0], msg_id=int(row[1]), namespace=namespace, created=bool(row[2]))


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


class AsyncClient:
    """Send steps and read their outcomes from async code (see the module docstring)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: AsyncConnectionPool | None = None,
        config: TaskerConfig | None = None,
        max_size: int = 4,
    ) -> None:
        self._url = url
        self._config = config or TaskerConfig()
        self._pool = pool
        self._owns_pool = pool is None
        self._max_size = max_size

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool (``async with`` does it)."""
        if self._pool is None:
            url = self._url or resolve_database_url(self._config.database)
            self._pool = AsyncConnectionPool(
                url, min_size=1, max_size=self._max_size, kwargs={"autocommit": True}, open=False
            )
            await self._pool.open(wait=True, timeout=self._config.database.connect_timeout.total_seconds())

    async def close(self) -> None:
        """Close the pool this client opened (not one it was given)."""
        if self._pool is not None and self._owns_pool:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool:
        """The pool in use."""
        if self._pool is None:
            raise UsageError("the client is not open: use `async with AsyncClient(...)` or `await client.open()`")
        return self._pool

    async def _rows(self, query: Any, params: Any, conn: psycopg.AsyncConnection[Any] | None) -> list[tuple[Any, ...]]:
        try:
            if conn is not None:
                cur = await conn.execute(query, params)
                return await cur.fetchall()
            async with self.pool.connection() as own:
                cur = await own.execute(query, params)
                return await cur.fetchall()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc

    async def send_step(
        self,
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
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> StepRef:
        """Enqueue one step; with ``step_uuid``, idempotently. ``headers`` are the message's
        (the current trace context is added); ``notify`` lets ``wait_for`` be woken."""
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
        )
        [row] = await self._rows(queries.ENQUEUE_STEP, params, conn)
        return _ref(row, namespace)

    async def send_steps(
        self,
        namespace: str,
        handler: str,
        inputs: Iterable[dict[str, Any]],
        *,
        delay: float | None = None,
        attempt_limit: int | None = None,
        timeout: float | None = None,
        headers: dict[str, Any] | None = None,
        notify: bool = False,
        conn: psycopg.AsyncConnection[Any] | None = None,
    ) -> list[StepRef]:
        """Enqueue one step per ``inputs`` item in one statement (fresh step_uuids: a batch is
        not deduplicated; use ``send_step(step_uuid=...)`` for that)."""
        params, uuids = _batch_params(
            namespace,
            handler,
            inputs,
            delay=delay,
            attempt_limit=attempt_limit,
            timeout=timeout,
            headers=headers,
            notify=notify,
        )
        rows = await self._rows(queries.SEND_STEPS, params, conn)
        return [StepRef(u, int(r[0]), namespace) for u, r in zip(uuids, rows, strict=True)]

    async def get_result(
        self, step_uuid: uuid.UUID | str, *, conn: psycopg.AsyncConnection[Any] | None = None
    ) -> StepResult | None:
        """The step's outcome, or None while it has none."""
        rows = await self._rows(_STEP_RESULT, (_uuid(step_uuid),), conn)
        return StepResult.from_row(rows[0]) if rows else None

    async def list_results(
        self, *, namespace: str | None = None, status: OutcomeStatus | str | None = None, limit: int = 100
    ) -> list[StepResult]:
        """Outcomes, newest first (at most 1000)."""
        rows = await self._rows(_LIST_RESULTS, _list_params(namespace, status, limit), None)
        return [StepResult.from_row(r) for r in rows]

    async def wait_for(
        self, step_uuid: uuid.UUID | str, timeout: float, *, poll_interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> StepResult:
        """The step's outcome once it is recorded; ``StepWaitTimeout`` after ``timeout`` seconds."""
        wanted = _uuid(step_uuid)
        deadline = time.monotonic() + timeout
        async with self.pool.connection() as conn:
            await conn.execute(_LISTEN)  # before the first look: nothing falls in between
            try:
                while True:
                    # On the listening connection: a waiter holds one connection, not two (a
                    # pool of one would otherwise wait on itself).
                    result = await self.get_result(wanted, conn=conn)
                    if result is not None:
                        return result
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StepWaitTimeout(str(wanted), timeout)
                    async for notice in conn.notifies(timeout=min(left, poll_interval)):
                        if str(wanted) in _outcome_names(notice.payload):
                            break
            finally:
                await conn.execute("UNLISTEN *")

    async def find_queued(self, step_uuid: uuid.UUID | str, *, namespace: str | None = None) -> dict[str, Any] | None:
        """Where a step without an outcome is: its message's queue, msg_id, state (queued,
        delayed, waiting to retry, running and by whom), attempts and times; found through its
        idempotency key, else (given ``namespace``) by a scan of that namespace's queue."""
        wanted = _uuid(step_uuid)
        async with self.pool.connection() as conn:
            row = await (await conn.execute(queries.STEP_KEY, (wanted,))).fetchone()
            queue = row[0] if row else (queue_name(namespace) if namespace else None)
            if queue is None:
                return None
            found = await (await conn.execute(queries.queued_step(queue), (str(wanted),))).fetchone()
        if found is None:
            return None
        msg_id, read_ct, vt, enqueued_at, headers, visible = found
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

    async def cancel(self, namespace: str, step_uuid: uuid.UUID | str) -> CancelState:
        """Take a step still queued off its queue (recorded as ``cancelled``); a step held by a
        live claim or already finished is left alone, and the answer says which."""
        [row] = await self._rows(queries.CANCEL_STEP, (namespace, str(_uuid(step_uuid))), None)
        state: CancelState = row[1]
        return state


class Client:
    """``AsyncClient`` for code without an event loop (the same methods, blocking)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool | None = None,
        config: TaskerConfig | None = None,
        max_size: int = 4,
    ) -> None:
        self._url = url
        self._config = config or TaskerConfig()
        self._pool = pool
        self._owns_pool = pool is None
        self._max_size = max_size

    def __enter__(self) -> Client:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open the pool (``with`` does it)."""
        if self._pool is None:
            url = self._url or resolve_database_url(self._config.database)
            self._pool = ConnectionPool(
                url, min_size=1, max_size=self._max_size, kwargs={"autocommit": True}, open=False
            )
            self._pool.open(wait=True, timeout=self._config.database.connect_timeout.total_seconds())

    def close(self) -> None:
        """Close the pool this client opened (not one it was given)."""
        if self._pool is not None and self._owns_pool:
            self._pool.close()
            self._pool = None

    @property
    def pool(self) -> ConnectionPool:
        """The pool in use."""
        if self._pool is None:
            raise UsageError("the client is not open: use `with Client(...)` or `client.open()`")
        return self._pool

    def _rows(self, query: Any, params: Any, conn: psycopg.Connection[Any] | None) -> list[tuple[Any, ...]]:
        try:
            if conn is not None:
                return conn.execute(query, params).fetchall()
            with self.pool.connection() as own:
                return own.execute(query, params).fetchall()
        except psycopg.Error as exc:
            raise translate_error(exc) from exc

    def send_step(
        self,
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
        conn: psycopg.Connection[Any] | None = None,
    ) -> StepRef:
        """See ``AsyncClient.send_step``."""
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
        )
        [row] = self._rows(queries.ENQUEUE_STEP, params, conn)
        return _ref(row, namespace)

    def send_steps(
        self,
        namespace: str,
        handler: str,
        inputs: Iterable[dict[str, Any]],
        *,
        delay: float | None = None,
        attempt_limit: int | None = None,
        timeout: float | None = None,
        headers: dict[str, Any] | None = None,
        notify: bool = False,
        conn: psycopg.Connection[Any] | None = None,
    ) -> list[StepRef]:
        """See ``AsyncClient.send_steps``."""
        params, uuids = _batch_params(
            namespace,
            handler,
            inputs,
            delay=delay,
            attempt_limit=attempt_limit,
            timeout=timeout,
            headers=headers,
            notify=notify,
        )
        rows = self._rows(queries.SEND_STEPS, params, conn)
        return [StepRef(u, int(r[0]), namespace) for u, r in zip(uuids, rows, strict=True)]

    def get_result(
        self, step_uuid: uuid.UUID | str, *, conn: psycopg.Connection[Any] | None = None
    ) -> StepResult | None:
        """See ``AsyncClient.get_result``."""
        rows = self._rows(_STEP_RESULT, (_uuid(step_uuid),), conn)
        return StepResult.from_row(rows[0]) if rows else None

    def list_results(
        self, *, namespace: str | None = None, status: OutcomeStatus | str | None = None, limit: int = 100
    ) -> list[StepResult]:
        """See ``AsyncClient.list_results``."""
        return [StepResult.from_row(r) for r in self._rows(_LIST_RESULTS, _list_params(namespace, status, limit), None)]

    def wait_for(
        self, step_uuid: uuid.UUID | str, timeout: float, *, poll_interval: float = DEFAULT_POLL_INTERVAL_S
    ) -> StepResult:
        """See ``AsyncClient.wait_for``."""
        wanted = _uuid(step_uuid)
        deadline = time.monotonic() + timeout
        with self.pool.connection() as conn:
            conn.execute(_LISTEN)
            try:
                while True:
                    result = self.get_result(wanted, conn=conn)
                    if result is not None:
                        return result
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise StepWaitTimeout(str(wanted), timeout)
                    for notice in conn.notifies(timeout=min(left, poll_interval)):
                        if str(wanted) in _outcome_names(notice.payload):
                            break
            finally:
                conn.execute("UNLISTEN *")

    def cancel(self, namespace: str, step_uuid: uuid.UUID | str) -> CancelState:
        """See ``AsyncClient.cancel``."""
        [row] = self._rows(queries.CANCEL_STEP, (namespace, str(_uuid(step_uuid))), None)
        state: CancelState = row[1]
        return state


__all__ = ["AsyncClient", "Client", "StepRef", "StepResult"]
