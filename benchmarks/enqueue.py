"""Batch enqueue: how fast each system's documented bulk API puts no-op jobs in its queue.

- tasker-worker ``AsyncClient.send_steps`` and ``Client.send_steps``: messages built and
  checked in Python (the rules of ``tasker.step_message``), one ``pgmq.send_batch`` statement
  per 1,000.
- PgQueuer ``Queries.enqueue`` with lists of 1,000, Procrastinate ``batch_defer_async`` of 1,000.
- For reference, the path the benchmarks used before the client: ``pgmq.send_batch`` with one
  ``Jsonb`` parameter per message.

Each round enqueues ``--steps`` jobs per system on a fresh database; rounds alternate the systems
(so a slow minute of the machine hits all of them) and the table shows each one's median.

    python benchmarks/enqueue.py
    python benchmarks/enqueue.py --steps 50000 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from common import NS, RESULTS, database, enqueue_steps, machine, print_table, server, tasker_database, write_json
from systems import PgQueuer, Procrastinate

from tasker_worker import AsyncClient, Client

BATCH = 1000


def tasker_async(url: str, steps: int) -> float:
    """``AsyncClient.send_steps`` in batches of 1,000; steps/s."""

    async def go() -> float:
        async with AsyncClient(url, max_size=1) as client:
            t0 = time.perf_counter()
            for k in range(0, steps, BATCH):
                await client.send_steps(NS, "noop", [{"i": i} for i in range(k, min(steps, k + BATCH))])
            return steps / (time.perf_counter() - t0)

    return anyio.run(go)


def tasker_sync(url: str, steps: int) -> float:
    """``Client.send_steps`` in batches of 1,000; steps/s."""
    with Client(url, max_size=1) as client:
        t0 = time.perf_counter()
        for k in range(0, steps, BATCH):
            client.send_steps(NS, "noop", [{"i": i} for i in range(k, min(steps, k + BATCH))])
        return steps / (time.perf_counter() - t0)


def systems() -> list[tuple[str, Callable[[str], str], Callable[[str, int], float]]]:
    """(label, make a fresh database and return its URL, enqueue N and return jobs/s)."""
    pgq = PgQueuer(100)
    pro = Procrastinate(1)
    return [
        ("tasker AsyncClient.send_steps", lambda admin: tasker_database(admin, "bench_enq"), tasker_async),
        ("tasker Client.send_steps", lambda admin: tasker_database(admin, "bench_enq"), tasker_sync),
        (
            "tasker pgmq.send_batch (Jsonb per message)",
            lambda admin: tasker_database(admin, "bench_enq"),
            enqueue_steps,
        ),
        ("PgQueuer enqueue (lists)", lambda admin: anyio.run(pgq.install, admin, "bench_enq"), pgq.enqueue_noop),
        (
            "Procrastinate batch_defer_async",
            lambda admin: anyio.run(pro.install, admin, "bench_enq"),
            pro.enqueue_noop,
        ),
    ]


def main() -> None:
    """Parse arguments, run the rounds, print and store the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "enqueue.json")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {}
    with server(args.url) as (admin, _):
        for _ in range(args.rounds):
            for label, make, enqueue in systems():
                url = make(admin)
                rates.setdefault(label, []).append(enqueue(url, args.steps))
        database(admin, "bench_enq")  # leave nothing big behind
    rows: list[dict[str, Any]] = [
        {
            "system": label,
            "steps": args.steps,
            "median_per_s": round(statistics.median(r), 1),
            "rounds": ", ".join(f"{x:,.0f}" for x in r),
        }
        for label, r in rates.items()
    ]
    pgq = next(r["median_per_s"] for r in rows if r["system"].startswith("PgQueuer"))
    for row in rows:
        row["vs_pgqueuer"] = round(row["median_per_s"] / pgq, 2)
    print_table(
        rows,
        [
            ("system", "system"),
            ("steps", "jobs"),
            ("median_per_s", "jobs/s (median)"),
            ("vs_pgqueuer", "x PgQueuer"),
            ("rounds", "each round"),
        ],
        title="batch enqueue, 1,000 per statement",
    )
    write_json(args.json, {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
