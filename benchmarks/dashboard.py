"""What the dashboard's overview costs the database as the queue grows.

For each queue size: the time of ``tasker.queue_glance(10000)`` (what the overview reads: depths
counted up to a cap, the oldest message through the msg_id index) beside ``pgmq.metrics_all()``
(what ``GET /api/queues`` and ``/metrics`` read: every queue table counted whole), and of the
whole overview page served by the app (glance, outcome buckets, health, fleet figures,
rendering; gathered anew each time). Medians of ``--repeat`` runs on a warm cache.

    python benchmarks/dashboard.py
    python benchmarks/dashboard.py --sizes 1000 100000 1000000 --repeat 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import anyio
import httpx
import psycopg
from common import NS, RESULTS, machine, print_table, server, tasker_database, write_json

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.api.dashboard.reads import OverviewCache
from tasker_worker.db.connection import open_pool
from tasker_worker.testing import make_config


def median_ms(run: Callable[[], object], repeat: int) -> float:
    """The median wall time of ``run`` in ms (one warm-up run first)."""
    run()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
    return round(statistics.median(samples) * 1000, 2)


def fill(url: str, size: int) -> None:
    """``size`` step messages in the namespace's queue (one INSERT, as pgmq.send_batch would)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE pgmq.q_worker_{NS}_queue")
        conn.execute(
            f"INSERT INTO pgmq.q_worker_{NS}_queue (vt, message)"
            " SELECT clock_timestamp(), jsonb_build_object('step_uuid', gen_random_uuid(), 'namespace', %s::text,"
            " 'handler', 'noop', 'inputs', '{}'::jsonb) FROM generate_series(1, %s)",
            (NS, size),
        )
        conn.execute(f"VACUUM ANALYZE pgmq.q_worker_{NS}_queue")


def overview_ms(url: str, repeat: int) -> float:
    """The median time of ``GET /`` with the overview gathered anew each time."""

    async def go() -> float:
        config = make_config()
        pool = await open_pool(url, config.database, max_size=2)
        try:
            app = create_app(ApiContext(pool, config))
            app.state.overview = OverviewCache(ttl_s=0)  # no sharing between requests here
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
                samples = []
                for i in range(repeat + 1):
                    t0 = time.perf_counter()
                    resp = await client.get("/")
                    assert resp.status_code == 200, resp.text
                    if i:
                        samples.append(time.perf_counter() - t0)
            return round(statistics.median(samples) * 1000, 2)
        finally:
            await pool.close()

    return anyio.run(go)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an admin URL of a server to use (default: a temporary embedded one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rows = []
    with server(args.url) as (admin, _):
        url = tasker_database(admin, "bench_dashboard")
        with psycopg.connect(url, autocommit=True) as conn:
            for size in args.sizes:
                fill(url, size)
                glance = median_ms(
                    lambda: conn.execute("SELECT * FROM tasker.queue_glance(10000)").fetchall(), args.repeat
                )
                metrics = median_ms(lambda: conn.execute("SELECT * FROM pgmq.metrics_all()").fetchall(), args.repeat)
                rows.append(
                    {
                        "messages": size,
                        "queue_glance_ms": glance,
                        "metrics_all_ms": metrics,
                        "overview_page_ms": overview_ms(url, args.repeat),
                    }
                )
    print_table(
        rows,
        [
            ("messages", "messages in the queue"),
            ("queue_glance_ms", "tasker.queue_glance ms"),
            ("metrics_all_ms", "pgmq.metrics_all ms"),
            ("overview_page_ms", "GET / ms"),
        ],
        title="The dashboard's overview against queue size (medians)",
    )
    write_json(RESULTS / "dashboard.json", {"machine": machine(), "rows": rows})


if __name__ == "__main__":
    main()
