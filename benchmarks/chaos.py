"""The fault suite at full size: prints scenario, steps, lost, doubled, dead-lettered, recovery.

    python benchmarks/chaos.py                 # every scenario, full sizes (several minutes)
    python benchmarks/chaos.py --scale 0.1     # a tenth of the steps
    python benchmarks/chaos.py --only kill9 contention

The scenarios live in tests/chaos.py; the default test run (tests/test_faults.py) runs them at
reduced sizes. Each runs on a fresh database of an embedded PostgreSQL started here (the
restart scenario on a server of its own) and checks its ledger: lost and doubled must be 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import anyio
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import chaos  # noqa: E402

from tasker_worker.db import migrations  # noqa: E402
from tasker_worker.db.embedded import temporary_embedded  # noqa: E402

FULL = {
    "kill9": 5000,
    "restart_fast": 2000,
    "restart_immediate": 2000,
    "loss_hybrid": 2000,
    "loss_event_driven": 2000,
    "contention": 50_000,
    "poison": 3,
    "held_horizon": 2000,
}


def fresh_db(admin: str) -> str:
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)
    anyio.run(migrations.migrate, url)
    return url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every step count")
    parser.add_argument("--only", nargs="+", choices=sorted(FULL), help="run these scenarios only")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "chaos.json")
    args = parser.parse_args()
    size = {k: max(1, int(v * args.scale)) if k != "poison" else v for k, v in FULL.items()}

    results: list[chaos.Result] = []
    with temporary_embedded(prefix="tasker-chaos-") as (admin, _):
        runs: dict[str, Callable[[], chaos.Result]] = {
            "kill9": lambda: chaos.kill9(fresh_db(admin), size["kill9"]),
            "restart_fast": lambda: _restart(size["restart_fast"], "fast"),
            "restart_immediate": lambda: _restart(size["restart_immediate"], "immediate"),
            "loss_hybrid": lambda: chaos.connection_loss(fresh_db(admin), size["loss_hybrid"], "Hybrid"),
            "loss_event_driven": lambda: chaos.connection_loss(
                fresh_db(admin), size["loss_event_driven"], "EventDrivenOnly"
            ),
            "contention": lambda: chaos.contention(fresh_db(admin), size["contention"]),
            "poison": lambda: chaos.poison(fresh_db(admin)),
            "held_horizon": lambda: chaos.held_horizon(fresh_db(admin), size["held_horizon"]),
        }
        print(f"{'scenario':<34} {'steps':>6} {'lost':>5} {'doubled':>7} {'dlq':>5} {'recovery s':>10} {'seconds':>8}")
        for name, run in runs.items():
            if args.only and name not in args.only:
                continue
            r = run()
            results.append(r)
            recovery = "-" if r.recovery_s is None else f"{r.recovery_s:.3f}"
            print(
                f"{r.scenario:<34} {r.steps:>6} {r.lost:>5} {r.doubled:>7} {r.dead_lettered:>5} "
                f"{recovery:>10} {r.seconds:>8}",
                flush=True,
            )
    print()
    for r in results:
        print(f"{r.scenario}: {json.dumps(r.details, default=str)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps([r.row() for r in results], indent=2, default=str))
    print(f"\nwrote {args.json}")
    if any(r.lost or r.doubled for r in results):
        sys.exit(1)


def _restart(steps: int, mode: str) -> chaos.Result:
    with chaos.dedicated_server() as (url, restart):
        return chaos.pg_restart(url, restart, steps, mode)


if __name__ == "__main__":
    main()
