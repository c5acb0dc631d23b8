"""``status``, ``workers list|show|stats``, ``events replay`` and ``api`` commands."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from tasker_worker.cli.admin import database_url, load, read_pool, small_pool
from tasker_worker.config.durations import parse_duration
from tasker_worker.db import flow as flow_db
from tasker_worker.db import migrations
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.workers import WorkerStatus, WorkerView
from tasker_worker.errors import UsageError
from tasker_worker.fleet import eventlog
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.fleet.views import FleetViews


def _age(at: datetime | None) -> str:
    if at is None:
        return "never"
    return f"{(datetime.now(UTC) - at).total_seconds():.0f}s ago"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _summary(view: WorkerView) -> str:
    busy = " busy" if view.busy else ""
    requested = f" (switching to {view.requested_mode})" if view.requested_mode else ""
    return (
        f"{view.worker_id}  {view.status.value}{busy}  mode={view.deployment_mode}{requested}  ns={','.join(view.namespaces)}  "
        f"pid={view.pid}@{view.hostname}  heartbeat {_age(view.last_heartbeat_at)}  "
        f"active={view.active_steps} processed={view.processed} ({_as_of(view)})"
    )


def _as_of(view: WorkerView) -> str:
    """When the figures were taken: a worker reports them each heartbeat and once as it leaves."""
    if view.status is WorkerStatus.DEREGISTERED:
        return "figures as it left"
    return f"figures as of its heartbeat {_age(view.last_heartbeat_at)}"


async def status(args: argparse.Namespace) -> int:
    """``status``: live workers with their last reported statistics."""
    async with read_pool(args) as pool:
        views = await FleetViews(pool).list(include_deregistered=args.all, limit=args.limit)
        flows = await flow_db.read_flow(pool)
    if args.json:
        _print_json([v.model_dump(mode="json") for v in views])
        return 0
    for found in flows:
        print(f"namespace {found.namespace}: {found.describe()}")
    if not views:
        print("no registered workers" + ("" if args.all else " (use --all to include deregistered ones)"))
        return 0
    for view in views:
        print(_summary(view))
        stats = view.stats or {}
        c = stats.get("counters", {})
        if c:
            print(
                f"  succeeded={c.get('succeeded', 0)} failed={c.get('failed', 0)} retried={c.get('retried', 0)} "
                f"dead_lettered={c.get('dead_lettered', 0)} dedup={c.get('dedup_hits', 0)} "
                f"stale_acks={c.get('stale_acks', 0)} missed_wakeups={c.get('missed_wakeups', 0)} "
                f"reconnects={c.get('listener_reconnects', 0)}"
            )
        for handler, circuit in (stats.get("circuits") or {}).items():
            print(
                f"  circuit {handler}: {circuit.get('state')} ({circuit.get('reason')}); "
                f"next probe in {circuit.get('retry_in_s')}s"
            )
        for source, p in (stats.get("queue_to_start_ms") or {}).items():
            if p and p.get("p50") is not None:
                print(f"  queue_to_start[{source}] p50={p['p50']}ms p95={p['p95']}ms p99={p['p99']}ms")
    return 0


async def workers_list(args: argparse.Namespace) -> int:
    """``workers list [--status S] [--all]``."""
    status = WorkerStatus(args.status) if args.status else None
    async with read_pool(args) as pool:
        views = await FleetViews(pool).list(status, include_deregistered=args.all, limit=args.limit)
    if args.json:
        _print_json([v.model_dump(mode="json", exclude={"stats"}) for v in views])
        return 0
    if not views:
        print("no workers")
    for view in views:
        print(_summary(view))
    return 0


async def workers_show(args: argparse.Namespace) -> int:
    """``workers show ID``: every field, and the newest heartbeats."""
    async with read_pool(args) as pool:
        queries = FleetViews(pool)
        view = await queries.get(args.worker_id)
        beats = await queries.heartbeats(args.worker_id, limit=args.heartbeats)
    if args.json:
        _print_json({"worker": view.model_dump(mode="json"), "heartbeats": beats})
        return 0
    for key, value in view.model_dump(exclude={"stats"}).items():
        if isinstance(value, list):
            value = ",".join(map(str, value))
        print(f"{key:<18} {value}")
    print(f"heartbeats (newest {len(beats)}):")
    for beat in beats:
        cpu = "-" if beat["cpu_percent"] is None else f"{beat['cpu_percent']:.1f}%"
        mem = "-" if beat["memory_used"] is None else f"{beat['memory_used'] / 2**20:.0f}MiB"
        print(
            f"  {beat['at']:%Y-%m-%d %H:%M:%S}  cpu={cpu} mem={mem} active={beat['active_steps']} "
            f"processed={beat['processed']}"
        )
    return 0


async def workers_stats(args: argparse.Namespace) -> int:
    """``workers stats``: the fleet by status, its cores, memory and throughput."""
    async with read_pool(args) as pool:
        stats = await FleetViews(pool).stats()
    if args.json:
        _print_json(stats)
        return 0
    print("  ".join(f"{k}={v}" for k, v in stats["by_status"].items()) + f"  total={stats['total']}")
    print(
        f"live cores={stats['live_cpu_cores']}  memory={stats['live_memory_total'] / 2**30:.1f}GiB  "
        f"active steps={stats['active_steps']}  throughput={stats['throughput_per_s']} steps/s (last minute)"
    )
    return 0


async def events_replay(args: argparse.Namespace) -> int:
    """``events replay [--compact]``: exit 0 when replay equals the live tables, 1 otherwise."""
    loaded = load(args)
    try:
        retention = parse_duration(args.older_than) if args.older_than else loaded.config.events.retention
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    deleted = None
    async with small_pool(args) as pool:
        if args.compact:
            cutoff = datetime.now(UTC) - retention
            deleted = await eventlog.compact(pool, cutoff)
            if not args.json:
                print(f"compacted {deleted} events older than {cutoff:%Y-%m-%d %H:%M:%S} into a snapshot")
        report = await eventlog.replay_and_compare(pool)
    if args.json:
        _print_json(
            {
                "compacted": deleted,
                "consistent": report.consistent,
                "snapshot_event_id": report.snapshot_event_id,
                "last_event_id": report.last_event_id,
                "events_applied": report.events_applied,
                "workers": len(report.workers),
                "differences": report.differences,
            }
        )
    else:
        print(
            f"replayed {report.events_applied} worker events (snapshot at {report.snapshot_event_id}, "
            f"up to {report.last_event_id}) into {len(report.workers)} workers"
        )
        if report.consistent:
            print("projection equals the live tables")
        for d in report.differences:
            print(f"  differs: {d}")
    return 0 if report.consistent else 1


def api(args: argparse.Namespace) -> int:
    """``api``: serve the control-plane API until SIGTERM/SIGINT."""
    import anyio

    from tasker_worker.api.server import bind, run_api
    from tasker_worker.cli.run import configure_logging

    overrides = {"api.host": args.host, "api.port": args.port}
    loaded = load(args, overrides)
    configure_logging(loaded, bool(getattr(args, "debug", False)))
    url = database_url(loaded)
    if loaded.config.database.auto_migrate:
        anyio.run(migrations.migrate, url)
    sock = bind(loaded.config.api)
    anyio.run(lambda: run_api(loaded.config, url, sock=sock))
    return 0


async def mode_set(args: argparse.Namespace) -> int:
    """``mode set MODE [--worker ID | --namespace N]``: switch running workers without a restart."""
    if args.worker and args.namespace:
        raise UsageError("give --worker or --namespace, not both")
    async with small_pool(args) as pool:
        asked = await WorkerLifecycle(pool).request_mode(args.mode, worker_id=args.worker, namespace=args.namespace)
    if args.json:
        _print_json({"mode": args.mode, "workers": asked})
        return 0
    if not asked:
        target = args.worker or (f"namespace {args.namespace}" if args.namespace else "the fleet")
        print(f"no live worker matched ({target}); nothing to change")
        return 1
    print(f"asked {len(asked)} worker(s) to switch to {args.mode}: {', '.join(asked)}")
    print("listening workers switch at once, the others within a heartbeat interval; `status` shows the result")
    return 0


def add_commands(sub: Any, command: Any) -> None:
    """Wire the fleet commands into the parser."""
    p = command(sub, "status", status, "registered workers and their last statistics")
    p.add_argument("--all", action="store_true", help="include deregistered workers")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print JSON")

    workers = sub.add_parser("workers", help="the worker registry", description="Inspect registered workers.")
    w_sub = workers.add_subparsers(dest="workers_command", metavar="COMMAND", required=True)
    p = command(w_sub, "list", workers_list, "list workers (deregistered ones with --all)")
    p.add_argument("--status", choices=[s.value for s in WorkerStatus])
    p.add_argument("--all", action="store_true", help="include deregistered workers")
    p.add_argument("--limit", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(w_sub, "show", workers_show, "one worker with its newest heartbeats")
    p.add_argument("worker_id")
    p.add_argument("--heartbeats", type=int, default=10, metavar="N")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(w_sub, "stats", workers_stats, "fleet counts, capacity and throughput")
    p.add_argument("--json", action="store_true", help="print JSON")

    ev = sub.add_parser("events", help="the event log", description="Replay and compact the event log.")
    e_sub = ev.add_subparsers(dest="events_command", metavar="COMMAND", required=True)
    p = command(e_sub, "replay", events_replay, "rebuild the worker projection and compare it with the live tables")
    p.add_argument("--compact", action="store_true", help="first compact events older than [events] retention")
    p.add_argument("--older-than", metavar="DURATION", help="with --compact: instead of the retention, e.g. 1h")
    p.add_argument("--json", action="store_true", help="print JSON")

    mode = sub.add_parser(
        "mode", help="deployment mode of running workers", description="Change running workers' deployment mode."
    )
    m_sub = mode.add_subparsers(dest="mode_command", metavar="COMMAND", required=True)
    p = command(m_sub, "set", mode_set, "switch running workers to MODE (no restart, in-flight steps go on)")
    p.add_argument("mode", choices=[m.value for m in DeploymentMode])
    p.add_argument("--worker", metavar="ID", help="only this worker")
    p.add_argument("--namespace", metavar="N", help="only workers serving this namespace")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command(sub, "api", api, "serve the control-plane HTTP API")
    p.add_argument("--host", help="bind address (default [api] host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default [api] port, 8080; 0 = any free port)")
