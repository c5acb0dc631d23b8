"""Soak: one worker at the shipped defaults draining a long backlog, as a new user would try it.

``--steps`` (1,000,000) no-op steps are sent first with ``Client.send_steps`` (1,000 a
statement), then one ``tasker-worker run`` with no flag and no TASKER_ENV drains them. Reported:

- the rate of each window of ``--window`` (50,000) steps, from the outcome rows (the window's
  last ``recorded_at`` against the previous window's; the first from the first handler start),
  and the last window against the first;
- the worker's RSS over time (sampled every second; its first sample once the first window is
  done against the last), the queue table's dead tuples and the autovacuum runs on it meanwhile
  (``pg_stat_user_tables``);
- ``EXPLAIN (ANALYZE, BUFFERS)`` of the worker's claim (16, in a transaction rolled back) at the
  start and near the end: how many index and heap pages one claim walks as the drain goes on.

``--storage`` says what the queue table's storage settings are for the run: ``shipped`` (what
``tasker.create_namespace_queue`` sets), ``none`` (every reloption reset: PostgreSQL's defaults,
as before migration 0017) or ``ALTER TABLE ... SET (...)`` options of your own
(``--storage "autovacuum_vacuum_scale_factor=0.01,fillfactor=70"``); a suffix ``/vacuumN`` also
runs ``VACUUM`` on the queue table every N seconds from the benchmark during the drain (what a
maintenance job of the worker's supervisor would do; autovacuum looks at a table at most once
per ``autovacuum_naptime``, 60 s by default); ``/statsN`` runs the worker with ``[worker]
stats_window = N`` (the latency samples it keeps). Several alternate within each round
(``--rounds``). A chart goes to ``benchmarks/results/soak.png``.

What the claim walks, without the worker (``--walk``): one connection claims 32 and deletes them
(the settle's DELETE), over and over, on a queue of ``--steps`` messages; every ``--window``
steps, ``EXPLAIN (ANALYZE, BUFFERS)`` of the claim (rolled back): the buffers it touches do not
depend on how busy the machine is. With ``--walk-vacuum`` a ``VACUUM`` of the queue table after
each window.

    python benchmarks/soak.py                                     # 1,000,000 steps (about 8 min a run)
    python benchmarks/soak.py --walk --steps 300000 --window 50000 --storage none shipped
    python benchmarks/soak.py --steps 200000 --window 20000 --storage none shipped --rounds 3
"""

from __future__ import annotations

import argparse
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import psycopg
from common import (
    NS,
    QUEUE,
    RESULTS,
    ServerCpu,
    busy_cpu_s,
    machine,
    print_table,
    process_tree_cpu,
    server,
    start_worker,
    stop,
    tasker_database,
    wait_for,
    wait_idle,
    wait_quiet,
    worker_error,
    write_json,
)

from tasker_worker import Client
from tasker_worker.db import queries

SEND = 1_000
STAMP = '{"tasker_claim": {"worker_id": "soak-explain"}}'
COLUMNS = [
    ("round", "round"),
    ("storage", "storage"),
    ("steps", "steps"),
    ("enqueue_s", "enqueue s"),
    ("drain_s", "drain s"),
    ("steps_per_s", "steps/s"),
    ("first_window", "first window /s"),
    ("last_window", "last window /s"),
    ("last_vs_first", "last/first"),
    ("slowest_window", "slowest /s"),
    ("rss_first_mib", "RSS after 1st window MiB"),
    ("rss_last_mib", "RSS at end MiB"),
    ("rss_growth", "RSS growth"),
    ("autovacuums", "autovacuums (queue)"),
    ("max_dead", "most dead tuples"),
    ("exactly_once", "exactly once"),
    ("others_cores", "others' cores"),
    ("load", "load 1m"),
]


