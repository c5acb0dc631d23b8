"""Planning benchmark: the planners' kernels against scipy.sparse.csgraph, and steps/s through
the runtime.

    .venv/bin/python benchmarks/planning.py [--sizes 512 2048] [--repeats 3] [--steps 400]
                                            [--skip-runtime] [--json out.json]

Kernels: on grids of each size — open, 20% random obstacles (fixed seed), a perfect maze
(randomized depth-first search, 1-cell corridors) — from one corner to the opposite one, the
median time of A*, Dijkstra and Theta* (compiled kernels, from the boolean grid to the path:
the grid's preparation and the path's tracing included) against scipy's compiled
``csgraph.dijkstra`` on the same 8-connected graph, both with its graph's construction
(``ratio``, the issue's measure) and without it (``vs search``: the graph built beforehand).
Costs are checked against scipy's: A* and Dijkstra equal (1e-9), Theta* never longer.

Runtime: ``--steps`` path_plan steps (A*, distinct random 20% grids, corner to corner) at
128x128 and 512x512 through a real worker (``tasker-worker run``, thread executor) with 1 and 2
processes on the embedded PostgreSQL, once each process has planned a warm-up step with the
compiled kernels (which a process loads on its first planning step; ``first step ms`` is how
long the first warm-up step took from enqueueing to its outcome); steps/s from the first start
to the last outcome.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference import grid_graph, reference_cost  # noqa: E402
from scipy.sparse.csgraph import dijkstra as scipy_dijkstra  # noqa: E402

from tasker_worker.db.embedded import temporary_embedded  # noqa: E402
from tasker_worker.handlers.planning import engine  # noqa: E402
from tasker_worker.handlers.planning.grid import encode_cells  # noqa: E402

SIZES = (512, 2048)
KINDS = ("open", "random", "maze")
SEED = 20261122
RUNTIME_SIZES = (128, 512)


def make_grid(n: int, seed: int = SEED) -> np.ndarray:
    """20% random obstacles, the corners and their neighbours free (a path usually exists)."""
    rng = np.random.default_rng(seed + n)
    blocked = rng.random((n, n)) < 0.2
    blocked[:2, :2] = False
    blocked[-2:, -2:] = False
    return blocked


# The 24 orders of the four directions, one drawn per step of the maze's walk.
_ORDERS = [
    (a, b, c, d) for a in range(4) for b in range(4) for c in range(4) for d in range(4) if len({a, b, c, d}) == 4
]


def make_maze(n: int, seed: int = SEED) -> np.ndarray:
    """A perfect maze on an ``n x n`` grid: corridors one cell wide on the odd rows and columns
    (randomized depth-first search, so one long winding way between any two cells); the last
    row and column stay blocked when ``n`` is even. Free corners: (1, 1) and ``maze_goal(n)``."""
    size = n - 1 if n % 2 == 0 else n
    m = (size - 1) // 2
    rng = np.random.default_rng(seed + n)
    blocked = np.ones((n, n), dtype=bool)
    flat = blocked.reshape(-1)
    visited = bytearray(m * m)
    draws = rng.integers(0, len(_ORDERS), size=2 * m * m).tolist()
    dirs = ((0, 1), (1, 0), (0, -1), (-1, 0))
    stack = [0]
    visited[0] = 1
    flat[n + 1] = False
    k = 0
    while stack:
        u = stack[-1]
        i, j = divmod(u, m)
        for d in _ORDERS[draws[k]]:
            di, dj = dirs[d]
            a, b = i + di, j + dj
            if 0 <= a < m and 0 <= b < m and not visited[a * m + b]:
                visited[a * m + b] = 1
                flat[(2 * i + 1 + di) * n + 2 * j + 1 + dj] = False
                flat[(2 * a + 1) * n + 2 * b + 1] = False
                stack.append(a * m + b)
                break
        else:
            stack.pop()
        k += 1
    return blocked


def maze_goal(n: int) -> tuple[int, int]:
    """The maze's far corner cell."""
    size = n - 1 if n % 2 == 0 else n
    return size - 2, size - 2


