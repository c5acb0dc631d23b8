"""``AsyncClient`` and ``Client``: send steps, read and wait for their outcomes, cancel them.

The producer's half of the runtime, over the same SQL contract as any other producer
(``tasker.enqueue_step``, ``pgmq.send_batch``, ``tasker.step_results``)::

    async with AsyncClient() as client:  # the configured database (see below)
        ref = await client.send_step("orders", "charge", {"order": 42}, step_uuid=order_step_id)
        result = await client.wait_for(ref.step_uuid, timeout=30)

- ``send_step`` with a ``step_uuid`` is idempotent: a step_uuid already sent or already done is
  answered with that step (``ref.created is False``), never a second message.
- ``conn=`` sends inside the caller's own psycopg transaction: the step exists if and only if
  the caller commits (River's ``InsertTx``, Procrastinate's ``defer_async`` in a transaction).
- ``wait_for`` is woken by the outcome's notification (``tasker_outcome``, sent by the settle
  for steps sent with ``notify=True``, the default); it also looks every ``poll_interval``, so a
  step sent by someone else, or a lost notification, costs a wait of at most that.

Which database: the URL given, else the configuration resolved as by every other entry point
(``load_config``: ``[database] url`` of the TOML layers, ``TASKER_DATABASE_URL``, the
``TASKER__*`` variables), else the embedded server, which the client attaches to (or starts)
and never stops. ``config=`` replaces the resolution; ``pool=`` uses a pool you own.

Namespaces on other clusters (``[queues.namespaces.<ns>] database``): a send, a cancel and
everything given a ``namespace`` go to the cluster of that namespace, through a pool of that
cluster opened on first use; a look-up by step_uuid alone asks each cluster in turn (the
primary first). With ``pool=``, routing needs ``config=`` too (and ``pools=`` may hand in the
other clusters' pools by name); with one cluster, there is one pool and nothing is routed.

``Client`` is the same for code without an event loop: both classes are made from the same
operations (``operations.py``), ``AsyncClient`` awaiting them and ``Client`` blocking on them,
so they offer the same methods with the same parameters (``conn=`` takes a
``psycopg.AsyncConnection`` for one and a ``psycopg.Connection`` for the other).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import typing
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Concatenate, ParamSpec, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from tasker_worker.config.loader import LoadedConfig, database_source, load_config
from tasker_worker.config.models import PRIMARY, DatabaseConfig, TaskerConfig
from tasker_worker.db.clusters import ClusterPools, SyncClusterPools
from tasker_worker.db.connection import CLIENT_APPLICATION_NAME, open_pool, open_sync_pool, resolve_database_url
from tasker_worker.db.queue_client import translate_error
from tasker_worker.domain.results import StepRef, StepResult
from tasker_worker.errors import DatabaseError, TaskerError, UsageError
from tasker_worker.producer import operations
from tasker_worker.producer.operations import MAX_BATCH, Call, Databases, Hold, Notification, Plan, Request, Rows

P = ParamSpec("P")
R = TypeVar("R")

#: The statement that ends a held connection's LISTEN before it goes back to the pool.
_UNLISTEN = "UNLISTEN *"


class _Target:
    """Where a client connects: resolved when it opens (so that nothing is read, and no server
    started, by merely constructing one), the same way for both clients."""

    def __init__(self, url: str | None, config: TaskerConfig | None) -> None:
        self._url = url
        self._config = config
        self.source = "not resolved yet"
        #: The configuration in force once resolved (its clusters route the namespaces).
        self.config: TaskerConfig | None = config

    def resolve(self) -> tuple[str, DatabaseConfig]:
        """The URL and the ``[database]`` settings to open a pool with; remembers ``source``."""
        if self._config is not None:
            database = self._config.database
            if self._url:
                self.source = "the URL given to the client"
                return self._url, database
            self.source = "database.url of the config given" if database.url else "the embedded server"
            return resolve_database_url(database), database
        # One resolution for every entry point: the client's URL is the top layer, as
        # `--database-url` is for the CLI.
        loaded: LoadedConfig = load_config(overrides={"database.url": self._url}, overrides_origin="the client's URL")
        self.source = database_source(loaded)
        self.config = loaded.config
        return resolve_database_url(loaded.config.database), loaded.config.database

    def sharded(self) -> TaskerConfig | None:
        """The configuration when some namespace lives on another cluster (None: one cluster)."""
        return self.config if self.config is not None and self.config.sharded else None

    def explain_on(self, exc: TaskerError, cluster: str | None) -> TaskerError:
        """``explain``, for an error of the cluster named ``cluster`` (None: the primary)."""
        if cluster is not None and cluster != PRIMARY and self.config is not None:
            if isinstance(exc, DatabaseError) and "(database: " not in exc.message:
                spec = self.config.clusters()[cluster]
                exc.message = f"{exc.message} (database: cluster {cluster}, {spec.key})"
                exc.args = (exc.message,)
        return self.explain(exc)

    def explain(self, exc: TaskerError) -> TaskerError:
        """``exc`` with the database's source added to a database error, so that a client on the
        wrong database says which one it is on, and why."""
        if isinstance(exc, DatabaseError) and "(database: " not in exc.message:
            text = exc.message
            if 'schema "tasker" does not exist' in text or 'schema "pgmq" does not exist' in text:
                text += "; run `tasker-worker db migrate` there, or start a worker (it migrates)"
            exc.message = f"{text} (database: {self.source})"
            exc.args = (exc.message,)
        return exc


def _checked_conn(conn: Any, kind: type[Any], client: str) -> Any:
    if conn is not None and not isinstance(conn, kind):
        raise UsageError(
            f"{client} sends on a {kind.__module__.split('.')[0]}.{kind.__name__} (conn=), "
            f"got a {type(conn).__name__}: use {'Client' if client == 'AsyncClient' else 'AsyncClient'} for that"
        )
    return conn


def _signature_of(plan: Callable[..., Any]) -> inspect.Signature:
    """The plan's signature as a method's: ``self`` first, the plan's result as what it returns."""
    sig = inspect.signature(plan)
    hints = typing.get_type_hints(plan, vars(operations))
    result = typing.get_args(hints["return"])[2] if "return" in hints else inspect.Signature.empty
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=result)


