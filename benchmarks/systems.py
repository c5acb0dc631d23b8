"""The three systems under test behind one small interface, and the worker process that runs each.

A *system* knows how to install its schema, enqueue jobs through its documented API, and run a
worker (in a child process: ``python benchmarks/systems.py <system> <task> <url> <options>``):

- ``serve``: a worker whose ``probe`` handler prints ``started <i> <time.time()>`` on stdout
  first thing, until stdin closes (the latency benchmark reads those lines);
- ``drain``: consume the pre-enqueued no-op jobs until none is left, print one JSON line;
- ``idle``: a worker with nothing to do, until stdin closes (the idle benchmark counts its
  statements).

PgQueuer and Procrastinate are benchmark-only extras (``pip install -e '.[bench]'``), used with
their documented APIs: PgQueuer's ``QueueManager`` on asyncpg (``batch_size`` is its throughput
knob: 10 by default, 100 at its best), Procrastinate's ``App`` on its psycopg connector with
LISTEN/NOTIFY (``concurrency`` is its knob).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import psycopg
from common import NS, QUEUE
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage

Send = Callable[[int], Awaitable[Any]]


async def _asyncpg_connect(url: str) -> Any:
    """asyncpg takes no libpq key=value strings: pass the parts."""
    import asyncpg

    parts = psycopg.conninfo.conninfo_to_dict(url)
    return await asyncpg.connect(
        host=parts.get("host"),
        port=int(parts["port"]) if parts.get("port") else None,
        user=parts.get("user"),
        password=parts.get("password") or None,
        database=parts.get("dbname"),
    )


def _started(i: int) -> None:
    sys.stdout.write(f"started {i} {time.time()!r}\n")
    sys.stdout.flush()


async def _until_stdin_closes() -> None:
    # The parent closes our stdin to stop us; reading it in a thread keeps the loop free.
    await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


def _ready() -> None:
    sys.stdout.write("ready\n")
    sys.stdout.flush()


# --- tasker-worker -----------------------------------------------------------------------------


class Tasker:
    """tasker-worker itself (its drain runs the real ``tasker-worker run`` CLI: see drain.py).

    ``env``: the overlay its worker loads (``production`` unless told; None: the shipped
    defaults, as ``tasker-worker run`` with no TASKER_ENV loads them); ``mode`` and
    ``concurrency`` None: the configuration's."""

    name = "tasker"

    def __init__(
        self, mode: str | None = "Hybrid", concurrency: int | None = None, env: str | None = "production"
    ) -> None:
        self.mode = mode
        self.concurrency = concurrency
        self.env = env

    @property
    def label(self) -> str:
        if self.env is None:
            return "tasker defaults" if self.mode is None else f"tasker {self.mode} (defaults)"
        return f"tasker {self.mode}" if self.env == "production" else f"tasker {self.mode} ({self.env})"

    def options(self) -> dict[str, Any]:
        return {"mode": self.mode, "concurrency": self.concurrency, "env": self.env}

    async def install(self, admin: str, dbname: str) -> str:
        from common import tasker_database

        return await anyio.to_thread.run_sync(tasker_database, admin, dbname)

    @asynccontextmanager
    async def producer(self, url: str) -> AsyncIterator[Send]:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:

            async def send(i: int) -> None:
                body = Jsonb(StepMessage.build(NS, "probe", {"i": i}))
                await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, body), prepare=True)

            yield send

    async def serve(self, url: str) -> None:
        from tasker_worker.handlers.registry import HandlerRegistry
        from tasker_worker.testing import make_config, running_worker

        registry = HandlerRegistry()

        @registry.handler("probe")
        async def _probe(ctx: Any, step: Any) -> dict[str, int]:
            i = int(ctx.inputs["i"])
            _started(i)
            return {"i": i}  # the outcome row then says how each probe was found (latency._sources)

        overrides: dict[str, Any] = {}
        if self.mode == "PollingOnly":
            overrides["event_system.fallback_poller.polling_interval"] = "100ms"
        from tasker_worker.config.loader import DEFAULT_ENV

        config = make_config(
            env=self.env or DEFAULT_ENV,
            mode=self.mode,
            namespaces=[NS],
            concurrency=self.concurrency,
            overrides=overrides,
        )
        async with running_worker(url, config, registry=registry):
            _ready()
            await _until_stdin_closes()