def apply_storage(url: str, storage: str) -> str:
    """Set the queue table's reloptions for the run; what it has then."""
    table = f"pgmq.q_{QUEUE}"
    with psycopg.connect(url, autocommit=True) as conn:
        if storage != "shipped":
            row = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
            current = [o.split("=")[0] for o in (row[0] if row and row[0] else [])]
            if current:
                conn.execute(f"ALTER TABLE {table} RESET ({', '.join(current)})")
            if storage != "none":
                if not re.fullmatch(r"[a-z_]+=[0-9.]+(,[a-z_]+=[0-9.]+)*", storage):
                    raise SystemExit(f"--storage {storage!r}: name=value[,name=value...]")
                conn.execute(f"ALTER TABLE {table} SET ({storage})")
        row = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
    return ",".join(row[0]) if row and row[0] else "(none)"


def enqueue(url: str, steps: int) -> float:
    """``steps`` no-op steps through the producer client; seconds taken."""
    t0 = time.perf_counter()
    with Client(url, max_size=1) as client:
        for i in range(0, steps, SEND):
            client.send_steps(NS, "noop", ({"i": k} for k in range(i, min(steps, i + SEND))))
    return time.perf_counter() - t0


class Vacuumer(threading.Thread):
    """``VACUUM`` of the queue table every ``every`` seconds until stopped (times and durations kept)."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.runs: list[tuple[float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self.stopping.wait(self.every):
                t0 = time.time()
                conn.execute(f"VACUUM pgmq.q_{QUEUE}")
                self.runs.append((t0, time.time() - t0))


class Sampler(threading.Thread):
    """Every ``interval`` s: time, steps recorded (the outcome table's inserts, from the
    statistics: no count(*) on a growing table), the worker's RSS, the queue's dead tuples and
    autovacuum count."""

    def __init__(self, url: str, proc: psutil.Process, interval: float = 1.0, explain_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.url, self.proc, self.interval, self.explain_every = url, proc, interval, explain_every
        self.samples: list[dict[str, float]] = []
        #: (time, steps recorded, claim ms, buffers hit) of an EXPLAIN ANALYZE of the claim (rolled back).
        self.claims: list[tuple[float, float, float, float]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            n = 0
            while not self.stopping.is_set():
                n += 1
                if self.explain_every and n % self.explain_every == 0 and self.samples:
                    e = explain_claim(self.url)
                    self.claims.append(
                        (time.time(), self.samples[-1]["recorded"], e["ms"] or 0.0, e["buffers_hit"] or 0)
                    )
                # Statistics are read from a snapshot per transaction; autocommit takes a new one.
                row = conn.execute(
                    "SELECT (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'tasker.step_results'::regclass),"
                    " n_dead_tup, n_live_tup, autovacuum_count, autoanalyze_count"
                    f" FROM pg_stat_user_tables WHERE relid = 'pgmq.q_{QUEUE}'::regclass"
                ).fetchone()
                try:
                    rss = sum(p.memory_info().rss for p in [self.proc, *self.proc.children(recursive=True)])
                except psutil.Error:
                    break
                if row:
                    self.samples.append(
                        {
                            "t": time.time(),
                            "recorded": float(row[0] or 0),
                            "dead": float(row[1] or 0),
                            "live": float(row[2] or 0),
                            "autovacuums": float(row[3] or 0),
                            "autoanalyzes": float(row[4] or 0),
                            "rss_mib": rss / 2**20,
                        }
                    )
                self.stopping.wait(self.interval)


BUFFERS = re.compile(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?(?: dirtied=(\d+))?")


def explain_claim(url: str) -> dict[str, Any]:
    """EXPLAIN (ANALYZE, BUFFERS) of the worker's claim of 16, rolled back."""
    statements = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    with psycopg.connect(url, options="-c plan_cache_mode=force_custom_plan") as conn:
        plan = [
            r[0]
            for r in conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + statements.claim, {"qty": 16, "vt": 30, "stamp": STAMP}
            ).fetchall()
        ]
        conn.rollback()
    ms = next((float(m.group(1)) for line in plan if (m := re.search(r"Execution Time: ([\d.]+) ms", line))), None)
    top = next((m for line in plan if (m := BUFFERS.search(line))), None)
    return {
        "ms": ms,
        "buffers_hit": int(top.group(1) or 0) if top else None,
        "buffers_read": int(top.group(2) or 0) if top else None,
        "plan": "\n".join(plan),
    }


