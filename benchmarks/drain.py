"""Drain benchmark of tasker-worker.

Enqueue N ``noop`` steps with ``pgmq.send_batch`` (the enqueue rate is reported on its own),
start one ``tasker-worker run`` process (or ``--processes K`` under its supervisor), and time
from the first handler start to the last outcome recorded. Per deployment mode, concurrency,
step events (derived, the default, or stored) and archive (off, the default, or on); the CPU
time per step of the worker processes and of the database server (when it runs on this machine)
is reported too. Every run checks exactly-once: N distinct outcomes, all succeeded, an empty
queue (and N archived messages with the archive on).

    python benchmarks/drain.py                       # 20,000 steps, every mode, concurrency 16, 128, 512
    python benchmarks/drain.py --modes Hybrid --concurrency 256 --step-events both --archive both
    python benchmarks/drain.py --modes Hybrid --concurrency 256 --processes 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from common import (
    QUEUE,
    RESULTS,
    ServerCpu,
    enqueue_steps,
    machine,
    print_table,
    process_tree_cpu,
    server,
    start_worker,
    stop,
    tasker_database,
    wait_for,
    write_json,
)

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
COLUMNS = [
    ("mode", "mode"),
    ("concurrency", "conc"),
    ("step_events", "events"),
    ("archive", "archive"),
    ("processes", "procs"),
    ("steps", "steps"),
    ("seconds", "seconds"),
    ("steps_per_s", "steps/s"),
    ("enqueue_per_s", "enqueue/s"),
    ("worker_cpu_us_per_step", "worker CPU us/step"),
    ("server_cpu_us_per_step", "server CPU us/step"),
    ("exactly_once", "exactly once"),
]


def drain(
    admin: str,
    mode: str,
    concurrency: int,
    steps: int,
    step_events: str = "derived",
    archive: bool = False,
    processes: int = 1,
) -> dict[str, Any]:
    """One drain run on a fresh database."""
    url = tasker_database(admin, "bench_drain")
    enqueue_rate = enqueue_steps(url, steps)
    server_cpu = ServerCpu(url)
    proc = start_worker(url, mode, concurrency, processes, step_events=step_events, archive=archive)
    try:
        worker = psutil.Process(proc.pid)
        with psycopg.connect(url, autocommit=True) as conn:

            def recorded() -> int:
                row = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()
                return int(row[0]) if row else 0

            wait_for(lambda: recorded() > 0, 120, "the first outcome", proc)
            cpu0 = process_tree_cpu(worker)
            server_cpu.start()
            # The times come from the outcome rows, not from this loop, so it can look rarely:
            # a count(*) every 20 ms was several percent of a core taken from the drain.
            wait_for(lambda: recorded() >= steps, 900, f"{steps} outcomes", proc, interval=0.25)
            cpu1 = process_tree_cpu(worker)
            server_s = server_cpu.seconds()
            first, last, distinct, succeeded = conn.execute(
                "SELECT min(started_at), max(recorded_at), count(DISTINCT step_uuid),"
                " count(*) FILTER (WHERE status = 'succeeded') FROM tasker.step_results"
            ).fetchone()
            left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()[0]
            archived = conn.execute(f"SELECT count(*) FROM pgmq.a_{QUEUE}").fetchone()[0]
    finally:
        stop(proc)
    seconds = (last - first).total_seconds()
    return {
        "mode": mode,
        "concurrency": concurrency,
        "step_events": step_events,
        "archive": archive,
        "processes": processes,
        "steps": steps,
        "exactly_once": distinct == steps == succeeded and left == 0 and archived == (steps if archive else 0),
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 1),
        "enqueue_per_s": round(enqueue_rate, 1),
        # From the first outcome on: the start-up is not part of the per-step cost.
        "worker_cpu_us_per_step": round((cpu1 - cpu0) / steps * 1e6, 1),
        # Includes this script's count(*) every 250 ms and the server's background processes.
        "server_cpu_us_per_step": round(server_s / steps * 1e6, 1) if server_s is not None else None,
    }


def run(
    admin: str,
    modes: list[str],
    concurrency: list[int],
    steps: int,
    events: list[str] | None = None,
    archive: list[bool] | None = None,
    processes: int = 1,
) -> list[dict[str, Any]]:
    """Every combination, printed as it completes."""
    rows = []
    for mode in modes:
        for conc in concurrency:
            for ev in events or ["derived"]:
                for arch in archive or [False]:
                    rows.append(drain(admin, mode, conc, steps, ev, arch, processes))
                    r = rows[-1]
                    print(
                        f"  {mode} c{conc} events={ev} archive={'on' if arch else 'off'} processes={processes}:"
                        f" {r['steps_per_s']:,.0f} steps/s (exactly once: {r['exactly_once']})",
                        flush=True,
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 128, 512])
    parser.add_argument("--step-events", choices=["derived", "stored", "both"], default="derived")
    parser.add_argument("--archive", choices=["off", "on", "both"], default="off")
    parser.add_argument("--processes", type=int, default=1, help="worker processes under one supervisor")
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "drain.json")
    args = parser.parse_args()
    events = {"derived": ["derived"], "stored": ["stored"], "both": ["derived", "stored"]}[args.step_events]
    archive = {"off": [False], "on": [True], "both": [False, True]}[args.archive]
    started = time.time()
    with server(args.url) as (admin, _):
        rows = run(admin, args.modes, args.concurrency, args.steps, events, archive, args.processes)
    print_table(rows, COLUMNS, "drain (noop steps)")
    write_json(args.json, {"machine": machine(), "started": started, "drain": rows})


if __name__ == "__main__":
    main()