# --- PgQueuer ----------------------------------------------------------------------------------


class PgQueuer:
    """PgQueuer on asyncpg."""

    name = "pgqueuer"

    def __init__(self, batch_size: int = 10) -> None:
        self.batch_size = batch_size

    @property
    def label(self) -> str:
        return f"PgQueuer batch {self.batch_size}"

    def options(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size}

    @staticmethod
    async def _queries(url: str) -> tuple[Any, Any]:
        from pgqueuer.db import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await _asyncpg_connect(url)
        return conn, Queries(AsyncpgDriver(conn))

    async def install(self, admin: str, dbname: str) -> str:
        from common import database

        url = await anyio.to_thread.run_sync(database, admin, dbname)
        conn, queries = await self._queries(url)
        try:
            await queries.install()
        finally:
            await conn.close()
        return url

    @asynccontextmanager
    async def producer(self, url: str) -> AsyncIterator[Send]:
        conn, queries = await self._queries(url)
        try:

            async def send(i: int) -> None:
                await queries.enqueue("probe", str(i).encode())

            yield send
        finally:
            await conn.close()

    def enqueue_noop(self, url: str, n: int) -> float:
        async def go() -> float:
            conn, queries = await self._queries(url)
            try:
                t0 = time.perf_counter()
                for k in range(0, n, 1000):
                    m = min(1000, n - k)
                    await queries.enqueue(["noop"] * m, [None] * m, [0] * m)
                return n / (time.perf_counter() - t0)
            finally:
                await conn.close()

        return anyio.run(go)

    async def _manager(self, url: str) -> tuple[Any, Any]:
        from pgqueuer import PgQueuer as App
        from pgqueuer.db import AsyncpgDriver

        conn = await _asyncpg_connect(url)
        return conn, App(AsyncpgDriver(conn))

    async def serve(self, url: str) -> None:
        conn, pgq = await self._manager(url)

        @pgq.entrypoint("probe")
        async def _probe(job: Any) -> None:
            _started(int(job.payload.decode()))

        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: pgq.run(batch_size=self.batch_size))
            _ready()
            await _until_stdin_closes()
            pgq.shutdown.set()
        await conn.close()

    async def drain(self, url: str, n: int) -> dict[str, Any]:
        from pgqueuer.types import QueueExecutionMode

        conn, pgq = await self._manager(url)
        seen: set[Any] = set()
        calls = 0
        first: list[tuple[float, float]] = []

        @pgq.entrypoint("noop")
        async def _noop(job: Any) -> None:
            nonlocal calls
            if not first:
                first.append(_now())
            calls += 1
            seen.add(job.id)

        await pgq.qm.run(
            batch_size=self.batch_size, mode=QueueExecutionMode.drain, dequeue_timeout=timedelta(seconds=1)
        )
        end = _now()  # run() returns once the queue is empty and its buffers are flushed
        left = await conn.fetchval("SELECT count(*) FROM pgqueuer")
        await conn.close()
        return _drain_result(n, calls, len(seen), left, first, end)


# --- Procrastinate -----------------------------------------------------------------------------


