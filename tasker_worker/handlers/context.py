"""StepContext: what a handler receives besides the step itself."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Generator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool

from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import Snooze, UsageError


class StepLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that adds the step's ids to every record."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        extra = dict(self.extra or {})
        extra.update(kwargs.get("extra") or {})
        kwargs["extra"] = extra
        return msg, kwargs


#: Reported progress: (fraction 0..1 or None, note, data).
Progress = tuple[float | None, str | None, Any]


#: A progress note is cut to this many characters; its data to this many bytes of JSON.
MAX_PROGRESS_NOTE = 1000
MAX_PROGRESS_DATA = 8192


def _progress_data(data: Any) -> Any:
    """``data`` as the database will store it (JSON, no NUL, finite numbers), or a
    ``UsageError`` naming what it cannot store: checked where the handler calls, so that nothing
    a handler reports can fail the worker's write later."""
    try:
        text = json.dumps(data, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"progress data must be JSON (string keys, finite numbers): {exc}") from None
    if "\\u0000" in text:
        text = text.replace("\\u0000", "\\ufffd")
    if len(text.encode()) > MAX_PROGRESS_DATA:
        raise UsageError(f"progress data is over {MAX_PROGRESS_DATA} bytes of JSON")
    return json.loads(text)


class _Done:
    """What ``ctx.progress`` returns: awaiting it is immediate, and not awaiting it is fine (a
    sync handler calls it the same way)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield  # a generator that ends at once: the await returns None


_DONE = _Done()


@dataclass
class StepContext:
    """The context of one step run.

    ``attempt`` counts from 1. ``state`` is the worker's shared state object. Async handlers may
    call ``await ctx.transaction()`` to get a connection inside an open transaction: rows they
    write there commit together with the step's outcome and the ack, or not at all.

    A handler in control: ``return ctx.snooze("30s")`` (or ``raise Snooze("30s")``) puts the
    step back without using an attempt; ``ctx.progress(0.4, note=..., data=...)`` reports how
    far it is (written by the worker at most once a second, the last value winning; ``await`` it
    or not); ``ctx.cancelled`` says someone asked the step to stop (``steps cancel``): end soon,
    an async handler is cancelled after ``[worker] cancel_grace``, and the outcome is
    ``cancelled`` either way.
    """

    step: StepMessage
    attempt: int
    worker_id: str
    queue: str
    msg_id: int
    state: Any = None
    #: The message's headers (the producer's, e.g. a W3C ``traceparent``), as claimed.
    headers: dict[str, Any] | None = None
    _pool: AsyncConnectionPool | None = field(default=None, repr=False)
    _stack: AsyncExitStack | None = field(default=None, repr=False)
    _conn: psycopg.AsyncConnection[Any] | None = field(default=None, repr=False)
    #: Where ``progress`` reports go (the runner's board); None: nowhere (a detached context).
    _report: Callable[[StepContext, Progress], None] | None = field(default=None, repr=False)
    #: Who asked the step to stop, once someone did.
    cancelled_by: str | None = field(default=None, repr=False)
    _cancel_event: Any = field(default=None, repr=False)

    _log: StepLogger | None = field(default=None, repr=False)

    def snooze(self, delay: str | float | timedelta) -> Snooze:
        """Return this from the handler to put the step back for ``delay`` without using an
        attempt (as ``raise Snooze(delay)``)."""
        return Snooze(delay)

    def progress(self, fraction: float | None = None, *, note: str | None = None, data: Any = None) -> _Done:
        """Report how far the step is: ``fraction`` 0..1, a short ``note``, JSON ``data`` (shown by
        ``steps show``, the API, the dashboard and ``wait_for(on_progress=...)``)."""
        if fraction is not None and not 0.0 <= float(fraction) <= 1.0:  # NaN fails this too
            raise UsageError(f"progress fraction must be between 0 and 1, got {fraction}")
        if note is not None:
            note = str(note).replace("\x00", "\ufffd")[:MAX_PROGRESS_NOTE]
        if data is not None:
            data = _progress_data(data)
        if self._report is not None:
            self._report(self, (None if fraction is None else float(fraction), note, data))
        return _DONE

    @property
    def cancelled(self) -> bool:
        """Whether someone asked this step to stop (read it between units of work)."""
        return self.cancelled_by is not None

    async def wait_cancelled(self) -> None:
        """Until someone asks this step to stop (async handlers)."""
        if self._cancel_event is None:
            self._cancel_event = anyio.Event()
            if self.cancelled_by is not None:
                self._cancel_event.set()
        await self._cancel_event.wait()

    def request_cancel(self, by: str | None) -> None:
        """The runtime's call: someone asked this step to stop."""
        if self.cancelled_by is None:
            self.cancelled_by = by or "unknown"
        if self._cancel_event is not None:
            self._cancel_event.set()

    @property
    def log(self) -> StepLogger:
        """A logger whose records carry this step's ids (made on first use: most steps never log)."""
        if self._log is None:
            self._log = StepLogger(
                logging.getLogger("tasker_worker.step"),
                {
                    "worker_id": self.worker_id,
                    "queue": self.queue,
                    "msg_id": self.msg_id,
                    "step_uuid": str(self.step.step_uuid),
                    "correlation_id": str(self.step.correlation_id),
                    "handler": self.step.handler,
                    "attempt": self.attempt,
                },
            )
        return self._log

    @property
    def inputs(self) -> dict[str, Any]:
        """The step's inputs."""
        return self.step.inputs

    async def transaction(self) -> psycopg.AsyncConnection[Any]:
        """A connection in an open transaction shared with the outcome write (async handlers)."""
        if self._conn is not None:
            return self._conn
        if self._pool is None:
            raise UsageError("no database transaction is available in this context (sync or detached handler)")
        self._stack = AsyncExitStack()
        conn = await self._stack.enter_async_context(self._pool.connection())
        await self._stack.enter_async_context(conn.transaction())
        self._conn = conn
        return conn

    @property
    def has_transaction(self) -> bool:
        """Whether the handler opened a transaction."""
        return self._conn is not None

    async def commit(self) -> None:
        """Commit the handler's transaction, which by then holds the step's outcome and ack.

        The runtime's call, once the outcome is written in it: a handler that committed its
        own rows earlier would have them without the outcome (and again on a redelivery)."""
        await self._end_transaction(None)

    async def rollback(self, reason: BaseException) -> None:
        """Roll the handler's transaction back (the handler failed, or its ack was fenced
        out): its rows go with it. The runtime's call, like ``commit``."""
        await self._end_transaction(reason)

    async def _end_transaction(self, exc: BaseException | None) -> None:
        stack, self._stack, self._conn = self._stack, None, None
        if stack is None:
            return
        if exc is None:
            await stack.aclose()
        else:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)

    def detached(self) -> StepContext:
        """A copy without database access or shared state (for process pools)."""
        return StepContext(
            step=self.step, attempt=self.attempt, worker_id=self.worker_id, queue=self.queue, msg_id=self.msg_id
        )

    def __getstate__(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "attempt": self.attempt,
            "worker_id": self.worker_id,
            "queue": self.queue,
            "msg_id": self.msg_id,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