def case(kind: str, n: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Grid, start and goal of one benchmark case."""
    if kind == "open":
        return np.zeros((n, n), dtype=bool), (0, 0), (n - 1, n - 1)
    if kind == "random":
        return make_grid(n), (0, 0), (n - 1, n - 1)
    return make_maze(n), (1, 1), maze_goal(n)


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float], Any]:
    """Median ms, every time in ms, and the last result."""
    times = []
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times, result


def kernels(sizes: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """The kernels against scipy on every case."""
    rows = []
    for n in sizes:
        for kind in KINDS:
            blocked, start, goal = case(kind, n)
            w = blocked.shape[1]
            ref_ms, _, ref_cost = timed(lambda b=blocked, s=start, g=goal: reference_cost(b, s, g, 8), repeats)
            graph = grid_graph(blocked, 8)
            search_ms, _, _ = timed(
                lambda gr=graph, i=start[0] * w + start[1]: scipy_dijkstra(gr, directed=True, indices=i), repeats
            )
            del graph
            row: dict[str, Any] = {
                "size": n,
                "kind": kind,
                "scipy_ms": round(ref_ms, 1),
                "scipy_search_ms": round(search_ms, 1),
                "reference_cost": ref_cost,
            }
            for name, fn in (("astar", engine.astar), ("dijkstra", engine.dijkstra), ("theta_star", engine.theta_star)):
                ms, times, res = timed(lambda f=fn, b=blocked, s=start, g=goal: f(b, s, g, kernel="compiled"), repeats)
                row[f"{name}_ms"] = round(ms, 1)
                row[f"{name}_times_ms"] = [round(t, 1) for t in times]
                row[f"{name}_cost"] = None if res is None else res.cost
                row[f"{name}_expanded"] = None if res is None else res.expanded
                row[f"{name}_ratio"] = round(ms / ref_ms, 3)
                row[f"{name}_vs_search"] = round(ms / search_ms, 3)
            row["costs_agree"] = bool(
                row["astar_cost"] is not None
                and abs(row["astar_cost"] - ref_cost) <= 1e-9 * max(1.0, ref_cost)
                and abs(row["dijkstra_cost"] - ref_cost) <= 1e-9 * max(1.0, ref_cost)
                and row["theta_star_cost"] <= ref_cost + 1e-9
            )
            rows.append(row)
            print(_kernel_line(row), flush=True)
    return rows


def _kernel_header() -> str:
    return (
        f"{'grid':>14} {'scipy ms':>9} {'search ms':>10} {'A* ms':>8} {'ratio':>6} {'vs search':>9} "
        f"{'Dijkstra':>9} {'ratio':>6} {'vs search':>9} {'Theta*':>8} {'ratio':>6} {'vs search':>9} "
        f"{'A* expanded':>12} {'costs':>6}"
    )


def _kernel_line(r: dict[str, Any]) -> str:
    return (
        f"{r['size']:>6}² {r['kind']:>6} {r['scipy_ms']:>9} {r['scipy_search_ms']:>10} "
        f"{r['astar_ms']:>8} {r['astar_ratio']:>6.2f} {r['astar_vs_search']:>9.2f} "
        f"{r['dijkstra_ms']:>9} {r['dijkstra_ratio']:>6.2f} {r['dijkstra_vs_search']:>9.2f} "
        f"{r['theta_star_ms']:>8} {r['theta_star_ratio']:>6.2f} {r['theta_star_vs_search']:>9.2f} "
        f"{r['astar_expanded']!s:>12} {'agree' if r['costs_agree'] else 'DIFFER':>6}"
    )


def _plan_inputs(size: int, seed: int) -> dict[str, Any]:
    return {
        "grid": {"width": size, "height": size, "resolution": 1.0, "cells": encode_cells(make_grid(size, seed))},
        "start": {"x": 0.5, "y": 0.5},
        "goal": {"x": size - 0.5, "y": size - 0.5},
        "algorithm": "astar",
    }


def runtime_throughput(steps: int, processes: int, admin: str, size: int = 128, warmup: int = 10) -> dict[str, Any]:
    """Run a worker with ``processes`` processes and let it plan warm-up steps, ``warmup`` at a
    time, until each of its processes has planned one with the compiled kernels (they load them
    on their first planning step; ``first_ms`` is how long the first warm-up step took from
    enqueueing to its outcome, ``warmup_steps`` how many it took); then enqueue ``steps``
    ``size``x``size`` A* steps (a distinct random grid each) and report their steps/s, from the
    first start to the last outcome."""
    import psycopg
    from psycopg.types.json import Jsonb

    from tasker_worker.domain.steps import StepMessage

    dbname = f"bench_planning_{size}_{processes}"
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
    # Built before the worker starts, so that the producer does not share the cores with it.
    warm = [StepMessage.build("planning", "path_plan", _plan_inputs(size, SEED - 1 - i)) for i in range(20 * warmup)]
    measured = [StepMessage.build("planning", "path_plan", _plan_inputs(size, SEED + 1000 * i)) for i in range(steps)]
    ids = [m["step_uuid"] for m in measured]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('planning')")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", "Hybrid", "--processes", str(processes)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        with psycopg.connect(url, autocommit=True) as conn:

            def send(bodies: list[dict[str, Any]]) -> None:
                for first in range(0, len(bodies), 100):
                    batch = [Jsonb(b) for b in bodies[first : first + 100]]
                    conn.execute("SELECT pgmq.send_batch('worker_planning_queue', %s::jsonb[])", (batch,))

            def wait(n: int) -> None:
                while time.monotonic() < deadline:
                    if conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()[0] >= n:
                        return
                    time.sleep(0.1)
                raise TimeoutError(f"fewer than {n} outcomes after 600 s")

            sent = time.monotonic()
            send(warm[:warmup])
            wait(1)
            first_ms = (time.monotonic() - sent) * 1000.0
            done = warmup
            wait(done)
            compiled_by = (
                "SELECT count(DISTINCT worker_id) FROM tasker.step_results WHERE result->>'kernel' = 'compiled'"
            )
            while conn.execute(compiled_by).fetchone()[0] < processes and done < len(warm):
                send(warm[done : done + warmup])
                done += warmup
                wait(done)
            send(measured)
            wait(done + steps)
            first, last, ok, compiled = conn.execute(
                "SELECT min(started_at), max(finished_at), count(*) FILTER (WHERE status = 'succeeded'), "
                "count(*) FILTER (WHERE result->>'kernel' = 'compiled') FROM tasker.step_results "
                "WHERE step_uuid = ANY(%s::uuid[])",
                (ids,),
            ).fetchone()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    seconds = (last - first).total_seconds()
    return {
        "size": size,
        "processes": processes,
        "steps": steps,
        "succeeded": ok,
        "compiled": compiled,
        "first_ms": round(first_ms),
        "warmup_steps": done,
        "seconds": round(seconds, 2),
        "steps_per_s": round(steps / seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "planning.json")
    parser.add_argument("--skip-runtime", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    args = parser.parse_args()

    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    t0 = time.perf_counter()
    if not engine.load_kernels(wait=True):
        sys.exit(f"compiled kernels unavailable: {engine.kernels_state()[1]}")
    print(f"compiled kernels loaded in {time.perf_counter() - t0:.2f}s (numba's cache, or compiled now)\n")
    rows: list[dict[str, Any]] = []
    if not args.skip_kernels:
        print(_kernel_header())
        rows = kernels(tuple(args.sizes), args.repeats)
    runtime: list[dict[str, Any]] = []
    if not args.skip_runtime:
        print(
            f"\n{'grid':>6} {'processes':>9} {'first step ms':>13} {'steps':>6} {'succeeded':>9} {'compiled':>8} "
            f"{'seconds':>8} {'steps/s':>8}"
        )
        with temporary_embedded(prefix="tasker-bench-") as (admin, _):
            for size in RUNTIME_SIZES:
                for processes in (1, 2):
                    r = runtime_throughput(args.steps, processes, admin, size)
                    runtime.append(r)
                    print(
                        f"{r['size']:>5}² {r['processes']:>9} {r['first_ms']:>13} {r['steps']:>6} {r['succeeded']:>9} "
                        f"{r['compiled']:>8} {r['seconds']:>8} {r['steps_per_s']:>8}",
                        flush=True,
                    )
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"kernels": rows, "runtime": runtime}, indent=2, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
