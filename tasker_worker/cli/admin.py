"""The bodies of the CLI commands (``main`` wires them to argparse)."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tasker_worker import __version__
from tasker_worker.config.loader import LoadedConfig, database_source, effective_items, load_config
from tasker_worker.config.models import PRIMARY
from tasker_worker.db import flow as flow_db
from tasker_worker.db import migrations, schema
from tasker_worker.db.clusters import ClusterPools, cluster_url, migrate_clusters, unreachable
from tasker_worker.db.connection import describe, open_pool, open_read_pool, resolve_database_url
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.flow import QueueFlow
from tasker_worker.domain.names import dlq_name, namespace_of, queue_name
from tasker_worker.errors import DatabaseError, UsageError
from tasker_worker.producer.client import AsyncClient

MAX_SEND_COUNT = 100_000


def load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> LoadedConfig:
    """The layered config for this invocation (CLI flags on top)."""
    flags: dict[str, Any] = {"database.url": getattr(args, "database_url", None)}
    flags.update(overrides or {})
    return load_config(
        getattr(args, "config", None),
        getattr(args, "env", None),
        flags,
        allow_missing_env=bool(getattr(args, "allow_missing_env", False)),
    )


def database_url(loaded: LoadedConfig) -> str:
    """The URL to use; starts the embedded server when none is configured."""
    return resolve_database_url(loaded.config.database)


async def _migrated(loaded: LoadedConfig, url: str) -> None:
    """Apply pending migrations where ``auto_migrate`` is on: on every cluster when some
    namespace lives elsewhere than the primary (each holds the tasker schema)."""
    config = loaded.config
    if config.sharded:
        await migrate_clusters(config, primary_url=url, auto_only=True)
    elif config.database.auto_migrate:
        await migrations.migrate(url)


@asynccontextmanager
async def small_pool(
    args: argparse.Namespace, *, migrate: bool = True, namespace: str | None = None
) -> AsyncIterator[AsyncConnectionPool]:
    """A two-connection pool, with the schema migrated when auto_migrate is on; of the cluster
    that holds ``namespace`` when one is given (``[queues.namespaces.<ns>] database``)."""
    loaded = load(args)
    url = database_url(loaded)
    if migrate:
        await _migrated(loaded, url)
    config = loaded.config
    name = config.cluster_of(namespace) if namespace is not None and config.sharded else PRIMARY
    spec = config.clusters()[name] if name != PRIMARY else None
    if spec is None:
        pool = await open_pool(url, config.database, max_size=2)
    else:
        target = cluster_url(spec)
        try:
            pool = await open_pool(target, spec.settings, max_size=2)
        except DatabaseError as exc:
            raise unreachable(spec, target, exc, [namespace] if namespace else ()) from exc
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def read_pool(args: argparse.Namespace) -> AsyncIterator[AsyncConnectionPool]:
    """The pool of a command that only reads: on ``[database] read_url`` when one is set (a
    standby: nothing is migrated and the primary is not touched; how stale its reads are goes to
    stderr, so that stdout stays what the command prints), else ``small_pool``'s."""
    loaded = load(args)
    if not loaded.config.database.read_url:
        async with small_pool(args) as pool:
            yield pool
        return
    replica = await open_read_pool(loaded.config.database, max_size=2)
    assert replica is not None
    try:
        state = await QueueClient(replica).replica_state()
        where = describe(loaded.config.database.read_url)
        print(f"(read from {where}, database.read_url: {state.describe()})", file=sys.stderr)
        yield replica
    finally:
        await replica.close()


@asynccontextmanager
async def client(
    args: argparse.Namespace, *, migrate: bool = True, namespace: str | None = None
) -> AsyncIterator[QueueClient]:
    """A ``QueueClient`` on a small pool (see ``small_pool``): of ``namespace``'s cluster."""
    async with small_pool(args, migrate=migrate, namespace=namespace) as pool:
        yield QueueClient(pool)


@asynccontextmanager
async def producer(args: argparse.Namespace, *, read: bool = False) -> AsyncIterator[AsyncClient]:
    """An ``AsyncClient`` on the CLI's small pool, routing each namespace to its cluster (the
    other clusters' pools opened when first used, two connections each); ``read``: one that only
    reads, the primary's reads on ``[database] read_url`` when it is set (``read_pool``)."""
    loaded = load(args)
    async with (
        read_pool(args) if read else small_pool(args) as pool,
        AsyncClient(pool=pool, config=loaded.config, max_size=2) as sender,
    ):
        yield sender


