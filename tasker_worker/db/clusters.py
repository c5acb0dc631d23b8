"""Namespaces on several PostgreSQL clusters: a pool per cluster, opened where it is used.

A deployment whose primary is full shards by namespace (``[queues.namespaces.<ns>] database``):
each namespace's queue, outcome rows, step keys and flow control live on one cluster, an
ordinary PostgreSQL with the tasker schema. Which one is the configuration's rule
(``TaskerConfig.cluster_of``); this module opens and migrates them, and says which cluster,
which key and which namespaces an error is about.

With one cluster (nothing mapped elsewhere) nothing here is in the way: the worker and the
clients hold the one pool they always held and never ask where a namespace lives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Generic, TypeVar

import anyio
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from tasker_worker.config.models import PRIMARY, ClusterSpec, TaskerConfig
from tasker_worker.db import migrations
from tasker_worker.db.connection import (
    POOL_APPLICATION_NAME,
    describe,
    open_pool,
    open_sync_pool,
    resolve_database_url,
)
from tasker_worker.errors import DatabaseError, TaskerError, UsageError


def cluster_url(spec: ClusterSpec) -> str:
    """The URL to open ``spec`` with (the primary without a URL is the embedded server)."""
    return spec.url or resolve_database_url(spec.settings)


def namespaces_on(config: TaskerConfig, name: str, namespaces: Iterable[str]) -> list[str]:
    """Those of ``namespaces`` that live on the cluster ``name``."""
    return [ns for ns in namespaces if config.cluster_of(ns) == name]


def unreachable(spec: ClusterSpec, url: str, exc: TaskerError, namespaces: Iterable[str] = ()) -> DatabaseError:
    """``exc`` (a failed connect or migration) told as the cluster's: its name, the key that
    set its URL and the namespaces that live there, so that the fix is plain."""
    held = sorted(namespaces)
    on = f", which holds namespace{'s' if len(held) > 1 else ''} {', '.join(held)}" if held else ""
    if spec.name == PRIMARY:
        where = f"the primary cluster ({spec.key}{on})"
    else:
        where = f"cluster {spec.name} ({spec.key}, {describe(url)}{on})"
    return DatabaseError(f"{where}: {exc}")


async def migrate_clusters(
    config: TaskerConfig, *, primary_url: str | None = None, auto_only: bool = False
) -> dict[str, list[str]]:
    """Apply pending migrations on every configured cluster, the primary (at ``primary_url``
    when given) first; what was applied on each. Every cluster holds the tasker schema: queues,
    outcomes, step keys and flow control are per cluster. ``auto_only``: only the clusters
    whose ``auto_migrate`` is on (what an entry point does at start)."""
    specs = config.clusters()
    applied: dict[str, list[str]] = {}
    for name, spec in specs.items():
        if auto_only and not spec.settings.auto_migrate:
            continue
        url = primary_url if name == PRIMARY and primary_url else cluster_url(spec)
        try:
            applied[name] = await migrations.migrate(url)
        except DatabaseError as exc:
            if len(specs) == 1:
                raise
            raise unreachable(spec, url, exc) from exc
    return applied


def _route(config: TaskerConfig, routes: dict[str, str], namespace: str) -> str:
    """The cluster of ``namespace``, remembered in ``routes`` only when the namespace is
    configured (``[queues.namespaces.<ns>]``): the API and the clients ask for any valid name,
    and remembering each would grow without bound; any other name is the primary's, which
    ``cluster_of`` answers at once."""
    name = routes.get(namespace)
    if name is None:
        name = config.cluster_of(namespace)
        if namespace in config.queues.namespaces:
            routes[namespace] = name
    return name


_Pool = TypeVar("_Pool", AsyncConnectionPool, ConnectionPool)


class _ClusterRouting(Generic[_Pool]):
    """What the async and the blocking cluster pools share: the clusters of a configuration,
    the pools handed in (used as they are, never closed here) and the namespace routes."""

    def __init__(
        self,
        config: TaskerConfig,
        given: Mapping[str, _Pool] | None = None,
        *,
        max_size: int | None = None,
        application_name: str = POOL_APPLICATION_NAME,
    ) -> None:
        self.config = config
        self.specs = config.clusters()
        self.pools: dict[str, _Pool] = dict(given or {})
        self._given = set(self.pools)
        self._max_size = max_size
        self._application_name = application_name
        #: namespace -> cluster name, remembered for the configured namespaces (the rule reads
        #: the configuration; see ``_route``).
        self._routes: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        """Every cluster's name, the primary first."""
        return list(self.specs)

    def cluster_of(self, namespace: str) -> str:
        """The name of the cluster that holds ``namespace``."""
        return _route(self.config, self._routes, namespace)


