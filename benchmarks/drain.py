"""Drain and idle-cost benchmark of tasker-worker on the embedded PostgreSQL.

Drain: enqueue N ``noop`` steps with ``pgmq.send_batch`` (the enqueue rate is reported on its
own), start one ``tasker-worker run`` process, and time from the first handler start to the
last outcome recorded. Per deployment mode and concurrency, with the event log's step events
on and off (its cost on the hot path). Every run checks exactly-once: N distinct outcomes, an
empty queue.

Idle cost: transactions per second an idle worker makes the server commit (from
``pg_stat_database``; in autocommit every statement is its own transaction).

    python benchmarks/drain.py                      # 20,000 steps, every mode, concurrency 1 and 16
    python benchmarks/drain.py --steps 5000 --modes Hybrid --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasker_worker.db.embedded import temporary_embedded  # noqa: E402
from tasker_worker.domain.steps import StepMessage  # noqa: E402

NS = "bench"
QUEUE = f"worker_{NS}_queue"
BATCH = 1000


def fresh_database(admin: str, name: str) -> str:
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    env = {**os.environ, "TASKER_DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", "db", "migrate"], env=env, check=True, capture_output=True
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return url


def worker_env(url: str, step_events: bool) -> dict[str, str]:
    return {
        **os.environ,
        "TASKER_DATABASE_URL": url,
        "TASKER_ENV": "production",
        "TASKER__WORKER__NAMESPACES": f'["{NS}"]',
        "TASKER__LOGGING__LEVEL": "WARNING",
        "TASKER__EVENTS__STEP_EVENTS": "true" if step_events else "false",
        "TASKER__DATABASE__AUTO_MIGRATE": "false",
    }


def enqueue(url: str, steps: int) -> float:
    """Send ``steps`` noop steps in batches; return steps/s."""
    bodies = [Jsonb(StepMessage.build(NS, "noop", {"i": i})) for i in range(steps)]
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(0, steps, BATCH):
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, bodies[i : i + BATCH]))
    return steps / (time.perf_counter() - t0)


def drain(admin: str, mode: str, concurrency: int, steps: int, step_events: bool) -> dict[str, Any]:
    url = fresh_database(admin, "bench_drain")
    enqueue_rate = enqueue(url, steps)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", mode, "--concurrency", str(concurrency)],
        env=worker_env(url, step_events),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 900
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()
                if row and row[0] >= steps:
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited: {proc.stderr.read() if proc.stderr else ''}")
                time.sleep(0.1)
            first, last, distinct, succeeded = conn.execute(
                "SELECT min(started_at), max(recorded_at), count(DISTINCT step_uuid),"
                " count(*) FILTER (WHERE status = 'succeeded') FROM tasker.step_results"
            ).fetchone()
            left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()[0]
            events = conn.execute("SELECT count(*) FROM tasker.events WHERE step_uuid IS NOT NULL").fetchone()[0]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    seconds = (last - first).total_seconds()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "step_events": step_events,
        "steps": steps,
        "exactly_once": distinct == steps == succeeded and left == 0,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 1),
        "enqueue_per_s": round(enqueue_rate, 1),
        "step_events_logged": events,
    }


def idle_cost(admin: str, mode: str, seconds: float) -> dict[str, Any]:
    url = fresh_database(admin, "bench_idle")
    dbname = "bench_idle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", mode],
        env=worker_env(url, True),
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(5)  # benchmark warm-up, not synchronisation: startup traffic is not idle traffic

        def committed() -> int:
            # Read from another database so that the measurement is not counted.
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_stat_clear_snapshot()")
                row = conn.execute(
                    "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s", (dbname,)
                ).fetchone()
                return int(row[0]) if row else 0

        before = committed()
        time.sleep(seconds)
        after = committed()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"mode": mode, "seconds": seconds, "transactions_per_s": round((after - before) / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--modes", nargs="+", default=["PollingOnly", "Hybrid", "EventDrivenOnly"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--step-events", choices=["on", "off", "both"], default="both")
    parser.add_argument("--idle-seconds", type=float, default=30.0, help="0 skips the idle-cost runs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "drain.json")
    args = parser.parse_args()
    events = {"on": [True], "off": [False], "both": [True, False]}[args.step_events]

    rows: list[dict[str, Any]] = []
    idle: list[dict[str, Any]] = []
    with temporary_embedded(prefix="tasker-bench-") as (admin, _):
        print(
            f"{'mode':<16} {'conc':>4} {'events':>6} {'steps':>6} {'seconds':>8} {'steps/s':>8} "
            f"{'enqueue/s':>10} {'once':>5}"
        )
        for mode in args.modes:
            for conc in args.concurrency:
                for on in events:
                    r = drain(admin, mode, conc, args.steps, on)
                    rows.append(r)
                    print(
                        f"{mode:<16} {conc:>4} {'on' if on else 'off':>6} {r['steps']:>6} {r['seconds']:>8} "
                        f"{r['steps_per_s']:>8} {r['enqueue_per_s']:>10} {r['exactly_once']!s:>5}",
                        flush=True,
                    )
        if args.idle_seconds > 0:
            print(f"\n{'mode':<16} {'idle transactions/s':>20}")
            for mode in args.modes:
                r = idle_cost(admin, mode, args.idle_seconds)
                idle.append(r)
                print(f"{mode:<16} {r['transactions_per_s']:>20}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"drain": rows, "idle": idle}, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
