"""Idle cost: statements per second a worker with nothing to do sends to the database.

Counted by the server itself: ``log_statement = 'all'`` on the benchmark database and the
statement lines of the embedded server's log (so it needs the temporary embedded server; every
statement counts, inside transactions too). tasker-worker runs as ``tasker-worker run`` with the
production config in each deployment mode (registry heartbeats and the supervisor included);
the peers run with their defaults. After a 5 s warm-up (start-up is not idle), statements are
counted over a window (60 s by default).

    python benchmarks/idle.py
    python benchmarks/idle.py --seconds 20 --skip-peers
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
from common import RESULTS, StatementLog, machine, print_table, server, start_worker, stop, tasker_database, write_json
from systems import PgQueuer, Procrastinate, child_argv

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
WARMUP_S = 5.0
COLUMNS = [
    ("system", "system"),
    ("seconds", "window s"),
    ("statements", "statements"),
    ("statements_per_s", "statements/s"),
]


def _count(counter: StatementLog, seconds: float, proc: subprocess.Popen[str]) -> int:
    # A benchmark warm-up, not synchronisation: start-up traffic is not idle traffic.
    time.sleep(WARMUP_S)
    if proc.poll() is not None:
        raise RuntimeError(f"worker exited: {proc.communicate()[1][-2000:] if proc.stderr else ''}")
    counter.mark()
    time.sleep(seconds)
    return counter.count()


def tasker_idle(admin: str, data_dir: Path, mode: str, seconds: float) -> dict[str, Any]:
    """One idle tasker worker in ``mode``."""
    url = tasker_database(admin, "bench_idle")
    counter = StatementLog(admin, data_dir, "bench_idle")  # before the worker connects
    proc = start_worker(url, mode)
    try:
        n = _count(counter, seconds, proc)
    finally:
        stop(proc)
    return {
        "system": f"tasker {mode}",
        "mode": mode,
        "seconds": seconds,
        "statements": n,
        "statements_per_s": round(n / seconds, 3),
    }


def peer_idle(admin: str, data_dir: Path, system: PgQueuer | Procrastinate, seconds: float) -> dict[str, Any]:
    """One idle peer worker."""
    url = anyio.run(system.install, admin, "bench_idle")
    counter = StatementLog(admin, data_dir, "bench_idle")
    proc = subprocess.Popen(
        child_argv(system, "idle", url),
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        n = _count(counter, seconds, proc)
    finally:
        try:
            proc.communicate(input="", timeout=60)  # closing stdin stops the child
        except subprocess.TimeoutExpired:
            stop(proc)
    return {"system": system.label, "seconds": seconds, "statements": n, "statements_per_s": round(n / seconds, 3)}


def run(admin: str, data_dir: Path, modes: list[str], seconds: float, peers: bool) -> list[dict[str, Any]]:
    """Every mode, then the peers."""
    rows = [tasker_idle(admin, data_dir, mode, seconds) for mode in modes]
    if peers:
        rows += [peer_idle(admin, data_dir, s, seconds) for s in (PgQueuer(10), Procrastinate(1))]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS / "idle.json")
    args = parser.parse_args()
    with server(None) as (admin, data_dir):
        assert data_dir is not None
        rows = run(admin, data_dir, args.modes, args.seconds, not args.skip_peers)
    print_table(rows, COLUMNS, "idle cost: statements per second sent by one idle worker")
    write_json(args.json, {"machine": machine(), "idle": rows})


if __name__ == "__main__":
    main()