@asynccontextmanager
async def every_cluster(args: argparse.Namespace) -> AsyncIterator[list[tuple[str, QueueClient]]]:
    """``(cluster name, QueueClient)`` of every configured cluster, the primary first (just the
    primary when every namespace lives there), each on a small pool."""
    loaded = load(args)
    async with small_pool(args) as pool:
        if not loaded.config.sharded:
            yield [(PRIMARY, QueueClient(pool))]
            return
        pools = ClusterPools(loaded.config, {PRIMARY: pool}, max_size=2)
        try:
            yield [(name, QueueClient(await pools.pool(name))) for name in pools.names]
        finally:
            await pools.close()


# --- db ------------------------------------------------------------------------------------


def embedded_dir(loaded: LoadedConfig) -> Path:
    """The embedded server's data directory in force (configured, or the default one)."""
    from tasker_worker.db.embedded import default_data_dir

    return (loaded.config.database.embedded_data_dir or default_data_dir()).expanduser().resolve()


def db_url(args: argparse.Namespace) -> int:
    """``db url``: the DSN in use; with no URL configured, the embedded server's (started when it
    is not running, and left running either way), so that ``psql "$(tasker-worker db url)"`` and
    ``export TASKER_DATABASE_URL=$(tasker-worker db url)`` work between runs."""
    loaded = load(args)
    if loaded.config.database.url:
        print(loaded.config.database.url)
        return 0
    from tasker_worker.db.embedded import ensure_embedded

    server = ensure_embedded(embedded_dir(loaded))
    print(server.url)
    how = "started it now" if server.started else f"it was running, started by {server.describe_starter()}"
    print(
        f"(the embedded server in {server.data_dir}: {how}; it keeps running until `tasker-worker db stop`)",
        file=sys.stderr,
    )
    return 0


def db_stop(args: argparse.Namespace) -> int:
    """``db stop``: stop the embedded server (its data stays), whoever started it: the one
    explicit stop of a server that every process on the machine may share."""
    loaded = load(args)
    if loaded.config.database.url:
        raise UsageError(
            f"a database URL is configured ({database_source(loaded)}): there is no embedded server to stop"
        )
    from tasker_worker.db.embedded import describe_starter, stop_running

    path = embedded_dir(loaded)
    record = stop_running(path)
    if record is None:
        print(f"no embedded server runs in {path}")
    else:
        print(f"stopped the embedded server in {path} (started by {describe_starter(record)})")
    return 0


