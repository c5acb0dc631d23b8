"""``tasker-worker demo``: the whole path of a step, end to end, on the embedded database.

Creates the ``planning`` namespace, starts a Hybrid worker, enqueues path-planning steps with
plain SQL (``tasker.send_step``) — some one by one while the worker runs, some in a single
``pgmq.send_batch`` — waits until every step has its outcome row, and prints a summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from typing import Any

import anyio
import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from tasker_worker.cli.admin import database_url, embedded_dir, load
from tasker_worker.cli.run import configure_logging
from tasker_worker.db import migrations, queries
from tasker_worker.domain.steps import StepMessage
from tasker_worker.handlers.planning import MODULE as PLANNING_MODULE
from tasker_worker.handlers.planning.grid import encode_cells
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import fetch, fetch_value, wait_until

NAMESPACE = "planning"
QUEUE = "worker_planning_queue"


def planning_inputs(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """A random 20%-obstacle map with free corners, a random algorithm, timestamps."""
    blocked = rng.random((size, size)) < 0.2
    blocked[:2, :2] = blocked[-2:, -2:] = False
    algorithm = str(rng.choice(["astar", "astar", "dijkstra", "theta_star"]))
    return {
        "grid": {
            "width": size,
            "height": size,
            "resolution": 0.1,
            "origin": {"x": 0, "y": 0},
            "cells": encode_cells(blocked),
        },
        "start": {"x": 0.05, "y": 0.05, "theta": 0.0},
        "goal": {"x": size * 0.1 - 0.05, "y": size * 0.1 - 0.05, "theta": 1.57},
        "algorithm": algorithm,
        "max_speed": 0.5,
    }


async def demo(args: argparse.Namespace) -> int:
    """Run the demo and print its summary."""
    loaded = load(args, {"event_system.deployment_mode": "Hybrid", "worker.namespaces": [NAMESPACE]})
    debug = bool(getattr(args, "debug", False))
    configure_logging(loaded, debug)
    if not debug:
        logging.getLogger().setLevel(logging.WARNING)  # the summary is the output
    t0 = time.perf_counter()
    embedded = None
    if loaded.config.database.url:
        url = database_url(loaded)
    else:
        from tasker_worker.db.embedded import ensure_embedded

        embedded = ensure_embedded(embedded_dir(loaded))
        url = embedded.url
    await migrations.migrate(url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(queries.CREATE_NAMESPACE_QUEUE, (NAMESPACE,))
        before = int(await _value(conn, queries.OUTCOME_COUNT))
        stale = int(await _value(conn, sql.SQL(queries.QUEUE_LENGTH).format(sql.Identifier("pgmq", f"q_{QUEUE}"))))
    print(f"embedded PostgreSQL ready and migrated in {time.perf_counter() - t0:.2f}s")
    if stale:
        print(f"note: {stale} steps from an earlier run are still queued; they run too")

    rng = np.random.default_rng(args.seed)
    config = loaded.config
    if PLANNING_MODULE not in config.worker.handler_modules:  # the demo plans, whatever else is configured
        worker_section = config.worker.model_copy(
            update={"handler_modules": [*config.worker.handler_modules, PLANNING_MODULE]}
        )
        config = config.model_copy(update={"worker": worker_section})
    worker = Worker(config, database_url=url)
    total = args.steps
    batch_n = total // 3
    single_n = total - batch_n
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        await worker.ready.wait()
        started = time.perf_counter()
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            # One by one, as an application would (each send is its own statement and NOTIFY).
            for i in range(single_n):
                await conn.execute(queries.SEND_PLANNING_STEP, (NAMESPACE, Jsonb(planning_inputs(rng, args.size))))
                if i % 20 == 19:
                    await anyio.sleep(0.02)  # a producer's pace, so steps arrive while others run
            # ...and a batch in one statement (one notification for all of them).
            bodies = [
                Jsonb(StepMessage.build(NAMESPACE, "path_plan", planning_inputs(rng, args.size)))
                for _ in range(batch_n)
            ]
            await conn.execute(queries.SEND_BATCH, (QUEUE, bodies, 0))
        target = before + total + stale
        await wait_until(lambda: _count_at_least(url, target), timeout=args.timeout, interval=0.05)
        elapsed = time.perf_counter() - started
        worker.request_shutdown("demo finished")
    status = worker.status()
    # This run's outcomes only (the embedded database keeps earlier demos' rows).
    mine = (worker.worker_id,)
    outcomes = dict(await fetch(url, queries.OUTCOMES_BY_STATUS_OF_WORKER, mine))
    reasons = dict(await fetch(url, queries.FAILURE_REASONS_OF_WORKER, mine))
    sample = await fetch_value(url, queries.LATEST_SUCCESS_RESULT)
    c = status["counters"]
    q2s = status["queue_to_start_ms"]
    summary = {
        "steps": total,
        "seconds": round(elapsed, 2),
        "steps_per_s": round(total / elapsed, 1),
        "queue_to_start_ms": {src: q2s[src] for src in ("event", "poll")},
        "claimed": {"event": c["claimed_event"], "poll": c["claimed_poll"]},
        "outcomes": outcomes,
        "failure_reasons": reasons,
        "notifications": c["notifications_received"],
        "dedup_hits": c["dedup_hits"],
        "stale_acks": c["stale_acks"],
    }
    print(
        f"\nprocessed {total} planning steps in {elapsed:.2f}s = {total / elapsed:.1f} steps/s "
        f"(Hybrid, concurrency {loaded.config.event_system.max_concurrent_processors})"
    )
    for src in ("event", "poll"):
        p = q2s[src]
        if p["p50"] is not None:
            print(
                f"  queue-to-start by {src:<5}: p50 {p['p50']:.1f} ms  p99 {p['p99']:.1f} ms  "
                f"({c['claimed_' + src]} claimed)"
            )
    print(
        f"  outcomes: {', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}"
        + (f"  (reasons: {', '.join(f'{k} {v}' for k, v in reasons.items())})" if reasons else "")
    )
    if sample:
        wp = sample["waypoints"]
        print(
            f"  last path: {sample['algorithm']}, {len(wp)} waypoints, {sample['length']:.2f} m, "
            f"arrives t={wp[-1]['t']:.1f}s, {sample['expanded_nodes']} nodes in {sample['planning_ms']:.1f} ms"
        )
    if args.json:
        print(json.dumps(summary, default=str))
    if embedded is not None:
        how = "started by this demo" if embedded.started else f"started by {embedded.describe_starter()}"
        print(
            f"\nthe embedded server in {embedded.data_dir} ({how}) keeps running for the next command: "
            "`tasker-worker db url` prints its URL, `tasker-worker db stop` stops it"
        )
    return 0


async def _value(conn: psycopg.AsyncConnection[Any], query: str | sql.Composed) -> Any:
    row = await (await conn.execute(query)).fetchone()
    return row[0] if row else None


async def _count_at_least(url: str, n: int) -> bool:
    return bool(await fetch_value(url, queries.OUTCOME_COUNT) >= n)


def add_command(sub: Any, command: Any) -> None:
    """Wire ``demo`` into the parser."""
    p = command(sub, "demo", demo, "run planning steps end to end on the embedded database")
    p.add_argument("--steps", type=int, default=300, help="how many planning steps (default 300)")
    p.add_argument("--size", type=int, default=64, help="grid side in cells (default 64)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for all outcomes")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
