"""Planning benchmark: the planners against scipy.sparse.csgraph, and steps/s through the runtime.

    .venv/bin/python benchmarks/planning.py [--repeats 5] [--steps 400] [--json out.json]

Grids of 128^2, 512^2 and 1024^2 with 20% random obstacles (fixed seed), start and goal at
opposite corners. Prints the median time of each algorithm and of scipy's Dijkstra (graph
building included), then drives 128^2 path_plan steps through a real worker with 1 and 2
processes on the embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference import reference_cost  # noqa: E402

from tasker_worker.db.embedded import temporary_embedded  # noqa: E402
from tasker_worker.handlers.planning.grid import encode_cells  # noqa: E402
from tasker_worker.handlers.planning.search import astar, dijkstra, theta_star  # noqa: E402

SIZES = (128, 512, 1024)
SEED = 20261122


def make_grid(n: int, seed: int = SEED) -> np.ndarray:
    rng = np.random.default_rng(seed + n)
    blocked = rng.random((n, n)) < 0.2
    # Keep the corners and their neighbours open so a path usually exists.
    blocked[:2, :2] = False
    blocked[-2:, -2:] = False
    return blocked


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0, result


def algorithms(repeats: int) -> list[dict[str, Any]]:
    rows = []
    for n in SIZES:
        blocked = make_grid(n)
        start, goal = (0, 0), (n - 1, n - 1)
        ref_ms, ref_cost = timed(lambda b=blocked, s=start, g=goal: reference_cost(b, s, g, 8), repeats)
        row: dict[str, Any] = {"size": n, "scipy_dijkstra_ms": round(ref_ms, 1), "reference_cost": ref_cost}
        for name, fn in (("astar", astar), ("dijkstra", dijkstra), ("theta_star", theta_star)):
            if name == "theta_star":
                ms, res = timed(lambda f=fn, b=blocked, s=start, g=goal: f(b, s, g), repeats)
            else:
                ms, res = timed(lambda f=fn, b=blocked, s=start, g=goal: f(b, s, g, 8), repeats)
            row[f"{name}_ms"] = round(ms, 1)
            row[f"{name}_cost"] = None if res is None else res.cost
            row[f"{name}_expanded"] = None if res is None else res.expanded
            row[f"{name}_vs_scipy"] = round(ms / ref_ms, 2)
        rows.append(row)
    return rows


def runtime_throughput(steps: int, processes: int, admin: str) -> dict[str, Any]:
    """Enqueue ``steps`` 128^2 path_plan steps, run a worker with ``processes`` processes until
    every outcome is recorded, and report steps/s (from the first to the last outcome)."""
    import psycopg
    from psycopg.types.json import Jsonb

    from tasker_worker.domain.steps import StepMessage

    dbname = f"bench_planning_{processes}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {dbname}")
    url = psycopg.conninfo.make_conninfo(admin, dbname=dbname)
    env = {
        **os.environ,
        "TASKER_DATABASE_URL": url,
        "TASKER__WORKER__NAMESPACES": '["planning"]',
        "TASKER__LOGGING__LEVEL": "WARNING",
        "TASKER__WORKER__EXECUTOR": "thread",
    }
    subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", "db", "migrate"], env=env, check=True, capture_output=True
    )
    blocked = make_grid(128)
    inputs = {
        "grid": {"width": 128, "height": 128, "resolution": 1.0, "cells": encode_cells(blocked)},
        "start": {"x": 0.5, "y": 0.5},
        "goal": {"x": 127.5, "y": 127.5},
        "algorithm": "astar",
    }
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('planning')")
        bodies = [Jsonb(StepMessage.build("planning", "path_plan", inputs)) for _ in range(steps)]
        conn.execute("SELECT pgmq.send_batch('worker_planning_queue', %s::jsonb[])", (bodies,))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", "Hybrid", "--processes", str(processes)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        with psycopg.connect(url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                done = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()[0]
                if done >= steps:
                    break
                time.sleep(0.2)
            first, last, ok = conn.execute(
                "SELECT min(started_at), max(finished_at), count(*) FILTER (WHERE status = 'succeeded') "
                "FROM tasker.step_results"
            ).fetchone()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seconds = (last - first).total_seconds()
    return {
        "processes": processes,
        "steps": steps,
        "succeeded": ok,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "planning.json")
    parser.add_argument("--skip-runtime", action="store_true")
    args = parser.parse_args()

    rows = algorithms(args.repeats)
    print(
        f"{'grid':>6} {'scipy ms':>9} {'A* ms':>8} {'ratio':>6} {'Dijkstra ms':>12} {'ratio':>6} "
        f"{'Theta* ms':>10} {'ratio':>6} {'A* expanded':>12} {'costs agree':>12}"
    )
    for r in rows:
        agree = r["astar_cost"] is not None and abs(r["astar_cost"] - r["reference_cost"]) < 1e-9
        print(
            f"{r['size']:>5}² {r['scipy_dijkstra_ms']:>9} {r['astar_ms']:>8} {r['astar_vs_scipy']:>6} "
            f"{r['dijkstra_ms']:>12} {r['dijkstra_vs_scipy']:>6} {r['theta_star_ms']:>10} "
            f"{r['theta_star_vs_scipy']:>6} {r['astar_expanded']!s:>12} {agree!s:>12}"
        )
    runtime: list[dict[str, Any]] = []
    if not args.skip_runtime:
        with temporary_embedded(prefix="tasker-bench-") as (admin, _):
            for processes in (1, 2):
                runtime.append(runtime_throughput(args.steps, processes, admin))
        print(f"\n{'processes':>9} {'steps':>6} {'seconds':>8} {'steps/s':>8}")
        for r in runtime:
            print(f"{r['processes']:>9} {r['steps']:>6} {r['seconds']:>8} {r['steps_per_s']:>8}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"planners": rows, "runtime": runtime}, indent=2, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