def db_shell(args: argparse.Namespace) -> int:
    """``db shell``: psql on the database in use (``psql`` from PATH, else the embedded
    server's own); the exit code is psql's."""
    loaded = load(args)
    url = loaded.config.database.url or database_url(loaded)
    from tasker_worker.db.embedded import bundled_psql

    psql = shutil.which("psql") or bundled_psql()
    if psql is None:
        raise UsageError(f"no psql here (install the PostgreSQL client); the database is at {url}")
    extra = list(args.psql_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    return subprocess.call([psql, url, *extra])


async def db_migrate(args: argparse.Namespace) -> int:
    """``db migrate``: the primary, and every other configured cluster (``[databases]`` and the
    URLs of ``[queues.namespaces.<ns>] database``), each of which holds the tasker schema."""
    loaded = load(args)
    url = database_url(loaded)
    if not loaded.config.sharded and not loaded.config.databases:
        applied = await migrations.migrate(url)
        for name in applied:
            print(f"applied {name}")
        if not applied:
            print("up to date")
        return 0
    for cluster, done in (await migrate_clusters(loaded.config, primary_url=url)).items():
        for name in done:
            print(f"{cluster}: applied {name}")
        if not done:
            print(f"{cluster}: up to date")
    return 0


async def db_status(args: argparse.Namespace) -> int:
    """``db status``."""
    url = database_url(load(args))
    st = await migrations.status(url)
    print(f"server        PostgreSQL {st.server_version}")
    if st.pgmq_installed_by:
        print(f"pgmq          {st.pgmq_version} ({st.pgmq_installed_by})")
    else:
        print("pgmq          not installed (run: tasker-worker db migrate)")
    for version, name, applied_at in st.applied:
        print(f"migration     {version}_{name}  applied {applied_at}")
    for name in st.pending:
        print(f"pending       {name}")
    for name in st.changed:
        print(f"changed       {name} (edited after it was applied)")
    print(f"queues        {st.queues} ({st.notify_triggers} with the notify trigger)")
    return 0


async def db_schema(args: argparse.Namespace) -> int:
    """``db schema``: the current definition of every tasker table, view and function."""
    sys.stdout.write(await schema.dump(database_url(load(args))))
    return 0


# --- queue ---------------------------------------------------------------------------------


async def queue_create(args: argparse.Namespace) -> int:
    """``queue create NAMESPACE`` (on the cluster that holds it)."""
    queue_name(args.namespace)
    async with client(args, namespace=args.namespace) as qc:
        name = await qc.create_namespace_queue(args.namespace)
    print(f"created {name} and {dlq_name(name)}")
    return 0


async def queue_list(args: argparse.Namespace) -> int:
    """``queue list``: the queues of every cluster (with its name when there are several)."""
    listed: list[tuple[str, Any, dict[str, QueueFlow]]] = []
    async with every_cluster(args) as clusters:
        several = len(clusters) > 1
        for cluster, qc in clusters:
            flows = {f.namespace: f for f in await flow_db.read_flow(qc.pool)}
            listed += [(cluster, row, flows) for row in await qc.list_queues()]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "queue_name": r[0],
                        "is_partitioned": r[1],
                        "is_unlogged": r[2],
                        "created_at": r[3].isoformat(),
                        "flow": _flow_of(r[0], flows),
                        **({"cluster": cluster} if several else {}),
                    }
                    for cluster, r, flows in listed
                ],
                indent=2,
            )
        )
        return 0
    for cluster, (name, partitioned, unlogged, created), flows in listed:
        flags = ",".join(f for f, on in (("partitioned", partitioned), ("unlogged", unlogged)) if on)
        found = _flow_of(name, flows)
        shown = f"  [{flows[found['namespace']].describe()}]" if found else ""
        where = f"  (cluster {cluster})" if several else ""
        print(f"{name:<48} {created:%Y-%m-%d %H:%M:%S} {flags}{shown}{where}")
    if not listed:
        print("no queues (create one: tasker-worker queue create NAMESPACE)")
    return 0


def _flow_of(queue: str, flows: dict[str, QueueFlow]) -> dict[str, Any] | None:
    """The flow control of a namespace queue (not of its DLQ), as JSON."""
    namespace = namespace_of(queue)
    found = flows.get(namespace) if namespace and queue == queue_name(namespace) else None
    return found.as_json() if found else None


async def queue_metrics(args: argparse.Namespace) -> int:
    """``queue metrics [NAMESPACE]``."""
    target = queue_name(args.namespace) if args.namespace else None
    rows = []
    if args.namespace:
        async with client(args, namespace=args.namespace) as qc:
            rows = await qc.metrics(target)
    else:
        async with every_cluster(args) as clusters:
            for _, qc in clusters:
                rows += await qc.metrics(None)
    if args.json:
        print(json.dumps([m.__dict__ for m in rows], indent=2))
        return 0
    print(f"{'queue':<48} {'length':>8} {'visible':>8} {'oldest_s':>9} {'total':>10}")
    for m in rows:
        oldest = "-" if m.oldest_msg_age_sec is None else str(m.oldest_msg_age_sec)
        print(f"{m.queue_name:<48} {m.queue_length:>8} {m.visible_length:>8} {oldest:>9} {m.total_messages:>10}")
    return 0


