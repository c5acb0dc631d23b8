"""Every benchmark in one run on one embedded server: tasker-worker against PgQueuer,
Procrastinate and the raw SQL limit. Prints the tables and the ratios the targets are about,
writes ``benchmarks/results/summary.json`` and a chart, ``benchmarks/results/summary.png``.

    python benchmarks/summary.py                 # the full run (about 25 minutes on 2 cores)
    python benchmarks/summary.py --quick         # smaller sizes, to try it out
    python benchmarks/summary.py --defaults-only --rounds 3   # the "defaults" block alone, alternated

The "defaults" block is what a new user sees: ``tasker-worker run`` with no flag and no
TASKER_ENV (the shipped defaults) against PgQueuer's default (batch 10) and its best (batch 100),
plus the production overlay (TASKER_ENV=production, no flag) and Hybrid at concurrency 256;
drained one after another in each round (A, B, C, ... again), then the pickup latency at the
defaults against both PgQueuer settings, and the ratios of each round.

Needs the benchmark extra: ``pip install -e '.[bench]'`` (PgQueuer, asyncpg, Procrastinate,
matplotlib).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import anyio
import drain
import idle
import latency
import peers
import planning
from common import RERUNS, RESULTS, disturbed, machine, print_table, server, wait_idle, wait_quiet, write_json
from drain import WorkerSetup
from systems import PgQueuer, Procrastinate, Tasker

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
#: max_concurrent_processors of config/tasker/environments/production, which the drains run with.
PRODUCTION_CONCURRENCY = 128


def _variant(row: dict[str, Any]) -> str:
    """What sets a drain row apart from the default configuration."""
    parts = []
    if row.get("step_events", "derived") != "derived":
        parts.append(f"events {row['step_events']}")
    if row.get("archive"):
        parts.append("archive on")
    if row.get("processes", 1) > 1:
        parts.append(f"{row['processes']} processes")
    return ", ".join(parts)


def ratios(drains: list[dict[str, Any]], peer_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The best Hybrid drain of the default configuration (step events derived, no archive, one
    process) against the best of each peer and the raw limit; the other variants beside it."""

    def best(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return max(rows, key=lambda r: r["steps_per_s"])

    default = [r for r in drains if r["mode"] == "Hybrid" and not _variant(r) and r["exactly_once"]]
    ours = best(default)
    pgq = best([r for r in peer_rows if r.get("peer") == "pgqueuer"])
    pro = best([r for r in peer_rows if r.get("peer") == "procrastinate"])
    raw = best([r for r in peer_rows if r["system"].startswith("raw")])
    out: dict[str, Any] = {
        "tasker_hybrid_best": ours,
        "pgqueuer_best": pgq,
        "procrastinate_best": pro,
        "raw_limit": raw,
        "vs_pgqueuer": round(ours["steps_per_s"] / pgq["steps_per_s"], 2),
        "vs_procrastinate": round(ours["steps_per_s"] / pro["steps_per_s"], 2),
        "of_raw_limit": round(ours["steps_per_s"] / raw["steps_per_s"], 3),
    }
    production = [r for r in default if r["concurrency"] == PRODUCTION_CONCURRENCY]
    if production:
        out["vs_pgqueuer_at_production_concurrency"] = round(production[0]["steps_per_s"] / pgq["steps_per_s"], 2)
    variants: dict[str, float] = {}
    for r in drains:
        if r["mode"] == "Hybrid" and _variant(r) and r["exactly_once"]:
            key = _variant(r)
            variants[key] = max(variants.get(key, 0.0), round(r["steps_per_s"] / pgq["steps_per_s"], 2))
    out["variants_vs_pgqueuer"] = variants
    cpu = {"tasker": cpu_per_step(ours), "pgqueuer": cpu_per_step(pgq), "raw_limit": cpu_per_step(raw)}
    out["cpu_us_per_step"] = cpu
    out["cpu_split_us"] = {
        "tasker": [ours.get("worker_cpu_us_per_step"), ours.get("server_cpu_us_per_step")],
        "pgqueuer": [pgq.get("worker_cpu_us_per_step"), pgq.get("server_cpu_us_per_step")],
    }
    if cpu["tasker"] is not None and cpu["pgqueuer"]:
        out["cpu_vs_pgqueuer"] = round(cpu["tasker"] / cpu["pgqueuer"], 2)
    return out


def cpu_per_step(row: dict[str, Any]) -> float | None:
    """Worker + server CPU per job in microseconds (None when the server's was not measured; the
    raw limit has no worker)."""
    server_us = row.get("server_cpu_us_per_step")
    if server_us is None:
        return None
    return round((row.get("worker_cpu_us_per_step") or 0.0) + server_us, 1)


# --- the "defaults" block ----------------------------------------------------------------------

#: The tasker configurations of the defaults block: no flag at all, the production overlay, and
#: the best concurrency of the full run.
DEFAULT_SETUPS = [
    WorkerSetup("tasker defaults (no flag)", None, None, None),
    WorkerSetup("tasker production overlay", None, None, "production"),
    WorkerSetup("tasker Hybrid c256", "Hybrid", 256, "production"),
]
#: (ratio name, tasker label, PgQueuer batch, target)
DEFAULT_TARGETS = [
    ("defaults / PgQueuer default", "tasker defaults (no flag)", 10, 1.5),
    ("defaults / PgQueuer best", "tasker defaults (no flag)", 100, 1.2),
    ("production / PgQueuer best", "tasker production overlay", 100, 1.2),
    ("c256 / PgQueuer best", "tasker Hybrid c256", 100, 1.8),
]


def defaults_block(admin: str, steps: int, n_seq: int, n_paced: int, rounds: int) -> dict[str, Any]:
    """The drains and latencies of the defaults block, alternated ``rounds`` times; the ratios
    of each round (each tasker drain against the PgQueuer drain of the same round)."""
    print(f"  load before the first run: {wait_quiet():.2f}", flush=True)
    drains: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        runs: list[tuple[str, Any]] = [(setup.label, setup) for setup in DEFAULT_SETUPS]
        runs += [(f"PgQueuer batch {batch}", batch) for batch in (10, 100)]
        for label, what in runs:
            for attempt in range(RERUNS + 1):
                wait_idle()
                if isinstance(what, WorkerSetup):
                    row = drain.drain(admin, what.mode, what.concurrency, steps, setup=what)
                else:
                    row = peers.peer_drain(admin, PgQueuer(what), steps)
                row.update(round=r, system=label, label=label, load=round(os.getloadavg()[0], 2))
                row.update(disturbed=disturbed(row), attempt=attempt + 1)
                drains.append(row)
                print(
                    f"  round {r} {label}: {row['steps_per_s']:,.0f} steps/s (others' CPU {row['others_cpu_s']} s,"
                    f" load {row['load']})"
                    + (" DISTURBED, run again" if row["disturbed"] and attempt < RERUNS else ""),
                    flush=True,
                )
                if not row["disturbed"]:
                    break
    lat: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        for system in (Tasker(None, None, env=None), PgQueuer(10), PgQueuer(100)):
            wait_idle()
            rows = anyio.run(latency.measure, system, admin, n_seq, n_paced)
            for row in rows:
                row.update(round=r, load=round(os.getloadavg()[0], 2))
            lat += rows
            print(f"  round {r} {system.label}: p50 {rows[0]['p50']} / {rows[1]['p50']} ms", flush=True)
    return {"rounds": rounds, "drain": drains, "latency": lat, "ratios": defaults_ratios(drains, lat, rounds)}


def defaults_ratios(drains: list[dict[str, Any]], lat: list[dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """Per target: the ratio in each round, its median, and whether each round meets it; then
    CPU per step and the latency comparison."""
    out = []

    def find(rows: list[dict[str, Any]], r: int, label: str) -> dict[str, Any]:
        # The last attempt of the round (an earlier one was disturbed and run again).
        return [x for x in rows if x["round"] == r and x.get("system", x.get("label")) == label][-1]

    for name, ours, batch, target in DEFAULT_TARGETS:
        per_round = [
            round(find(drains, r, ours)["steps_per_s"] / find(drains, r, f"PgQueuer batch {batch}")["steps_per_s"], 2)
            for r in range(1, rounds + 1)
        ]
        out.append(
            {
                "what": name,
                "rounds": per_round,
                "median": statistics.median(per_round),
                "target": f">= {target}",
                "met": all(x >= target for x in per_round),
            }
        )
    for batch in (10, 100):
        per_round = []
        for r in range(1, rounds + 1):
            ours_cpu = cpu_per_step(find(drains, r, "tasker defaults (no flag)"))
            theirs = cpu_per_step(find(drains, r, f"PgQueuer batch {batch}"))
            per_round.append(round(ours_cpu / theirs, 2) if ours_cpu and theirs else None)
        out.append(
            {
                "what": f"CPU per step, defaults / PgQueuer batch {batch}",
                "rounds": per_round,
                "median": statistics.median([x for x in per_round if x is not None]) if any(per_round) else None,
                "target": "<= 1 (not worse)",
                "met": all(x is not None and x <= 1 for x in per_round),
            }
        )
    for shape in ("sequential", "paced 100/s"):
        for pct in ("p50", "p99"):
            for batch in (10, 100):
                per_round = [
                    round(
                        find([x for x in lat if x["shape"] == shape], r, "tasker defaults")[pct]
                        - find([x for x in lat if x["shape"] == shape], r, f"PgQueuer batch {batch}")[pct],
                        2,
                    )
                    for r in range(1, rounds + 1)
                ]
                out.append(
                    {
                        "what": f"latency {shape} {pct}, defaults - PgQueuer batch {batch} (ms)",
                        "rounds": per_round,
                        "median": statistics.median(per_round),
                        "target": "<= 0",
                        "met": all(x <= 0 for x in per_round),
                    }
                )
    return out


DEFAULTS_DRAIN_COLUMNS = [
    ("round", "round"),
    ("attempt", "attempt"),
    ("label", "system"),
    ("concurrency", "conc"),
    ("prefetch", "prefetch"),
    ("steps_per_s", "jobs/s"),
    ("worker_cpu_us_per_step", "worker CPU us/job"),
    ("server_cpu_us_per_step", "server CPU us/job"),
    ("exactly_once", "exactly once"),
    ("others_cpu_s", "others' CPU s"),
    ("disturbed", "disturbed"),
    ("commit_ms", "commit ms"),
    ("load", "load 1m"),
]
DEFAULTS_LATENCY_COLUMNS = [
    ("round", "round"),
    ("system", "system"),
    ("shape", "shape"),
    ("n", "n"),
    ("p50", "p50 ms"),
    ("p95", "p95 ms"),
    ("p99", "p99 ms"),
    ("sources", "claimed by"),
    ("send_to_claim_p50", "send->claim p50"),
    ("claim_to_start_p50", "claim->start p50"),
    ("load", "load 1m"),
]


def print_defaults(block: dict[str, Any]) -> None:
    """The defaults block's tables."""
    print_table(block["drain"], DEFAULTS_DRAIN_COLUMNS, "defaults: drain, alternated rounds")
    print_table(block["latency"], DEFAULTS_LATENCY_COLUMNS, "defaults: pickup latency, alternated rounds")
    rows = [{**r, "rounds": " / ".join(str(x) for x in r["rounds"])} for r in block["ratios"]]
    print_table(
        rows,
        [("what", "ratio"), ("rounds", "each round"), ("median", "median"), ("target", "target"), ("met", "met")],
        "defaults: targets",
    )


def chart(result: dict[str, Any], path: Path) -> None:
    """Three panels: drain throughput, pickup latency (sequential, p50 and p99), idle statements/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    # Each mode and variant at its best concurrency.
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for r in result["drain"]:
        key = (r["mode"], _variant(r))
        if key not in best or r["steps_per_s"] > best[key]["steps_per_s"]:
            best[key] = r
    drains = list(best.values())
    bars = [
        (
            f"tasker {r['mode']}\nc{r['concurrency']}" + (f" {_variant(r)}" if _variant(r) else ""),
            r["steps_per_s"],
            "tab:blue",
        )
        for r in drains
    ]
    bars += [
        (
            r["system"].replace(" batch", "\nbatch").replace(" concurrency", "\nconc."),
            r["steps_per_s"],
            "tab:gray" if not r["system"].startswith("raw") else "tab:green",
        )
        for r in result["peers"]
    ]
    ax = axes[0]
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.set_xscale("log")
    ax.set_xlabel("jobs/s (log scale)")
    ax.set_title(f"Drain: {result['steps']:,} no-op jobs, one worker process unless said")
    for i, b in enumerate(bars):
        ax.text(b[1], i, f" {b[1]:,.0f}", va="center", fontsize=8)

    ax = axes[1]
    seq = [r for r in result["latency"] if r["shape"] == "sequential" and r.get("mode") != "PollingOnly"]
    labels = [r["system"].replace(" batch", "\nbatch").replace(" concurrency", "\nconc.") for r in seq]
    ys = range(len(seq))
    ax.barh([y + 0.2 for y in ys], [r["p50"] for r in seq], height=0.4, label="p50", color="tab:blue")
    ax.barh([y - 0.2 for y in ys], [r["p99"] for r in seq], height=0.4, label="p99", color="tab:orange")
    ax.set_yticks(list(ys), labels)
    ax.set_xscale("log")  # a peer's missed notification (a 5 s poll) would flatten the rest
    ax.set_xlabel("ms from send to handler start (log scale)")
    ax.set_title(f"Pickup latency, {seq[0]['n']:,} sequential sends (event path)")
    ax.legend()

    ax = axes[2]
    rows = result["idle"]
    ax.barh(
        [r["system"].replace(" batch", "\nbatch").replace(" concurrency", "\nconc.") for r in rows],
        [r["statements_per_s"] for r in rows],
        color=["tab:blue" if r["system"].startswith("tasker") else "tab:gray" for r in rows],
    )
    ax.set_xlabel("statements/s")
    ax.set_title("Idle worker: statements per second")
    fig.suptitle(f"tasker-worker vs peers, one run on one embedded PostgreSQL ({result['machine']['cpus']} cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5,000 jobs, 200 + 100 latency sends, 15 s idle")
    parser.add_argument("--defaults-only", action="store_true", help="only the defaults block")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of the defaults block")
    parser.add_argument(
        "--steps",
        type=int,
        help="steps of each drain (default 20,000; at 20,000 a drain lasts about a second, and this"
        " machine's speed drifts over minutes: 100,000 gives steadier ratios)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "summary.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "summary.png")
    args = parser.parse_args()
    steps, n_seq, n_paced, idle_s = (5_000, 200, 100, 15.0) if args.quick else (20_000, 1000, 500, 60.0)
    steps = args.steps or steps
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result: dict[str, Any] = {"machine": machine(), "started": started, "steps": steps}
    with server(None) as (admin, data_dir):
        assert data_dir is not None
        print("defaults: tasker-worker with no flag against PgQueuer's default and best")
        result["defaults"] = defaults_block(admin, steps, n_seq, n_paced, args.rounds)
        if args.defaults_only:
            print_defaults(result["defaults"])
            write_json(
                args.json.with_name("summary_defaults.json") if args.json == RESULTS / "summary.json" else args.json,
                result,
            )
            return
        print("drain (tasker-worker)")
        # Throughput grows with concurrency up to a few hundred no-op steps in flight (claims and
        # outcome writes overlap more), so "best concurrency" is looked for up to 512; 128 is the
        # production overlay's default.
        result["drain"] = drain.run(admin, ["Hybrid"], [16, 32, 64, PRODUCTION_CONCURRENCY, 256, 512], steps)
        result["drain"] += drain.run(admin, ["PollingOnly", "EventDrivenOnly"], [16, 128, 512], steps)
        result["drain"] += drain.run(admin, ["Hybrid"], [256], steps, ["stored"])
        result["drain"] += drain.run(admin, ["Hybrid"], [256], steps, ["derived"], [True])
        result["drain"] += drain.run(admin, ["Hybrid"], [256], steps, processes=2)
        print("drain (peers, raw limit)")
        result["peers"] = peers.run(admin, steps, [])
        print("pickup latency")
        systems = [Tasker(m) for m in MODES] + [PgQueuer(10), PgQueuer(100), Procrastinate(1)]
        result["latency"] = latency.run(admin, systems, n_seq, n_paced)
        print("idle cost")
        result["idle"] = idle.run(admin, data_dir, MODES, idle_s, True)
        print("planning through the runtime (128x128 requests)")
        result["planning"] = [planning.runtime_throughput(400, p, admin) for p in (1, 2)]
    result["ratios"] = ratios(result["drain"], result["peers"])

    print_defaults(result["defaults"])
    print_table(result["drain"], drain.COLUMNS, "drain: tasker-worker")
    print_table(result["peers"], peers.COLUMNS, "drain: peers and the raw limit")
    print_table(result["latency"], latency.COLUMNS, "pickup latency: send -> handler start")
    print_table(result["idle"], idle.COLUMNS, "idle cost")
    print_table(result["planning"], [(k, k) for k in result["planning"][0]], "planning steps/s")
    r = result["ratios"]
    print(
        f"\nratios (Hybrid best, default configuration, c{r['tasker_hybrid_best']['concurrency']}): "
        f"{r['vs_pgqueuer']}x PgQueuer's best, {r['vs_procrastinate']}x Procrastinate's best, "
        f"{r['of_raw_limit']:.0%} of the raw SQL limit"
        + (
            f"; at the production concurrency ({PRODUCTION_CONCURRENCY}) {r['vs_pgqueuer_at_production_concurrency']}x"
            if "vs_pgqueuer_at_production_concurrency" in r
            else ""
        )
    )
    print("variants vs PgQueuer's best: " + ", ".join(f"{k} {v}x" for k, v in r["variants_vs_pgqueuer"].items()))
    split = r["cpu_split_us"]
    print(
        f"CPU per job, worker + server (us): tasker {split['tasker'][0]} + {split['tasker'][1]}"
        f" = {r['cpu_us_per_step']['tasker']}, PgQueuer {split['pgqueuer'][0]} + {split['pgqueuer'][1]}"
        f" = {r['cpu_us_per_step']['pgqueuer']}" + (f" ({r['cpu_vs_pgqueuer']}x)" if "cpu_vs_pgqueuer" in r else "")
    )
    write_json(args.json, result)
    chart(result, args.png)


if __name__ == "__main__":
    main()