class ClusterPools(_ClusterRouting[AsyncConnectionPool]):
    """An async pool per cluster, each opened on its first use (a client that only sends to the
    primary's namespaces never connects to another cluster). Pools handed in are used as they
    are and never closed here; the ones opened here are closed by ``close``."""

    def __init__(
        self,
        config: TaskerConfig,
        given: Mapping[str, AsyncConnectionPool] | None = None,
        *,
        max_size: int | None = None,
        application_name: str = POOL_APPLICATION_NAME,
    ) -> None:
        super().__init__(config, given, max_size=max_size, application_name=application_name)
        self._lock = anyio.Lock()

    async def pool(self, name: str) -> AsyncConnectionPool:
        """The pool of cluster ``name``, opened now if it is not yet."""
        found = self.pools.get(name)
        if found is not None:
            return found
        if name not in self.specs:
            raise UsageError(f"no cluster named {name!r} (configured: {', '.join(self.specs)})")
        async with self._lock:
            found = self.pools.get(name)
            if found is None:
                spec = self.specs[name]
                url = await anyio.to_thread.run_sync(cluster_url, spec)
                try:
                    found = await open_pool(
                        url, spec.settings, max_size=self._max_size, application_name=self._application_name
                    )
                except DatabaseError as exc:
                    raise unreachable(spec, url, exc) from exc
                self.pools[name] = found
        return found

    async def for_namespace(self, namespace: str) -> AsyncConnectionPool:
        """The pool of the cluster that holds ``namespace``."""
        return await self.pool(self.cluster_of(namespace))

    async def close(self) -> None:
        """Close the pools opened here."""
        for name in [n for n in self.pools if n not in self._given]:
            await self.pools.pop(name).close()

    def reading_from(self, primary: AsyncConnectionPool) -> ClusterPools:
        """The same clusters with the primary's reads on ``primary`` (``[database] read_url``):
        the other clusters' pools are this one's (a read URL is the primary's alone)."""
        return _PrimaryReads(self, primary)


class _PrimaryReads(ClusterPools):
    """``ClusterPools.reading_from``: the primary on a read pool, every other cluster shared with
    the pools it was made from (which open and close them)."""

    def __init__(self, base: ClusterPools, primary: AsyncConnectionPool) -> None:
        super().__init__(base.config, {PRIMARY: primary})
        self._base = base

    async def pool(self, name: str) -> AsyncConnectionPool:
        """The read pool for the primary, the shared pool of any other cluster."""
        if name == PRIMARY:
            return self.pools[PRIMARY]
        return await self._base.pool(name)

    async def close(self) -> None:
        """Nothing: the pools are the base's and the read pool's owner's."""


class SyncClusterPools(_ClusterRouting[ConnectionPool]):
    """``ClusterPools`` for the blocking ``Client``: the same rule, blocking pools."""

    def __init__(
        self,
        config: TaskerConfig,
        given: Mapping[str, ConnectionPool] | None = None,
        *,
        max_size: int | None = None,
        application_name: str = POOL_APPLICATION_NAME,
    ) -> None:
        super().__init__(config, given, max_size=max_size, application_name=application_name)
        self._lock = threading.Lock()

    def pool(self, name: str) -> ConnectionPool:
        """The pool of cluster ``name``, opened now if it is not yet."""
        found = self.pools.get(name)
        if found is not None:
            return found
        if name not in self.specs:
            raise UsageError(f"no cluster named {name!r} (configured: {', '.join(self.specs)})")
        with self._lock:
            found = self.pools.get(name)
            if found is None:
                spec = self.specs[name]
                url = cluster_url(spec)
                try:
                    found = open_sync_pool(
                        url, spec.settings, max_size=self._max_size, application_name=self._application_name
                    )
                except DatabaseError as exc:
                    raise unreachable(spec, url, exc) from exc
                self.pools[name] = found
        return found

    def for_namespace(self, namespace: str) -> ConnectionPool:
        """The pool of the cluster that holds ``namespace``."""
        return self.pool(self.cluster_of(namespace))

    def close(self) -> None:
        """Close the pools opened here."""
        for name in [n for n in self.pools if n not in self._given]:
            self.pools.pop(name).close()


__all__ = [
    "ClusterPools",
    "SyncClusterPools",
    "cluster_url",
    "migrate_clusters",
    "namespaces_on",
    "unreachable",
]