async def queue_send(args: argparse.Namespace) -> int:
    """``queue send NAMESPACE --handler H [--inputs JSON] [--count N] [--step-uuid U] [--json]``:
    prints each step's ``step_uuid`` (what ``steps show`` and ``steps wait`` take)."""
    from tasker_worker.producer.client import MAX_BATCH

    try:
        inputs = json.loads(args.inputs)
    except ValueError as exc:
        raise UsageError(f"--inputs is not valid JSON: {exc}") from None
    if not isinstance(inputs, dict):
        raise UsageError("--inputs must be a JSON object")
    if not 1 <= args.count <= MAX_SEND_COUNT:
        raise UsageError(f"--count must be between 1 and {MAX_SEND_COUNT}")
    if args.delay < 0:
        raise UsageError("--delay must be zero or more seconds")
    if args.step_uuid and args.count != 1:
        raise UsageError("--step-uuid names one step: it cannot go with --count")
    queue = queue_name(args.namespace)
    if args.unique_key and args.count != 1:
        raise UsageError("--unique-key names one step: it cannot go with --count")
    unique = (
        {"unique_key": args.unique_key, "unique_for": args.unique_for, "debounce": args.debounce}
        if args.unique_key or args.unique_for or args.debounce
        else {}
    )
    options = {
        "delay": args.delay,
        "attempt_limit": args.attempt_limit,
        "timeout": args.timeout,
        "priority": args.priority,
        "group": args.group,
        "concurrency_key": args.concurrency_key,
    }
    async with producer(args) as sender:
        if args.count == 1:
            refs = [
                await sender.send_step(
                    args.namespace, args.handler, inputs, step_uuid=args.step_uuid, **options, **unique
                )
            ]
        else:
            async with client(args, migrate=False, namespace=args.namespace) as qc:
                if not await qc.queue_exists(queue):
                    await qc.create_namespace_queue(args.namespace)
            refs = []
            for start in range(0, args.count, MAX_BATCH):
                size = min(MAX_BATCH, args.count - start)
                refs += await sender.send_steps(args.namespace, args.handler, [inputs] * size, **options)
    if args.json:
        print(json.dumps([r.as_json() for r in refs], indent=2))
        return 0
    if len(refs) == 1:
        ref = refs[0]
        known = "" if ref.created else " (already sent: this is that step)"
        print(f"step_uuid {ref.step_uuid} (msg_id {ref.msg_id} in {queue}){known}")
    else:
        print(
            f"sent {len(refs)} to {queue} (msg_id {refs[0].msg_id}..{refs[-1].msg_id}); --json lists their step_uuids"
        )
    return 0


async def queue_purge(args: argparse.Namespace) -> int:
    """``queue purge NAMESPACE [--dlq]``."""
    queue = queue_name(args.namespace)
    target = dlq_name(queue) if args.dlq else queue
    async with client(args, namespace=args.namespace) as qc:
        count = await qc.purge(target)
    print(f"purged {count} from {target}")
    return 0


# --- config / version ----------------------------------------------------------------------


async def config_show(args: argparse.Namespace) -> int:
    """``config show``: every effective value and where it came from, then the failure policy
    in force for each handler the worker would run (its handler modules imported)."""
    loaded = load(args)
    rows = effective_items(loaded)
    policies = handler_policies(loaded)
    if args.json:
        shown: dict[str, Any] = {k: {"value": v, "origin": o} for k, v, o in rows}
        shown["handlers"] = policies
        print(json.dumps(shown, indent=2, default=str))
        return 0
    width = max(len(k) for k, _, _ in rows)
    for key, value, origin in rows:
        print(f"{key:<{width}}  {json.dumps(value, default=str):<32}  # {origin}")
    print("\n# failure policy per handler ([retry] unless the handler sets its own)")
    for name, policy in policies.items():
        print(f"{name:<{width}}  {policy}")
    return 0


def handler_policies(loaded: LoadedConfig) -> dict[str, str]:
    """``{handler: policy line}`` for every handler of ``[worker] handler_modules`` and the
    built-in ones."""
    from tasker_worker.domain.verdicts import RetryPolicy
    from tasker_worker.runtime.worker import Worker

    registry = Worker(loaded.config).load_handlers()
    default = RetryPolicy.from_settings(loaded.config.retry)
    out: dict[str, str] = {}
    for name in registry.names:
        spec = registry.get(name)
        out[name] = (spec.retry_policy(default) if spec is not None else default).describe()
    return out


async def config_reference(args: argparse.Namespace) -> int:
    """``config reference``: the key/default/variable table of docs/configuration.md."""
    from tasker_worker.config.reference import markdown_table

    print(markdown_table())
    return 0


async def version(args: argparse.Namespace) -> int:
    """``version``."""
    from importlib.metadata import version as dist_version

    try:
        pgmq_version = dist_version("pgmq")
    except Exception:
        pgmq_version = "?"
    print(f"tasker-worker {__version__} (pgmq client {pgmq_version})")
    return 0