def soak(admin: str, steps: int, window: int, storage: str, explain_at: tuple[float, ...]) -> dict[str, Any]:
    """One soak run on a fresh database."""
    url = tasker_database(admin, "bench_soak")
    storage_part, *extras = storage.split("/")
    options = apply_storage(url, storage_part)
    vacuum = next((float(x.removeprefix("vacuum")) for x in extras if x.startswith("vacuum")), None)
    window_setting = next((x.removeprefix("stats") for x in extras if x.startswith("stats")), None)
    vacuumer = Vacuumer(url, vacuum) if vacuum else None
    enqueue_s = enqueue(url, steps)
    settings = {"TASKER__WORKER__STATS_WINDOW": window_setting} if window_setting else None
    proc = start_worker(url, None, env=None, settings=settings)
    explains: list[dict[str, Any]] = []
    worker = psutil.Process(proc.pid)
    sampler = Sampler(url, worker)
    try:
        with psycopg.connect(url, autocommit=True) as conn:

            def recorded() -> int:
                row = conn.execute(
                    "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relid = 'tasker.step_results'::regclass"
                ).fetchone()
                return int(row[0] or 0) if row else 0

            wait_for(lambda: recorded() > 0, 120, "the first outcome", proc, interval=0.05)
            server_cpu = ServerCpu(url)
            server_cpu.start()
            busy0, own0, worker0, wall0 = busy_cpu_s(), time.process_time(), process_tree_cpu(worker), time.time()
            sampler.start()
            if vacuumer is not None:
                vacuumer.start()
            for share in explain_at:
                wait_for(lambda s=share: recorded() >= s * steps, 3600, f"{share:.0%} done", proc, interval=0.5)
                explains.append({"at_share": share, "recorded": recorded(), **explain_claim(url)})
            wait_for(lambda: recorded() >= steps, 7200, f"{steps} outcomes", proc, interval=0.5)
            # The statistics lag behind by up to a second: the outcome rows are the record.
            wait_for(
                lambda: conn.execute("SELECT count(*) >= %s FROM tasker.step_results", (steps,)).fetchone()[0],
                120,
                "the outcome rows",
                proc,
                interval=0.5,
            )
            others = (
                busy_cpu_s()
                - busy0
                - (process_tree_cpu(worker) - worker0)
                - (server_cpu.seconds() or 0.0)
                - (time.process_time() - own0)
            )
            others_wall = time.time() - wall0
            sampler.stopping.set()
            sampler.join(10)
            if vacuumer is not None:
                vacuumer.stopping.set()
                vacuumer.join(60)
            windows = conn.execute(
                "SELECT w, count(*), extract(epoch FROM min(started_at)), extract(epoch FROM max(recorded_at))"
                " FROM (SELECT (row_number() OVER (ORDER BY recorded_at) - 1) / %s AS w, started_at, recorded_at"
                "         FROM tasker.step_results) AS r GROUP BY w ORDER BY w",
                (window,),
            ).fetchall()
            distinct, succeeded = conn.execute(
                "SELECT count(DISTINCT step_uuid), count(*) FILTER (WHERE status = 'succeeded') FROM tasker.step_results"
            ).fetchone()
            left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()[0]
            vacuums = conn.execute(
                "SELECT autovacuum_count, autoanalyze_count, last_autovacuum FROM pg_stat_user_tables"
                f" WHERE relid = 'pgmq.q_{QUEUE}'::regclass"
            ).fetchone()
    except Exception:
        print(worker_error(proc))
        raise
    finally:
        sampler.stopping.set()
        if vacuumer is not None:
            vacuumer.stopping.set()
        stop(proc)
    rates = []
    previous_end = float(windows[0][2])  # the first handler start
    for w, n, _, end in windows:
        end = float(end)
        rates.append({"window": int(w), "steps": int(n), "end": end, "per_s": round(n / (end - previous_end), 1)})
        previous_end = end
    first_end = rates[0]["end"]
    samples = sampler.samples
    after_first = [s for s in samples if s["t"] >= first_end]
    rss_first = after_first[0]["rss_mib"] if after_first else (samples[0]["rss_mib"] if samples else None)
    rss_last = samples[-1]["rss_mib"] if samples else None
    full = [r for r in rates if r["steps"] == window]
    drain_s = rates[-1]["end"] - float(windows[0][2])
    return {
        "storage": storage,
        "reloptions": options,
        "steps": steps,
        "window": window,
        "enqueue_s": round(enqueue_s, 1),
        "drain_s": round(drain_s, 1),
        "steps_per_s": round(steps / drain_s, 1),
        "first_window": full[0]["per_s"],
        "last_window": full[-1]["per_s"],
        "last_vs_first": round(full[-1]["per_s"] / full[0]["per_s"], 3),
        "slowest_window": min(r["per_s"] for r in full),
        "rss_first_mib": round(rss_first, 1) if rss_first else None,
        "rss_last_mib": round(rss_last, 1) if rss_last else None,
        "rss_max_mib": round(max(s["rss_mib"] for s in samples), 1) if samples else None,
        "rss_growth": round(rss_last / rss_first - 1, 3) if rss_first and rss_last else None,
        "autovacuums": int(vacuums[0]) if vacuums else None,
        "vacuums_run": [[round(t, 2), round(d, 3)] for t, d in vacuumer.runs] if vacuumer else [],
        "max_dead": int(max((s["dead"] for s in samples), default=0)),
        "exactly_once": distinct == steps == succeeded and left == 0,
        # CPU the rest of the machine used during the drain (cores on average): noise.
        "others_cores": round(others / others_wall, 2),
        "windows": rates,
        "samples": samples,
        "explains": explains,
        "claim_over_time": [[round(t, 2), r, ms, b] for t, r, ms, b in sampler.claims],
        "t0": float(windows[0][2]),
    }


