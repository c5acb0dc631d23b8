"""Database calls that failed for a passing reason: the one list of such failures, the backoff
between attempts, and the one loop that retries a call.

Transient: the server restarted or a connection was cut (psycopg's ``OperationalError``, its
``AdminShutdown`` included, and ``InterfaceError``), a connection could not be had
(``DatabaseError``, ``TimeoutError`` from the pool), all of which the same call may get past
a moment later. A query the server refuses (a ``ProgrammingError``, a ``ConfigError`` naming a
setting) is not retried: it would fail the same way again.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import anyio
import psycopg

from tasker_worker.domain.backoff import backoff_delay
from tasker_worker.errors import DatabaseError, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")

#: What a retry may get past.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg.InterfaceError,
    DatabaseError,
    TimeoutError,
)


class Backoff:
    """The delays of a call that keeps failing: exponential from ``base`` to ``cap`` with
    jitter; with ``first_at_once`` the first retry has none (the usual first failure is a pooled
    connection that died while idle, which the pool has discarded by then)."""

    def __init__(self, base: timedelta, cap: timedelta, *, first_at_once: bool = False, jitter: float = 0.2) -> None:
        self.base = base
        self.cap = cap
        self.first_at_once = first_at_once
        self.jitter = jitter
        #: Failures in a row so far.
        self.failures = 0

    def failed(self) -> float:
        """Count one more failure; return the seconds to wait before the next attempt."""
        self.failures += 1
        if self.first_at_once:
            if self.failures == 1:
                return 0.0
            return backoff_delay(self.failures - 1, self.base, self.cap, self.jitter)
        return backoff_delay(self.failures, self.base, self.cap, self.jitter)

    def succeeded(self) -> None:
        """The call went through: the next failure starts over."""
        self.failures = 0


async def retry_transient(
    call: Callable[[], Awaitable[T]],
    *,
    what: str,
    backoff: Backoff,
    attempts: int | None = None,
    budget_s: float | None = None,
    on_failure: Callable[[BaseException], None] | None = None,
) -> T:
    """``await call()``, again after each transient failure (logged with ``what``, and passed
    to ``on_failure``), until it succeeds or ``attempts`` calls or ``budget_s`` seconds are
    used up: then the last failure is raised. Anything else is raised at once."""
    deadline = None if budget_s is None else anyio.current_time() + budget_s
    while True:
        try:
            result = await call()
        except TRANSIENT_DB_ERRORS as exc:
            if on_failure is not None:
                on_failure(exc)
            out_of_attempts = attempts is not None and backoff.failures + 1 >= attempts
            out_of_time = deadline is not None and anyio.current_time() >= deadline
            if out_of_attempts or out_of_time:
                raise
            delay = backoff.failed()
            log.warning("%s failed (%s); retrying in %.2fs", what, first_line(exc), delay)
            await anyio.sleep(delay)
            continue
        backoff.succeeded()
        return result


__all__ = ["TRANSIENT_DB_ERRORS", "Backoff", "retry_transient"]