def _as_method(method: Callable[..., Any], plan: Callable[..., Any]) -> None:
    functools.update_wrapper(method, plan, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=())
    method.__signature__ = _signature_of(plan)  # type: ignore[attr-defined]


def _awaiting(plan: Callable[P, Plan[R]]) -> Callable[Concatenate[AsyncClient, P], Coroutine[Any, Any, R]]:
    """An ``AsyncClient`` method running ``plan``."""

    async def method(self: AsyncClient, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return await self._drive(plan(*args, **kwargs))

    _as_method(method, plan)
    return method


def _blocking(plan: Callable[P, Plan[R]]) -> Callable[Concatenate[Client, P], R]:
    """A ``Client`` method running ``plan``."""

    def method(self: Client, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._drive(plan(*args, **kwargs))

    _as_method(method, plan)
    return method


class AsyncClient:
    """Send steps and read their outcomes from async code (see the module docstring)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: AsyncConnectionPool | None = None,
        config: TaskerConfig | None = None,
        max_size: int = 4,
        pools: Mapping[str, AsyncConnectionPool] | ClusterPools | None = None,
    ) -> None:
        if pools and config is None:
            raise UsageError("pools= are routed by the configuration's clusters: give config= too")
        self._target = _Target(url, config)
        self._pool = pool
        self._owns_pool = pool is None
        self._max_size = max_size
        #: The pools of the clusters, when some namespace lives elsewhere than the primary.
        self._clusters: ClusterPools | None = None
        #: A ``ClusterPools`` handed in (the API's), used as it is and closed by its owner.
        self._shared = pools if isinstance(pools, ClusterPools) else None
        self._given = dict(pools) if pools is not None and not isinstance(pools, ClusterPools) else {}
        if pool is not None:
            self._route(config)

    def _route(self, config: TaskerConfig | None) -> None:
        if self._shared is not None:
            self._clusters = self._shared
        elif config is not None and config.sharded and self._pool is not None:
            given = {**self._given, PRIMARY: self._pool}
            self._clusters = ClusterPools(
                config, given, max_size=self._max_size, application_name=CLIENT_APPLICATION_NAME
            )

    async def _pool_of(self, namespace: str | None, database: str | None) -> AsyncConnectionPool:
        """The pool of the cluster of ``namespace`` (or named ``database``; neither: the primary)."""
        clusters = self._clusters
        if clusters is None:
            return self.pool
        if database is None:
            database = clusters.cluster_of(namespace) if namespace is not None else PRIMARY
        return await clusters.pool(database)

    async def __aenter__(self) -> AsyncClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Open the pool (``async with`` does it); resolves the database first (module docstring)."""
        if self._pool is None:
            url, database = self._target.resolve()
            try:
                self._pool = await open_pool(
                    url, database, max_size=self._max_size, application_name=CLIENT_APPLICATION_NAME
                )
            except TaskerError as exc:
                raise self._target.explain(exc) from exc
            self._route(self._target.sharded())

    async def close(self) -> None:
        """Close the pools this client opened (not those it was given)."""
        if self._clusters is not None and self._clusters is not self._shared:
            await self._clusters.close()
        if self._pool is not None and self._owns_pool:
            await self._pool.close()
            self._pool = None
            self._clusters = None

    @property
    def pool(self) -> AsyncConnectionPool:
        """The pool in use."""
        if self._pool is None:
            raise UsageError("the client is not open: use `async with AsyncClient(...)` or `await client.open()`")
        return self._pool

    async def _drive(self, plan: Plan[R]) -> R:
        """Run ``plan`` to its end, answering each request it yields."""
        async with contextlib.AsyncExitStack() as held:
            answer: Any = None
            failure: BaseException | None = None
            while True:
                try:
                    request = plan.throw(failure) if failure is not None else plan.send(answer)
                except StopIteration as done:
                    result: R = done.value
                    return result
                answer, failure = None, None
                try:
                    answer = await self._serve(request, held)
                except TaskerError as exc:
                    failure = self._target.explain_on(exc, self._cluster_named(request))

    def _cluster_named(self, request: Request) -> str | None:
        """The cluster ``request`` went to, for its error (None: the primary, or one cluster)."""
        if self._clusters is None or not isinstance(request, Rows | Hold):
            return None
        if request.database is not None:
            return request.database
        return self._clusters.cluster_of(request.namespace) if request.namespace is not None else None

    async def _serve(self, request: Request, held: contextlib.AsyncExitStack) -> Any:
        try:
            if isinstance(request, Rows):
                conn = _checked_conn(request.conn, psycopg.AsyncConnection, "AsyncClient")
                if conn is not None:
                    cur = await conn.execute(request.query, request.params)
                    return await cur.fetchall() if cur.description else []
                pool = await self._pool_of(request.namespace, request.database)
                async with pool.connection() as own:
                    cur = await own.execute(request.query, request.params)
                    return await cur.fetchall() if cur.description else []
            if isinstance(request, Databases):
                return [PRIMARY] if self._clusters is None else self._clusters.names
            if isinstance(request, Hold):
                pool = await self._pool_of(request.namespace, request.database)
                conn = await held.enter_async_context(pool.connection())
                if request.listen is not None:
                    await conn.execute(request.listen)
                    held.push_async_callback(_unlisten, conn)
                return conn
            if isinstance(request, Call):
                called = request.func(request.arg)
                if inspect.isawaitable(called):
                    await called
                return None
            async for notice in request.conn.notifies(timeout=request.timeout, stop_after=1):
                return notice.payload
            return None
        except psycopg.Error as exc:
            raise translate_error(exc) from exc

    send_step = _awaiting(operations.send_step)
    send_steps = _awaiting(operations.send_steps)
    get_result = _awaiting(operations.get_result)
    list_results = _awaiting(operations.list_results)
    wait_for = _awaiting(operations.wait_for)
    find_queued = _awaiting(operations.find_queued)
    cancel = _awaiting(operations.cancel)
    get_progress = _awaiting(operations.get_progress)


async def _unlisten(conn: psycopg.AsyncConnection[Any]) -> None:
    # A broken connection needs no UNLISTEN (the pool discards it), and its error must not hide
    # the one that ended the wait.
    with contextlib.suppress(psycopg.Error):
        await conn.execute(_UNLISTEN)


class Client:
    """``AsyncClient`` for code without an event loop: the same methods, blocking."""

    def __init__(
        self,
        url: str | None = None,
        *,
        pool: ConnectionPool | None = None,
        config: TaskerConfig | None = None,
        max_size: int = 4,
        pools: Mapping[str, ConnectionPool] | None = None,
    ) -> None:
        if pools and config is None:
            raise UsageError("pools= are routed by the configuration's clusters: give config= too")
        self._target = _Target(url, config)
        self._pool = pool
        self._owns_pool = pool is None
        self._max_size = max_size
        self._given = dict(pools or {})
        #: The pools of the clusters, when some namespace lives elsewhere than the primary.
        self._clusters: SyncClusterPools | None = None
        if pool is not None:
            self._route(config)

    def _route(self, config: TaskerConfig | None) -> None:
        if config is not None and config.sharded and self._pool is not None:
            given = {**self._given, PRIMARY: self._pool}
            self._clusters = SyncClusterPools(
                config, given, max_size=self._max_size, application_name=CLIENT_APPLICATION_NAME
            )

    def _pool_of(self, namespace: str | None, database: str | None) -> ConnectionPool:
        """The pool of the cluster of ``namespace`` (or named ``database``; neither: the primary)."""
        clusters = self._clusters
        if clusters is None:
            return self.pool
        if database is None:
            database = clusters.cluster_of(namespace) if namespace is not None else PRIMARY
        return clusters.pool(database)

    def __enter__(self) -> Client:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Open the pool (``with`` does it); resolves the database first (module docstring)."""
        if self._pool is None:
            url, database = self._target.resolve()
            try:
                self._pool = open_sync_pool(
                    url, database, max_size=self._max_size, application_name=CLIENT_APPLICATION_NAME
                )
            except TaskerError as exc:
                raise self._target.explain(exc) from exc
            self._route(self._target.sharded())

    def close(self) -> None:
        """Close the pools this client opened (not those it was given)."""
        if self._clusters is not None:
            self._clusters.close()
        if self._pool is not None and self._owns_pool:
            self._pool.close()
            self._pool = None
            self._clusters = None

    @property
    def pool(self) -> ConnectionPool:
        """The pool in use."""
        if self._pool is None:
            raise UsageError("the client is not open: use `with Client(...)` or `client.open()`")
        return self._pool

    def _drive(self, plan: Plan[R]) -> R:
        """Run ``plan`` to its end, answering each request it yields."""
        with contextlib.ExitStack() as held:
            answer: Any = None
            failure: BaseException | None = None
            while True:
                try:
                    request = plan.throw(failure) if failure is not None else plan.send(answer)
                except StopIteration as done:
                    result: R = done.value
                    return result
                answer, failure = None, None
                try:
                    answer = self._serve(request, held)
                except TaskerError as exc:
                    failure = self._target.explain_on(exc, self._cluster_named(request))

    def _cluster_named(self, request: Request) -> str | None:
        """The cluster ``request`` went to, for its error (None: the primary, or one cluster)."""
        if self._clusters is None or not isinstance(request, Rows | Hold):
            return None
        if request.database is not None:
            return request.database
        return self._clusters.cluster_of(request.namespace) if request.namespace is not None else None

    def _serve(self, request: Request, held: contextlib.ExitStack) -> Any:
        try:
            if isinstance(request, Rows):
                conn = _checked_conn(request.conn, psycopg.Connection, "Client")
                if conn is not None:
                    cur = conn.execute(request.query, request.params)
                    return cur.fetchall() if cur.description else []
                with self._pool_of(request.namespace, request.database).connection() as own:
                    cur = own.execute(request.query, request.params)
                    return cur.fetchall() if cur.description else []
            if isinstance(request, Databases):
                return [PRIMARY] if self._clusters is None else self._clusters.names
            if isinstance(request, Hold):
                conn = held.enter_context(self._pool_of(request.namespace, request.database).connection())
                if request.listen is not None:
                    conn.execute(request.listen)
                    held.callback(_unlisten_sync, conn)
                return conn
            if isinstance(request, Call):
                request.func(request.arg)
                return None
            assert isinstance(request, Notification)
            for notice in request.conn.notifies(timeout=request.timeout, stop_after=1):
                return notice.payload
            return None
        except psycopg.Error as exc:
            raise translate_error(exc) from exc

    send_step = _blocking(operations.send_step)
    send_steps = _blocking(operations.send_steps)
    get_result = _blocking(operations.get_result)
    list_results = _blocking(operations.list_results)
    wait_for = _blocking(operations.wait_for)
    find_queued = _blocking(operations.find_queued)
    cancel = _blocking(operations.cancel)
    get_progress = _blocking(operations.get_progress)


def _unlisten_sync(conn: psycopg.Connection[Any]) -> None:
    with contextlib.suppress(psycopg.Error):
        conn.execute(_UNLISTEN)


__all__ = ["MAX_BATCH", "AsyncClient", "Client", "StepRef", "StepResult"]
