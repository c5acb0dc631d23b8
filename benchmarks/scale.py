"""Fleet scale: what the database pays as a deployment grows.

Five measurements on one temporary embedded PostgreSQL (statements counted by the server's own
log, ``log_statement = 'all'``; BEGIN/COMMIT lines are not counted, so a statement count is an
upper bound of the transactions):

- ``fleet``: a paced stream (300 steps at 50/s, one ``pgmq.send`` each from a producer whose
  statements are not counted) into one namespace, drained by 1/4/8/16 Hybrid workers at
  concurrency 8: server statements per step (claims, settles, and whatever else the fleet sends
  meanwhile: heartbeats, polls), claims per step and the claims that came back empty, and the
  pickup latency of each step on the server's clock (claimed_at - enqueued_at of its outcome row);
- ``idle``: one Hybrid worker on 1/10/50 namespaces: transactions (``pg_stat_database``) and
  statements (the log) per second while idle, and what one start and stop costs (transactions,
  statements, catalog rows written); ``--baseline DIR`` measures another source tree too;
- ``backlog``: the claim statement (100 messages) against a queue of 1,000 and of 1,000,000
  visible messages: ms per claim;
- ``history``: a claim of 100 (with its dedup probe) and the settle of 100 outcomes against an
  empty ``tasker.step_results`` and one of 10,000,000 rows: ms per statement;
- ``retention``: drain throughput of one worker while the retention job prunes 2,000,000 old
  outcome rows, against the same drain without it.

    python benchmarks/scale.py                        # everything (about 15 minutes)
    python benchmarks/scale.py --only fleet idle      # some of it
    python benchmarks/scale.py --history-rows 1000000 # a smaller history
    python benchmarks/scale.py --only idle --namespaces 1 50 --baseline /tmp/before  # before/after
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from common import (
    NS,
    QUEUE,
    RESULTS,
    StatementLog,
    TransactionCount,
    enqueue_steps,
    machine,
    percentiles_ms,
    print_table,
    server,
    source_env,
    stop,
    tasker_database,
    wait_for,
    worker_env,
    write_json,
)
from psycopg.types.json import Jsonb

from tasker_worker.db import queries
from tasker_worker.domain.steps import StepMessage

PRODUCER = "scale-producer"
FLEET_SIZES = (1, 4, 8, 16)
NAMESPACE_COUNTS = (1, 10, 50)
STREAM_STEPS = 300
STREAM_RATE = 50.0
WARMUP_S = 5.0


def _settled(url: str, n: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()
    return bool(row and row[0] >= n)


def _live_listeners(url: str, n: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'tasker-listener'"
        ).fetchone()
        active = conn.execute("SELECT count(*) FROM tasker.workers WHERE status IN ('pending', 'active')").fetchone()
    return bool(row and row[0] >= n and active and active[0] >= n)


def fleet(admin: str, data_dir: Path, workers: int, single_claimer: bool = True) -> dict[str, Any]:
    """The paced stream into one namespace with ``workers`` Hybrid workers listening."""
    dbname = "bench_fleet"
    url = tasker_database(admin, dbname)
    log = StatementLog(admin, data_dir, dbname)
    env = {"TASKER__EVENT_SYSTEM__LISTENER__SINGLE_CLAIMER": "true" if single_claimer else "false"}
    procs = [_run_worker(url, env, "--concurrency", "8") for _ in range(workers)]
    try:
        wait_for(lambda: _live_listeners(url, workers), 60, "the fleet listening", procs[0])
        time.sleep(WARMUP_S)  # start-up traffic (registration, catch-up claims) is not the stream's
        log.mark()
        bodies = [Jsonb(StepMessage.build(NS, "noop", {"i": i})) for i in range(STREAM_STEPS)]
        with psycopg.connect(url, autocommit=True, application_name=PRODUCER) as producer:
            start = time.perf_counter()
            for i, body in enumerate(bodies):
                pause = start + i / STREAM_RATE - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)  # the pace of the stream
                producer.execute(queries.SEND, (QUEUE, body, 0))
        wait_for(lambda: _settled(url, STREAM_STEPS), 120, "the stream drained", procs[0])
        window = time.perf_counter() - start
        counts = log.counts(exclude_app=PRODUCER)
    finally:
        for proc in procs:
            stop(proc)
    with psycopg.connect(url, autocommit=True) as conn:
        pickup = [
            r[0]
            for r in conn.execute(
                "SELECT extract(epoch FROM claimed_at - enqueued_at) FROM tasker.step_results"
            ).fetchall()
        ]
    claims = counts.get("claim", 0)
    statements = sum(counts.values())
    latency = percentiles_ms(pickup)
    return {
        "workers": workers,
        "single_claimer": single_claimer,
        "steps": STREAM_STEPS,
        "window_s": round(window, 1),
        "statements": statements,
        "statements_per_step": round(statements / STREAM_STEPS, 2),
        "claims_per_step": round(claims / STREAM_STEPS, 2),
        # Each step's first claim found it (one message per notification): the rest came back empty.
        "empty_claims_per_step": round(max(0, claims - STREAM_STEPS) / STREAM_STEPS, 2),
        "probes_per_step": round(counts.get("probe", 0) / STREAM_STEPS, 2),
        "settles_per_step": round(counts.get("settle", 0) / STREAM_STEPS, 2),
        "other_per_step": round(counts.get("other", 0) / STREAM_STEPS, 2),
        "pickup_p50_ms": latency["p50"],
        "pickup_p99_ms": latency["p99"],
    }


#: An idle worker runs this long after it listens before its window opens: a backend reports its
#: transactions to pg_stat_database up to 10 s late (``TransactionCount``), and a start is no idle.
IDLE_SETTLE_S = 15.0
#: What a worker's start has done once these are in the log: its first heartbeat, and the last
#: statement of the supervisor's first round of jobs (the retention job's, the last job).
STARTED = ("INSERT INTO tasker.worker_heartbeats", "WHERE heartbeat_id = ANY (ARRAY(")
CATALOG_WRITES = (
    "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_sys_tables WHERE schemaname = 'pg_catalog'"
)


def _catalog_writes(url: str) -> int:
    """Rows written to the database's catalog so far (read in a session of its own, which ends
    before anything is counted)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(CATALOG_WRITES).fetchone()
    return int(row[0]) if row else 0