def walk(admin: str, steps: int, window: int, storage: str, vacuum: bool) -> dict[str, Any]:
    """The claim's buffers as a queue of ``steps`` is worked through by claim + delete (see the
    docstring): ``{"points": [(steps done, claim ms, buffers hit, index rows removed by filter)]}``."""
    url = tasker_database(admin, "bench_walk")
    options = apply_storage(url, storage)
    enqueue(url, steps)
    statements = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    points = []
    with psycopg.connect(url, autocommit=True, options="-c plan_cache_mode=force_custom_plan") as conn:
        conn.execute(f"VACUUM ANALYZE pgmq.q_{QUEUE}")
        done, next_point = 0, 0
        while done < steps:
            if done >= next_point:
                e = explain_claim(url)
                points.append((done, e["ms"], e["buffers_hit"]))
                next_point += window
                if vacuum and done:
                    conn.execute(f"VACUUM pgmq.q_{QUEUE}")
            got = conn.execute(statements.claim, {"qty": 32, "vt": 30, "stamp": STAMP}).fetchall()
            if not got:
                break
            conn.execute(f"DELETE FROM pgmq.q_{QUEUE} WHERE msg_id = ANY(%s)", ([g[0] for g in got],))
            done += len(got)
        e = explain_claim(url)
        points.append((done, e["ms"], e["buffers_hit"]))
    return {"storage": storage, "reloptions": options, "vacuum_each_window": vacuum, "steps": steps, "points": points}


