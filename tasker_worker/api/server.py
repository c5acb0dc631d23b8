"""Serving the API with uvicorn: standalone (``tasker-worker api``) or beside a worker (``run``).

The socket is bound here, before uvicorn starts, so a taken port is a clear ``ConfigError``
rather than uvicorn's ``sys.exit``; and uvicorn's own signal capture is switched off because
the process's signals belong to the worker (or to ``api``'s own handler), which stops the
server by cancelling ``serve``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable, Generator
from typing import Any

import anyio
import uvicorn
from starlette.applications import Starlette

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.config.models import ApiConfig, TaskerConfig
from tasker_worker.db.connection import open_pool, open_read_pool
from tasker_worker.errors import ConfigError
from tasker_worker.fleet.leader import LeaderElection
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.fleet.supervision import SupervisionJobs

log = logging.getLogger(__name__)

#: In-flight requests get this long to finish when the server stops.
GRACEFUL_S = 5
#: uvicorn must be accepting connections within this long.
STARTUP_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers, saying when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.accepting = anyio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start, then set ``accepting`` (also when startup failed, so nobody waits forever)."""
        try:
            await super().startup(sockets)
        finally:
            self.accepting.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def bind(api: ApiConfig) -> socket.socket:
    """A listening socket on ``[api] host:port`` (port 0: any free port).

    Bound anywhere but the loopback interface, the API needs ``[api] token``: its routes change
    the fleet (register, deregister, switch modes) and its reads show hostnames, pids and error
    texts, so an API reachable from other machines without a token is refused outright rather
    than served read-only (a read-only API would still leak the fleet to the network). With a
    token, the read routes stay open (health probes and Prometheus scrape without one).
    """
    host, port = api.host, api.port
    if not is_loopback(host) and not api.token:
        raise ConfigError(
            f"[api] host = {host!r} is reachable from other machines, but [api] token is not set: set it "
            "(TASKER__API__TOKEN) or bind 127.0.0.1",
            key="api.token",
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (the
    # accepted ones inherit it). Without it, a response's headers and body left in two segments
    # and the client's delayed ACK held the second 40 ms: every request took 40 ms more.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve the API on {host}:{port}: {exc.strerror or exc}", key="api.port") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def serve(app: Starlette, sock: socket.socket, *, on_started: Callable[[int], Any] | None = None) -> None:
    """Serve ``app`` on ``sock`` until cancelled, then stop gracefully (bounded)."""
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=GRACEFUL_S
    )
    server = _Server(config)
    port = int(sock.getsockname()[1])

    async def run_server() -> None:
        with anyio.CancelScope(shield=True):
            await server.serve(sockets=[sock])

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_server)
            with anyio.fail_after(STARTUP_TIMEOUT_S):
                await server.accepting.wait()
            log.info("API serving on port %d", port)
            if on_started is not None:
                on_started(port)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True
    finally:
        sock.close()


async def run_api(config: TaskerConfig, url: str, *, sock: socket.socket | None = None) -> None:
    """``tasker-worker api``: the API and (if enabled) a supervision candidate, until SIGTERM/SIGINT."""
    sock = sock or bind(config.api)
    pool = await open_pool(url, config.database, max_size=min(config.database.pool_max_size, 8))
    read_pool = None
    try:
        read_pool = await open_read_pool(config.database, max_size=min(config.database.pool_max_size, 8))
        ctx = ApiContext(pool, config, read_pool=read_pool)
        async with anyio.create_task_group() as tg:
            if config.registry.supervision_enabled and config.database.pooler == "transaction":
                log.info("not a supervision candidate behind a transaction pooler (its lock needs a session)")
            elif config.registry.supervision_enabled:
                lifecycle = WorkerLifecycle(pool, heartbeat_history=config.registry.heartbeat_history)
                jobs = SupervisionJobs(lifecycle, config.registry, config.events, config.retention)
                ctx.supervision = LeaderElection(
                    url, jobs.jobs(), candidate_id=f"api-{socket.gethostname()}-{os.getpid()}"
                )
                tg.start_soon(ctx.supervision.run)
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            print(f"tasker-worker API on http://{config.api.host}:{sock.getsockname()[1]}", flush=True)
            try:
                await serve(create_app(ctx), sock)
            finally:
                with anyio.CancelScope(shield=True):
                    await ctx.close()
    finally:
        with anyio.CancelScope(shield=True):
            await pool.close()
            if read_pool is not None:
                await read_pool.close()


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: stopping the API", signal.Signals(signum).name)
            scope.cancel()
            return


def worker_service(config: TaskerConfig, sock: socket.socket) -> Callable[[Any], Any]:
    """The API as a service of a running ``Worker`` (``run`` with ``[api] enabled``): its own
    small pool, so API traffic never takes a connection the worker's steps are waiting for."""

    async def service(worker: Any) -> None:
        pool = await open_pool(worker.database_url, config.database, max_size=4)
        read_pool = None
        ctx: ApiContext | None = None
        try:
            read_pool = await open_read_pool(config.database, max_size=4)
            ctx = ApiContext.for_worker(pool, config, worker, read_pool)
            await serve(create_app(ctx), sock)
        finally:
            with anyio.CancelScope(shield=True):
                if ctx is not None:
                    await ctx.close()
                await pool.close()
                if read_pool is not None:
                    await read_pool.close()

    return service