def _listening_in(admin: str, dbname: str) -> bool:
    """The worker's LISTEN session is up (asked of the admin database: the counted one is left alone)."""
    with psycopg.connect(admin, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = 'tasker-listener'",
            (dbname,),
        ).fetchone()
    return bool(row and row[0] >= 1)


def idle(
    admin: str, data_dir: Path, namespaces: int, seconds: float, source: Path | None = None, label: str = "this tree"
) -> dict[str, Any]:
    """One idle Hybrid worker on ``namespaces`` namespaces (of the tasker_worker in ``source``,
    default this tree): what one start and stop costs, and what a second of idling costs.

    The namespaces' queues are created, and the database vacuumed and analysed, before any
    worker starts: as for every start of a fleet's workers but the very first, and what
    autovacuum would do once after creating ~4 tables per namespace is the namespaces' cost,
    once per database, not a worker's. Transactions are ``pg_stat_database.xact_commit`` (every
    commit, whether a statement was logged for it or not: a psycopg prepare, a session's start,
    autovacuum); statements are the server's log lines, BEGIN/COMMIT left out.
    """
    dbname = "bench_idle_ns"
    names = [f"ns{i:02d}" for i in range(namespaces)]
    url = tasker_database(admin, dbname, source=source)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(ns) FROM unnest(%s::text[]) AS ns", (names,))
        conn.execute("VACUUM (ANALYZE)")
    log = StatementLog(admin, data_dir, dbname)
    tx = TransactionCount(admin, dbname)
    env = {"TASKER__WORKER__NAMESPACES": "[" + ", ".join(f'"{n}"' for n in names) + "]", **source_env(source)}

    # One start and stop: exact counts, read once every session of the database has ended.
    catalog = _catalog_writes(url)
    before = tx.settle()
    log.mark()
    proc = _run_worker(url, env, cwd=source)
    try:
        wait_for(lambda: log.seen(*STARTED), 60, "the worker started", proc)
    finally:
        stop(proc)
    start_tx = tx.settle() - before
    start_statements = sum(log.counts().values())
    start_catalog = _catalog_writes(url) - catalog

    # Idle: a window opened once the start's transactions have been reported.
    proc = _run_worker(url, env, cwd=source)
    try:
        wait_for(lambda: _listening_in(admin, dbname), 60, "the worker listening", proc)
        time.sleep(IDLE_SETTLE_S)  # a measurement's settling, not synchronisation (see IDLE_SETTLE_S)
        log.mark()
        t0, began = tx.read(), time.perf_counter()
        time.sleep(seconds)  # the observation window
        t1, window = tx.read(), time.perf_counter() - began
        statements = sum(log.counts().values())
    finally:
        stop(proc)
    return {
        "code": label,
        "namespaces": namespaces,
        "window_s": round(window, 1),
        "transactions": t1 - t0,
        "statements": statements,
        "transactions_per_s": round((t1 - t0) / window, 2),
        "statements_per_s": round(statements / window, 2),
        "start_stop_transactions": start_tx,
        "start_stop_statements": start_statements,
        "start_stop_catalog_writes": start_catalog,
    }


