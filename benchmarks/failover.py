"""Primary failover at full size: the figures of docs/reliability.md ("Failover").

    python benchmarks/failover.py                    # every drill, 3 runs each (a few minutes)
    python benchmarks/failover.py --runs 1 --only sync async
    python benchmarks/failover.py --scale 0.2        # fewer steps per drill

The drill lives in tests/failover.py (tests/test_failover.py runs it at reduced size): a
primary and a streaming standby of the embedded server's PostgreSQL 18 (tests/replication.py,
fsync on here), two Hybrid workers and a producer on the multi-host URL, the primary's WAL
sender stopped mid-stream, the primary killed with SIGKILL, the standby promoted with
`pg_ctl promote`. Each drill builds its own pair of servers and stops them. Exit 1 when a
synchronous drill lost an acknowledged send or any drill doubled a step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import failover  # noqa: E402
from replication import ReplicatedCluster  # noqa: E402

#: name: (synchronous standby, seconds the primary stays away before the promotion)
DRILLS: dict[str, tuple[bool, float]] = {
    "sync": (True, 0.0),
    "async": (False, 0.0),
    "sync_outage_10s": (True, 10.0),
}
FULL = {"before": 600, "while_frozen": 50, "after": 400}

COLUMNS = (
    ("sent", "sent"),
    ("lost_sends", "lost"),
    ("acked_while_frozen", "acked frozen"),
    ("rerun", "re-run"),
    ("doubled", "doubled"),
    ("forgotten_claims", "claims forgot"),
    ("settles_in_flight", "settles waiting"),
    ("promoted_s", "promoted s"),
    ("first_step_s", "1st step s"),
    ("first_step_after_promotion_s", "after promote s"),
    ("heartbeats_s", "heartbeats s"),
    ("listeners_s", "listen s"),
    ("supervisor_s", "lock s"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each drill")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the step counts")
    parser.add_argument("--only", nargs="*", choices=sorted(DRILLS), help="run these drills only (none: the lag only)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "failover.json")
    args = parser.parse_args()
    size = {k: max(5, int(v * args.scale)) for k, v in FULL.items()}

    rows: list[dict[str, Any]] = []
    print(f"{'drill':<18}" + "".join(f"{title:>16}" for _, title in COLUMNS))
    for name, (synchronous, outage_s) in DRILLS.items():
        if args.only is not None and name not in args.only:
            continue
        for run in range(args.runs):
            with ReplicatedCluster(synchronous=synchronous, fsync=True) as cluster:
                drill = failover.failover_drill(cluster, outage_s=outage_s, **size)
            row = {"drill": name, "run": run + 1, **drill.row()}
            rows.append(row)
            print(f"{name:<18}" + "".join(f"{_cell(row[key]):>16}" for key, _ in COLUMNS), flush=True)

    print()
    for name in DRILLS:
        mine = [r for r in rows if r["drill"] == name]
        if not mine:
            continue
        firsts = [r["first_step_s"] for r in mine if r["first_step_s"] is not None]
        print(
            f"{name}: first step after the kill median {statistics.median(firsts):.3f} s "
            f"(min {min(firsts):.3f}, max {max(firsts):.3f}); lost sends {[r['lost_sends'] for r in mine]}, "
            f"re-run {[r['rerun'] for r in mine]}, doubled {[r['doubled'] for r in mine]}"
        )
    lags = {}
    for synchronous in (False, True):
        with ReplicatedCluster(synchronous=synchronous, fsync=True) as cluster:
            lags["sync" if synchronous else "async"] = replay_lag(cluster)
    print(f"replay lag (a commit on the primary until visible on the standby): {json.dumps(lags)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"drills": rows, "replay_lag": lags}, indent=2, default=str))
    print(f"\nwrote {args.json}")
    if any(r["doubled"] or r["unmatched"] or (r["synchronous"] and r["lost_sends"]) for r in rows):
        sys.exit(1)


def replay_lag(cluster: ReplicatedCluster, commits: int = 200) -> dict[str, float]:
    """Milliseconds from a commit acknowledged on the primary to its row visible on the standby
    (what a read through ``[database] read_url`` may miss), over ``commits`` commits."""
    import time

    import psycopg

    samples: list[float] = []
    with (
        psycopg.connect(cluster.primary.url(), autocommit=True) as primary,
        psycopg.connect(cluster.read_url, autocommit=True) as standby,
    ):
        primary.execute("CREATE TABLE IF NOT EXISTS public.lag_probe (n integer PRIMARY KEY)")
        cluster.wait_replayed()
        for n in range(commits):
            primary.execute("INSERT INTO public.lag_probe VALUES (%s)", (n,))
            t0 = time.perf_counter()
            deadline = t0 + 10
            while not standby.execute("SELECT 1 FROM public.lag_probe WHERE n = %s", (n,)).fetchone():
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"commit {n} not visible on the standby after 10 s")
            samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return {
        "commits": commits,
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 2),
        "max_ms": round(samples[-1], 2),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


if __name__ == "__main__":
    main()