class Procrastinate:
    """Procrastinate on its psycopg connector."""

    name = "procrastinate"

    def __init__(self, concurrency: int = 1) -> None:
        self.concurrency = concurrency

    @property
    def label(self) -> str:
        return f"Procrastinate concurrency {self.concurrency}"

    def options(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency}

    @staticmethod
    def _app(url: str) -> Any:
        from procrastinate import App, PsycopgConnector

        return App(connector=PsycopgConnector(conninfo=url))

    async def install(self, admin: str, dbname: str) -> str:
        from common import database

        url = await anyio.to_thread.run_sync(database, admin, dbname)
        app = self._app(url)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
        return url

    @asynccontextmanager
    async def producer(self, url: str) -> AsyncIterator[Send]:
        app = self._app(url)

        @app.task(name="probe")
        async def probe(i: int) -> None:  # the producer's handle on the task; runs in the worker
            pass

        async with app.open_async():

            async def send(i: int) -> None:
                await probe.defer_async(i=i)

            yield send

    def enqueue_noop(self, url: str, n: int) -> float:
        async def go() -> float:
            app = self._app(url)

            @app.task(name="noop")
            async def noop() -> None:
                pass

            async with app.open_async():
                t0 = time.perf_counter()
                for k in range(0, n, 1000):
                    await noop.batch_defer_async(*([{}] * min(1000, n - k)))
                return n / (time.perf_counter() - t0)

        return anyio.run(go)

    async def serve(self, url: str) -> None:
        app = self._app(url)

        @app.task(name="probe")
        async def _probe(i: int) -> None:
            _started(i)

        async with app.open_async(), anyio.create_task_group() as tg:
            tg.start_soon(lambda: app.run_worker_async(concurrency=self.concurrency, install_signal_handlers=False))
            _ready()
            await _until_stdin_closes()
            tg.cancel_scope.cancel()

    async def drain(self, url: str, n: int) -> dict[str, Any]:
        app = self._app(url)
        calls = 0
        first: list[tuple[float, float]] = []

        @app.task(name="noop")
        async def _noop() -> None:
            nonlocal calls
            if not first:
                first.append(_now())
            calls += 1

        async with app.open_async():
            await app.run_worker_async(concurrency=self.concurrency, wait=False, install_signal_handlers=False)
            end = _now()
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'succeeded'), count(*) FILTER (WHERE status <> 'succeeded')"
                " FROM procrastinate_jobs"
            ).fetchone()
        done, left = row if row else (0, 0)
        return _drain_result(n, calls, int(done), int(left), first, end)


def _now() -> tuple[float, float]:
    """Wall clock and this process's CPU time."""
    return time.perf_counter(), time.process_time()


def _drain_result(
    n: int, calls: int, distinct: int, left: int, first: list[tuple[float, float]], end: tuple[float, float]
) -> dict[str, Any]:
    seconds = end[0] - first[0][0] if first else float("nan")
    return {
        "steps": n,
        "seconds": round(seconds, 3),
        "steps_per_s": round(n / seconds, 1) if first else 0.0,
        # Like tasker's: the worker process's CPU from the first job on, per job.
        "worker_cpu_us_per_step": round((end[1] - first[0][1]) / n * 1e6, 1) if first else None,
        "exactly_once": calls == n == distinct and left == 0,
        "handler_calls": calls,
    }


SYSTEMS: dict[str, type[Tasker] | type[PgQueuer] | type[Procrastinate]] = {
    "tasker": Tasker,
    "pgqueuer": PgQueuer,
    "procrastinate": Procrastinate,
}


def make(name: str, options: dict[str, Any]) -> Tasker | PgQueuer | Procrastinate:
    """A system from its name and options (as ``options()`` gives them)."""
    return SYSTEMS[name](**options)  # type: ignore[arg-type]


def child_argv(system: Tasker | PgQueuer | Procrastinate, task: str, url: str, n: int = 0) -> list[str]:
    """The command line of a worker process for ``system``."""
    return [sys.executable, __file__, system.name, task, url, json.dumps(system.options()), str(n)]


async def _child(name: str, task: str, url: str, options: dict[str, Any], n: int) -> None:
    system = make(name, options)
    if task == "serve" or task == "idle":
        await system.serve(url)
    elif task == "drain":
        assert not isinstance(system, Tasker), "tasker's drain runs the CLI (drain.py)"
        print(json.dumps(await system.drain(url, n)), flush=True)
    else:
        raise SystemExit(f"unknown task {task!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("task", choices=["serve", "drain", "idle"])
    parser.add_argument("url")
    parser.add_argument("options", type=json.loads)
    parser.add_argument("n", type=int, nargs="?", default=0)
    args = parser.parse_args()
    anyio.run(_child, args.system, args.task, args.url, args.options, args.n)


if __name__ == "__main__":
    main()
