"""The bodies of the CLI commands (``main`` wires them to argparse)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from psycopg_pool import AsyncConnectionPool

from tasker_worker import __version__
from tasker_worker.config.loader import LoadedConfig, effective_items, load_config
from tasker_worker.db import migrations, schema
from tasker_worker.db.connection import open_pool, resolve_database_url
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.names import dlq_name, queue_name
from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import UsageError

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


@asynccontextmanager
async def small_pool(args: argparse.Namespace, *, migrate: bool = True) -> AsyncIterator[AsyncConnectionPool]:
    """A two-connection pool, with the schema migrated when auto_migrate is on."""
    loaded = load(args)
    url = database_url(loaded)
    if migrate and loaded.config.database.auto_migrate:
        await migrations.migrate(url)
    pool = await open_pool(url, loaded.config.database, max_size=2)
    try:
        yield pool
    finally:
        await pool.close()


@asynccontextmanager
async def client(args: argparse.Namespace, *, migrate: bool = True) -> AsyncIterator[QueueClient]:
    """A ``QueueClient`` on a small pool (see ``small_pool``)."""
    async with small_pool(args, migrate=migrate) as pool:
        yield QueueClient(pool)


# --- db ------------------------------------------------------------------------------------


async def db_migrate(args: argparse.Namespace) -> int:
    """``db migrate``."""
    url = database_url(load(args))
    applied = await migrations.migrate(url)
    if applied:
        for name in applied:
            print(f"applied {name}")
    else:
        print("up to date")
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
    """``queue create NAMESPACE``."""
    queue_name(args.namespace)
    async with client(args) as qc:
        name = await qc.create_namespace_queue(args.namespace)
    print(f"created {name} and {dlq_name(name)}")
    return 0


async def queue_list(args: argparse.Namespace) -> int:
    """``queue list``."""
    async with client(args) as qc:
        rows = await qc.list_queues()
    if args.json:
        print(
            json.dumps(
                [
                    {"queue_name": r[0], "is_partitioned": r[1], "is_unlogged": r[2], "created_at": r[3].isoformat()}
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    for name, partitioned, unlogged, created in rows:
        flags = ",".join(f for f, on in (("partitioned", partitioned), ("unlogged", unlogged)) if on)
        print(f"{name:<48} {created:%Y-%m-%d %H:%M:%S} {flags}")
    if not rows:
        print("no queues (create one: tasker-worker queue create NAMESPACE)")
    return 0


async def queue_metrics(args: argparse.Namespace) -> int:
    """``queue metrics [NAMESPACE]``."""
    target = queue_name(args.namespace) if args.namespace else None
    async with client(args) as qc:
        rows = await qc.metrics(target)
    if args.json:
        print(json.dumps([m.__dict__ for m in rows], indent=2))
        return 0
    print(f"{'queue':<48} {'length':>8} {'visible':>8} {'oldest_s':>9} {'total':>10}")
    for m in rows:
        oldest = "-" if m.oldest_msg_age_sec is None else str(m.oldest_msg_age_sec)
        print(f"{m.queue_name:<48} {m.queue_length:>8} {m.visible_length:>8} {oldest:>9} {m.total_messages:>10}")
    return 0


async def queue_send(args: argparse.Namespace) -> int:
    """``queue send NAMESPACE --handler H [--inputs JSON] [--count N]``."""
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
    queue = queue_name(args.namespace)
    async with client(args) as qc:
        if args.count == 1:
            ids = [
                await qc.send_step(
                    args.namespace,
                    args.handler,
                    inputs,
                    delay=args.delay,
                    attempt_limit=args.attempt_limit,
                    timeout=args.timeout,
                )
            ]
        else:
            if not await qc.queue_exists(queue):
                await qc.create_namespace_queue(args.namespace)
            bodies = [
                StepMessage.build(
                    args.namespace, args.handler, inputs, attempt_limit=args.attempt_limit, timeout=args.timeout
                )
                for _ in range(args.count)
            ]
            StepMessage.parse(bodies[0])  # the validation the worker applies, before sending
            ids = await qc.send_batch(queue, bodies, delay=args.delay)
    print(f"sent {len(ids)} to {queue} (msg_id {ids[0]}{'..' + str(ids[-1]) if len(ids) > 1 else ''})")
    return 0


async def queue_purge(args: argparse.Namespace) -> int:
    """``queue purge NAMESPACE [--dlq]``."""
    queue = queue_name(args.namespace)
    target = dlq_name(queue) if args.dlq else queue
    async with client(args) as qc:
        count = await qc.purge(target)
    print(f"purged {count} from {target}")
    return 0


# --- config / version ----------------------------------------------------------------------


async def config_show(args: argparse.Namespace) -> int:
    """``config show``: every effective value and where it came from."""
    loaded = load(args)
    rows = effective_items(loaded)
    if args.json:
        print(json.dumps({k: {"value": v, "origin": o} for k, v, o in rows}, indent=2, default=str))
        return 0
    width = max(len(k) for k, _, _ in rows)
    for key, value, origin in rows:
        print(f"{key:<{width}}  {json.dumps(value, default=str):<32}  # {origin}")
    return 0


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
