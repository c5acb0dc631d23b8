"""Helpers for tests against a real database: configs, a running worker, sending and reading.

::

    async with running_worker(url, make_config(namespaces=["orders"])) as worker:
        await send_steps(url, "orders", "noop", [{"n": 1}])
        await wait_until(lambda: outcome_count(url) == 1, timeout=10)
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import psycopg
from psycopg.types.json import Jsonb

from tasker_worker.config.loader import load_config
from tasker_worker.config.models import TaskerConfig
from tasker_worker.db import queries
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.steps import StepMessage
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.worker import Worker

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config"


def make_config(
    *,
    env: str = "test",
    mode: str | None = None,
    namespaces: list[str] | None = None,
    concurrency: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> TaskerConfig:
    """A config from the repository's files for ``env`` plus overrides (dotted keys)."""
    flags: dict[str, Any] = {
        "event_system.deployment_mode": mode,
        "worker.namespaces": namespaces,
        "event_system.max_concurrent_processors": concurrency,
        "database.auto_migrate": False,
    }
    flags.update(overrides or {})
    root = REPO_CONFIG if REPO_CONFIG.is_dir() else None
    return load_config(root, env, flags, environ={}).config


@asynccontextmanager
async def running_worker(
    url: str,
    config: TaskerConfig,
    *,
    registry: HandlerRegistry | None = None,
    state: Any = None,
    setup: Callable[[Worker], Any] | None = None,
    **worker_kwargs: Any,
) -> AsyncIterator[Worker]:
    """A worker running in this event loop; shut down gracefully on exit.

    ``setup`` is called with the worker before it starts: pass a handler module's
    ``register(worker)`` to test it as ``[worker] handler_modules`` would load it.
    """
    worker = Worker(config, database_url=url, registry=registry, state=state, **worker_kwargs)
    if setup is not None:
        setup(worker)
    async with anyio.create_task_group() as tg:
        failure: list[BaseException] = []
        started = anyio.Event()

        async def _run() -> None:
            try:
                await worker.run()
            except BaseException as exc:  # surfaced to the test below
                failure.append(exc)
                raise
            finally:
                started.set()

        async def _ready() -> None:
            await worker.ready.wait()
            started.set()

        tg.start_soon(_run)
        tg.start_soon(_ready)
        with anyio.fail_after(30):
            await started.wait()
        if failure:
            raise failure[0]
        try:
            yield worker
        finally:
            worker.request_shutdown("test finished")
            with anyio.fail_after(60):
                await worker.stopped.wait()


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` (sync or async) until it returns a truthy value; fail after ``timeout``."""
    with anyio.fail_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await anyio.sleep(interval)


async def send_steps(
    url: str,
    namespace: str,
    handler: str,
    inputs: Iterable[dict[str, Any]],
    *,
    batch: bool = False,
    delay: int = 0,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Send steps (one statement each, or one ``send_batch``); return their bodies."""
    bodies = [StepMessage.build(namespace, handler, i, **extra) for i in inputs]
    queue = queue_name(namespace)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        if batch:
            await conn.execute(queries.SEND_BATCH, (queue, [Jsonb(b) for b in bodies], delay))
        else:
            for body in bodies:
                await conn.execute(queries.SEND, (queue, Jsonb(body), delay))
    return bodies


async def fetch(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one query on a fresh connection and return its rows."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def fetch_value(url: str, query: str, params: Any = None) -> Any:
    """The first column of the first row."""
    rows = await fetch(url, query, params)
    return rows[0][0] if rows else None


def outcome_counter(url: str, status: str | None = None) -> Callable[[], Awaitable[int]]:
    """An async callable counting rows of ``tasker.step_results`` (optionally by status)."""

    async def count() -> int:
        if status is None:
            return int(await fetch_value(url, queries.OUTCOME_COUNT))
        return int(await fetch_value(url, queries.OUTCOME_COUNT_WITH_STATUS, (status,)))

    return count


def outcomes_at_least(url: str, n: int, status: str | None = None) -> Callable[[], Awaitable[bool]]:
    """An async predicate for ``wait_until``: at least ``n`` outcome rows (optionally of ``status``)."""
    count = outcome_counter(url, status)

    async def reached() -> bool:
        return await count() >= n

    return reached


__all__ = [
    "fetch",
    "fetch_value",
    "make_config",
    "outcome_counter",
    "outcomes_at_least",
    "running_worker",
    "send_steps",
    "wait_until",
]