def chart(rows: list[dict[str, Any]], path: Path) -> None:
    """Rate per window and RSS (and the queue's dead tuples) against steps done, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 5))
    colors = {"none": "tab:gray", "shipped": "tab:blue", "shipped/vacuum10": "tab:green"}
    for row in rows:
        name = row["storage"] if len(row["storage"]) <= 24 else "custom"
        label = f"{name} (round {row.get('round', 1)})"
        color = colors.get(row["storage"], None)
        style = ["-", "--", ":"][(row.get("round", 1) - 1) % 3]
        xs = [(r["window"] + 1) * row["window"] / 1000 for r in row["windows"] if r["steps"] == row["window"]]
        ys = [r["per_s"] for r in row["windows"] if r["steps"] == row["window"]]
        axes[0].plot(xs, ys, style, color=color, label=label, marker=".")
        done = [s["recorded"] / 1000 for s in row["samples"]]
        axes[1].plot(done, [s["rss_mib"] for s in row["samples"]], style, color=color, label=label)
        axes[2].plot(done, [s["dead"] / 1000 for s in row["samples"]], style, color=color, label=label)
        claims = row.get("claim_over_time", [])
        axes[3].plot([c[1] / 1000 for c in claims], [c[2] for c in claims], style, color=color, label=label, marker=".")
    axes[0].set_title(f"Drain rate per {rows[0]['window']:,} steps")
    axes[0].set_xlabel("steps done (thousands)")
    axes[0].set_ylabel("steps/s")
    axes[0].set_ylim(bottom=0)
    axes[1].set_title("Worker RSS")
    axes[1].set_xlabel("steps done (thousands)")
    axes[1].set_ylabel("MiB")
    axes[1].set_ylim(bottom=0)
    axes[2].set_title("Dead tuples in the queue table (statistics)")
    axes[2].set_xlabel("steps done (thousands)")
    axes[2].set_ylabel("thousands")
    axes[3].set_title("One claim of 16 (EXPLAIN ANALYZE, every 5 s)")
    axes[3].set_xlabel("steps done (thousands)")
    axes[3].set_ylabel("ms")
    axes[3].set_ylim(bottom=0)
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Soak: one worker at the shipped defaults draining {rows[0]['steps']:,} pre-enqueued no-op steps"
        f" ({machine()['cpus']} cores, embedded PostgreSQL)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--window", type=int, default=50_000)
    parser.add_argument("--storage", nargs="+", default=["shipped"], help="shipped, none, or name=value,...")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--explain-at", type=float, nargs="*", default=[0.02, 0.9], help="shares of the drain")
    parser.add_argument("--walk", action="store_true", help="the claim's buffers without the worker (see above)")
    parser.add_argument("--walk-vacuum", action="store_true", help="with --walk: VACUUM after each window")
    parser.add_argument("--json", type=Path, default=RESULTS / "soak.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "soak.png")
    args = parser.parse_args()
    rows = []
    if args.walk:
        with server(None) as (admin, _):
            walks = [walk(admin, args.steps, args.window, st, args.walk_vacuum) for st in args.storage]
        for w in walks:
            print(f"storage {w['storage']} (vacuum each window: {w['vacuum_each_window']})")
            for done, ms, hit in w["points"]:
                print(f"  after {done:>9,} steps: claim {ms} ms, {hit} buffers")
        write_json(args.json, {"machine": machine(), "walk": walks})
        return
    with server(None) as (admin, _):
        print(f"load before the first run: {wait_quiet():.2f}", flush=True)
        for r in range(1, args.rounds + 1):
            for storage in args.storage:
                wait_idle()
                row = soak(admin, args.steps, args.window, storage, tuple(args.explain_at))
                row.update(round=r, load=round(os.getloadavg()[0], 2))
                rows.append(row)
                print(
                    f"  round {r} storage {storage}: {row['steps_per_s']:,.0f} steps/s, first {row['first_window']:,.0f}"
                    f" last {row['last_window']:,.0f} ({row['last_vs_first']}x), RSS {row['rss_first_mib']} ->"
                    f" {row['rss_last_mib']} MiB, {row['autovacuums']} autovacuums (load {row['load']})",
                    flush=True,
                )
                for e in row["explains"]:
                    print(
                        f"    claim at {e['recorded']:,} done: {e['ms']} ms, buffers hit {e['buffers_hit']}"
                        f" read {e['buffers_read']}",
                        flush=True,
                    )
    print_table(rows, COLUMNS, f"soak: one worker at the defaults draining {args.steps:,} steps")
    write_json(args.json, {"machine": machine(), "soak": rows})
    chart(rows, args.png)


if __name__ == "__main__":
    main()
