"""``queue limit``, ``queue pause`` and ``queue resume``: flow control for the whole fleet.

Each change is stored in the database (``tasker.queue_flow``) and applied inside every worker's
next claim: no restart, no worker left out, and it holds across worker and server restarts.
"""

from __future__ import annotations

import argparse
import getpass
import json
from collections.abc import Callable
from typing import Any

from tasker_worker.cli.admin import small_pool
from tasker_worker.db import flow as flow_db
from tasker_worker.domain.flow import QueueFlow, Rate
from tasker_worker.domain.names import validate_namespace
from tasker_worker.errors import UsageError


def add_commands(q_sub: Any, command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the flow commands under ``queue``."""
    p = command(q_sub, "limit", queue_limit, "fleet-wide limits of a namespace (no flag: show them)")
    p.add_argument("namespace")
    p.add_argument(
        "--max-running", type=int, metavar="N", help="at most N steps of the namespace run at once (0 removes it)"
    )
    p.add_argument(
        "--key-max-running",
        type=int,
        metavar="N",
        help="at most N steps with the same concurrency_key run at once (0 removes it)",
    )
    p.add_argument(
        "--rate", metavar="N/UNIT", help="at most N starts per s, m or h (20/s, 100/m, 30/10s; 0 removes it)"
    )
    p.add_argument(
        "--burst",
        type=int,
        metavar="B",
        help="how many may start at once (default 1); alone, changes the burst of the rate in force",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command(q_sub, "pause", queue_pause, "start no new step of a namespace until resumed (fleet-wide)")
    p.add_argument("namespace")
    p = command(q_sub, "resume", queue_resume, "resume a paused namespace")
    p.add_argument("namespace")


def _actor() -> str:
    """Who made a change, as the event records it."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


async def queue_limit(args: argparse.Namespace) -> int:
    """``queue limit NS [--max-running N] [--key-max-running N] [--rate N/UNIT [--burst B]]``."""
    validate_namespace(args.namespace)
    for flag in ("max_running", "key_max_running"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be 0 (remove it) or more")
    remove_rate = args.rate is not None and args.rate.strip() == "0"
    rate = None if args.rate is None or remove_rate else Rate.parse(args.rate, args.burst)
    if args.burst is not None and args.burst < 1:
        raise UsageError("--burst must be at least 1")
    changing = any(getattr(args, k) is not None for k in ("max_running", "key_max_running", "rate", "burst"))
    async with small_pool(args, namespace=args.namespace) as pool:
        if changing:
            await flow_db.set_limits(
                pool,
                args.namespace,
                max_running=args.max_running,
                key_max_running=args.key_max_running,
                rate=rate,
                burst=args.burst,
                remove_rate=remove_rate,
                by=_actor(),
            )
        found = await flow_db.read_flow(pool, args.namespace)
    current = found[0] if found else QueueFlow(args.namespace)
    if args.json:
        print(json.dumps(current.as_json(), indent=2))
    else:
        print(f"{args.namespace}: {current.describe()}")
    return 0


async def queue_pause(args: argparse.Namespace) -> int:
    """``queue pause NS``."""
    async with small_pool(args, namespace=args.namespace) as pool:
        changed = await flow_db.pause(pool, args.namespace, _actor())
    print(f"{args.namespace}: paused" + ("" if changed else " (it was already)"))
    return 0


async def queue_resume(args: argparse.Namespace) -> int:
    """``queue resume NS``."""
    async with small_pool(args, namespace=args.namespace) as pool:
        changed = await flow_db.resume(pool, args.namespace, _actor())
    print(f"{args.namespace}: resumed" if changed else f"{args.namespace}: was not paused")
    return 0


__all__ = ["add_commands", "queue_limit", "queue_pause", "queue_resume"]