def _run_worker(url: str, env: dict[str, str], *argv: str, cwd: Path | None = None) -> subprocess.Popen[str]:
    """``tasker-worker run --mode Hybrid`` with the benchmark environment plus ``env`` (with
    ``source_env`` and ``cwd`` that source tree: the tasker_worker of another source tree;
    ``-m`` imports from its working directory first)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", "Hybrid", *argv],
        env={**worker_env(url), **env},
        cwd=cwd,
        stderr=subprocess.PIPE,
        text=True,
    )


def _time_statement(conn: psycopg.Connection[Any], text: str, params: Any, rounds: int) -> dict[str, float | None]:
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        conn.execute(text, params).fetchall()
        samples.append(time.perf_counter() - t0)
    return percentiles_ms(samples)


def _fill_queue(conn: psycopg.Connection[Any], n: int) -> None:
    """``n`` visible step messages, inserted server-side (no notification: triggers off)."""
    conn.execute("SET session_replication_role = replica")
    conn.execute(
        f"INSERT INTO pgmq.q_{QUEUE} (vt, message)"
        " SELECT clock_timestamp(), jsonb_build_object('step_uuid', gen_random_uuid(),"
        " 'task_uuid', gen_random_uuid(), 'correlation_id', gen_random_uuid(), 'namespace', %s::text,"
        " 'handler', 'noop', 'inputs', '{}'::jsonb) FROM generate_series(1, %s)",
        (NS, n),
    )
    conn.execute("RESET session_replication_role")
    conn.execute(f"VACUUM ANALYZE pgmq.q_{QUEUE}")


def backlog(admin: str, sizes: tuple[int, ...] = (1_000, 1_000_000), rounds: int = 50) -> list[dict[str, Any]]:
    """The claim of 100 against a backlog of each size (claimed messages are made visible again)."""
    rows = []
    statements = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    for size in sizes:
        url = tasker_database(admin, "bench_backlog")
        with psycopg.connect(url, autocommit=True, options="-c plan_cache_mode=force_custom_plan") as conn:
            _fill_queue(conn, size)
            claim = {"qty": 100, "vt": 0, "worker_id": "bench"}  # vt 0: visible again at once
            timing = _time_statement(conn, statements.claim, claim, rounds)
        rows.append({"backlog": size, "claim_of": 100, "p50_ms": timing["p50"], "p99_ms": timing["p99"]})
    return rows


def history(admin: str, rows_in_history: int, rounds: int = 30) -> list[dict[str, Any]]:
    """Claim (with its dedup probe) and settle of 100 against an empty and a large outcome table."""
    out = []
    statements = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    from tasker_worker.db.queue_client import encode_outcomes
    from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source

    for existing in (0, rows_in_history):
        url = tasker_database(admin, "bench_history")
        with psycopg.connect(url, autocommit=True, options="-c plan_cache_mode=force_custom_plan") as conn:
            if existing:
                conn.execute(
                    "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status,"
                    " attempts, worker_id, finished_at) SELECT gen_random_uuid(), %s, %s, g, 'noop', 'succeeded', 1,"
                    " 'old', clock_timestamp() - make_interval(secs => %s - g) FROM generate_series(1, %s) AS g",
                    (NS, QUEUE, existing, existing),
                )
                conn.execute("VACUUM ANALYZE tasker.step_results")
            _fill_queue(conn, 100 * rounds)
            claims, settles = [], []
            for _ in range(rounds):
                t0 = time.perf_counter()
                got = conn.execute(statements.claim, {"qty": 100, "vt": 30, "worker_id": "bench"}).fetchall()
                claims.append(time.perf_counter() - t0)
                now = time.time()
                outcomes = [
                    Outcome(
                        ClaimedMessage(QUEUE, r[0], r[1], r[2], r[3], r[4], r[5], r[6], Source.POLL, 0.0),
                        OutcomeStatus.SUCCEEDED,
                        None,
                        None,
                        now,
                        now,
                    )
                    for r in got
                ]
                for o in outcomes:
                    o.msg.step = StepMessage.decode(o.msg.body)
                t0 = time.perf_counter()
                conn.execute(
                    statements.settle, {"outcomes": encode_outcomes(outcomes), "worker_id": "bench"}
                ).fetchall()
                settles.append(time.perf_counter() - t0)
        c, s = percentiles_ms(claims), percentiles_ms(settles)
        out.append(
            {
                "outcome_rows": existing,
                "claim_p50_ms": c["p50"],
                "claim_p99_ms": c["p99"],
                "settle_p50_ms": s["p50"],
                "settle_p99_ms": s["p99"],
            }
        )
    return out


def retention(admin: str, old_rows: int, steps: int = 20_000) -> list[dict[str, Any]]:
    """Drain ``steps`` with one Hybrid worker, with and without the retention job pruning."""
    out = []
    for pruning in (False, True):
        url = tasker_database(admin, "bench_retention")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status,"
                " attempts, worker_id, finished_at) SELECT gen_random_uuid(), %s, %s, g, 'noop', 'succeeded', 1,"
                " 'old', clock_timestamp() - interval '30 days' FROM generate_series(1, %s) AS g",
                (NS, QUEUE, old_rows),
            )
            conn.execute("VACUUM ANALYZE tasker.step_results")
        enqueue_steps(url, steps)
        env = {
            "TASKER__RETENTION__ENABLED": "true" if pruning else "false",
            "TASKER__RETENTION__INTERVAL": "1s",
        }
        proc = _run_worker(url, env, "--concurrency", "256")
        t0 = time.perf_counter()
        try:
            wait_for(lambda u=url: _new_outcomes(u, steps), 600, "the drain", proc, interval=0.05)
            took = time.perf_counter() - t0
        finally:
            stop(proc)
        with psycopg.connect(url, autocommit=True) as conn:
            left = conn.execute("SELECT count(*) FROM tasker.step_results WHERE worker_id = 'old'").fetchone()
        out.append(
            {
                "retention_job": "pruning" if pruning else "off",
                "steps": steps,
                "steps_per_s": round(steps / took, 1),
                "old_rows_before": old_rows,
                "old_rows_after": int(left[0]) if left else None,
            }
        )
    return out


def _new_outcomes(url: str, steps: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM tasker.step_results WHERE worker_id <> 'old'").fetchone()
    return bool(row and row[0] >= steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["fleet", "idle", "backlog", "history", "retention"])
    parser.add_argument("--fleet", nargs="+", type=int, default=list(FLEET_SIZES))
    parser.add_argument("--namespaces", nargs="+", type=int, default=list(NAMESPACE_COUNTS))
    parser.add_argument(
        "--compare-herd", action="store_true", help="also run each fleet with single_claimer off (every worker claims)"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument(
        "--baseline",
        type=Path,
        help="idle: also measure the tasker_worker of this source tree (a checkout of an earlier commit:"
        " `git archive <commit> | tar -x -C DIR`), printed as 'before'",
    )
    parser.add_argument("--history-rows", type=int, default=10_000_000)
    parser.add_argument("--retention-rows", type=int, default=2_000_000)
    parser.add_argument("--json", type=Path, default=RESULTS / "scale.json")
    args = parser.parse_args()
    chosen = set(args.only or ["fleet", "idle", "backlog", "history", "retention"])
    result: dict[str, Any] = {"machine": machine()}
    with server(None) as (admin, data_dir):
        assert data_dir is not None
        if "fleet" in chosen:
            settings = [True, False] if args.compare_herd else [True]
            result["fleet"] = rows = [fleet(admin, data_dir, n, on) for n in args.fleet for on in settings]
            print_table(
                rows,
                [
                    ("workers", "workers"),
                    ("single_claimer", "single claimer"),
                    ("statements_per_step", "statements/step"),
                    ("claims_per_step", "claims/step"),
                    ("empty_claims_per_step", "empty claims/step"),
                    ("settles_per_step", "settles/step"),
                    ("other_per_step", "other/step"),
                    ("pickup_p50_ms", "pickup p50 ms"),
                    ("pickup_p99_ms", "pickup p99 ms"),
                ],
                f"fleet: a paced stream of {STREAM_STEPS} steps at {STREAM_RATE:.0f}/s into one namespace",
            )
        if "idle" in chosen:
            trees: list[tuple[Path | None, str]] = [(None, "after" if args.baseline else "this tree")]
            if args.baseline:
                trees.insert(0, (args.baseline.resolve(), "before"))
            result["idle"] = rows = [
                idle(admin, data_dir, n, args.idle_seconds, source, label)
                for n in args.namespaces
                for source, label in trees
            ]
            print_table(
                rows,
                [
                    ("code", "code"),
                    ("namespaces", "namespaces"),
                    ("transactions_per_s", "idle transactions/s"),
                    ("statements_per_s", "idle statements/s"),
                    ("start_stop_transactions", "start+stop transactions"),
                    ("start_stop_statements", "start+stop statements"),
                    ("start_stop_catalog_writes", "start+stop catalog rows written"),
                ],
                f"idle: one Hybrid worker ({args.idle_seconds:.0f} s window, {IDLE_SETTLE_S:.0f} s after it listens)",
            )
        if "backlog" in chosen:
            result["backlog"] = rows = backlog(admin)
            print_table(
                rows, [("backlog", "backlog"), ("p50_ms", "claim p50 ms"), ("p99_ms", "claim p99 ms")], "backlog"
            )
        if "history" in chosen:
            result["history"] = rows = history(admin, args.history_rows)
            print_table(
                rows,
                [
                    ("outcome_rows", "outcome rows"),
                    ("claim_p50_ms", "claim p50 ms"),
                    ("claim_p99_ms", "claim p99 ms"),
                    ("settle_p50_ms", "settle p50 ms"),
                    ("settle_p99_ms", "settle p99 ms"),
                ],
                "history: a claim of 100 (with its dedup probe) and a settle of 100",
            )
        if "retention" in chosen:
            result["retention"] = rows = retention(admin, args.retention_rows)
            print_table(
                rows,
                [
                    ("retention_job", "retention job"),
                    ("steps_per_s", "drain steps/s"),
                    ("old_rows_after", "old rows left"),
                ],
                "retention: one worker draining while the job prunes",
            )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
