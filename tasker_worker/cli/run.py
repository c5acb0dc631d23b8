"""``run`` and ``dlq`` commands."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from tasker_worker import logs
from tasker_worker.cli.admin import client, database_url, load
from tasker_worker.config.loader import LoadedConfig
from tasker_worker.config.models import TaskerConfig
from tasker_worker.db import migrations
from tasker_worker.domain.names import dlq_name, queue_name
from tasker_worker.errors import ConfigError, UsageError


def run_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """CLI flags of ``run``/``demo`` as dotted config keys."""
    return {
        "event_system.deployment_mode": getattr(args, "mode", None),
        "worker.namespaces": getattr(args, "namespace", None) or None,
        "event_system.max_concurrent_processors": getattr(args, "concurrency", None),
        "worker.handler_modules": _handler_modules(getattr(args, "handlers", None)),
    }


def _handler_modules(given: list[str] | None) -> list[str] | None:
    """``--handlers a.b --handlers c`` or ``--handlers a.b,c``; None when not given."""
    if not given:
        return None
    return [name.strip() for item in given for name in item.split(",") if name.strip()]


def importable_cwd() -> None:
    """Put the current directory first on ``sys.path``, as ``python -m`` and every other worker
    CLI do (``celery -A``, ``procrastinate --app``): handler modules next to the config load."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def configure_logging(loaded: LoadedConfig, debug: bool) -> None:
    """Root logging from ``[logging]`` level and format (``--debug`` wins for the level)."""
    settings = loaded.config.logging
    logs.configure_logging(logging.DEBUG if debug else settings.level, settings.format)


def run(args: argparse.Namespace) -> int:
    """``run``: one worker, or ``--processes K`` workers under a supervisor.

    Synchronous on purpose: the supervisor must own the main thread for its signal handlers.
    """
    import anyio

    if args.processes == 1:
        from tasker_worker.runtime.worker import catch_early_signals

        catch_early_signals()
    importable_cwd()
    loaded = load(args, run_overrides(args))
    configure_logging(loaded, bool(getattr(args, "debug", False)))
    if args.processes < 1 or args.processes > 64:
        raise UsageError("--processes must be between 1 and 64")
    url = database_url(loaded)
    if args.processes > 1:
        return _supervise(args, loaded, url)
    return anyio.run(
        _run_one,
        loaded,
        url,
        lambda: load(args, run_overrides(args)).config,
        backend_options=loop_options(loaded.config.worker.event_loop),
    )


def loop_options(choice: str) -> dict[str, Any]:
    """anyio's asyncio backend options for ``[worker] event_loop``.

    uvloop runs the event loop's bookkeeping (callbacks, timers, socket readiness) in C: with a
    task, a timeout and a few database round trips per step, that is about an eighth of the
    worker's CPU per no-op step (``benchmarks/drain.py``, alternated runs).
    """
    if choice == "asyncio":
        return {"use_uvloop": False}
    available = importlib.util.find_spec("uvloop") is not None
    if choice == "uvloop" and not available:
        raise ConfigError(
            "[worker] event_loop = 'uvloop' but uvloop is not installed here "
            "(pip install uvloop; it does not exist for Windows), or use 'auto'"
        )
    return {"use_uvloop": available}


async def _run_one(loaded: LoadedConfig, url: str, reload: Callable[[], TaskerConfig] | None = None) -> int:
    from tasker_worker.runtime.worker import Service, Worker

    services: list[Service] = []
    if loaded.config.api.enabled:
        from tasker_worker.api.server import bind, worker_service

        # Bound before the worker starts: a taken port fails the start, not the running worker.
        api = loaded.config.api
        services.append(worker_service(loaded.config, bind(api)))
    worker = Worker(loaded.config, database_url=url, services=services, reload_config=reload)
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

    from tasker_worker.runtime.processes import supervise

    if loaded.config.database.auto_migrate:
        anyio.run(migrations.migrate, url)  # once here, not K times at once
    argv = [a for a in sys.argv[1:]]
    child = [sys.executable, "-m", "tasker_worker.cli.main", *_without_processes(argv), "--processes", "1"]
    env = {**os.environ, "TASKER_DATABASE_URL": url}
    timeout = loaded.config.worker.shutdown_timeout.total_seconds()
    api = loaded.config.api

    def slot_env(slot: int) -> dict[str, str]:
        # One port per child (port + slot), since K processes cannot share one listening port.
        if not api.enabled or api.port == 0:
            return {}
        return {"TASKER__API__PORT": str(api.port + slot)}

    return supervise(child, args.processes, env, timeout, slot_env)


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


async def dlq_list(args: argparse.Namespace) -> int:
    """``dlq list NAMESPACE``."""
    dlq = dlq_name(queue_name(args.namespace))
    async with client(args, namespace=args.namespace) as qc:
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
    async with client(args, namespace=args.namespace) as qc:
        moved = await qc.requeue_dead_letters(queue, None if args.all else args.msg_id)
    for old, new in moved:
        print(f"requeued dlq msg {old} as {queue} msg {new}")
    print(f"requeued {len(moved)}")
    return 0


def add_commands(sub: Any, command: Any) -> None:
    """Wire ``run`` and ``dlq`` into the parser."""
    p = command(sub, "run", run, "run a worker until SIGTERM/SIGINT")
    p.add_argument("--mode", choices=["PollingOnly", "Hybrid", "EventDrivenOnly"], help="deployment mode")
    p.add_argument("--namespace", action="append", metavar="N", help="namespace to serve (repeatable)")
    p.add_argument("--concurrency", type=int, metavar="C", help="max concurrent steps per process")
    p.add_argument("--processes", type=int, default=1, metavar="K", help="worker processes under one supervisor")
    p.add_argument(
        "--handlers",
        action="append",
        metavar="MODULE",
        help="handler module(s) to import, replacing [worker] handler_modules (repeatable or comma-separated; "
        "the current directory is importable)",
    )

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
