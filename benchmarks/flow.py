"""What flow control costs (issue 31): drains under each kind of control, and the claim's cost on
a long queue with and without the indexes that keep it proportional to what it claims.

Two parts, on one temporary embedded PostgreSQL:

- ``drain``: N no-op steps pre-enqueued, one ``tasker-worker run`` at the shipped defaults (no
  flag, no TASKER_ENV), timed from the first handler start to the last outcome row, as in
  ``drain.py``; the variants alternate within each round (``--rounds``):
  ``none`` (no flow control: the plain claim), ``max_running 8`` and ``64``
  (``tasker.set_queue_limits``), ``10 groups`` and ``100 groups`` (each step's ``group`` is
  ``g<i mod k>``), ``priorities`` (``priority`` = i mod 10). A namespace that carries groups or
  priorities is set up as after its first such claim: ``tasker.note_flow_fields`` and the
  indexes built (``db/flow.ensure_indexes``) before the drain, so the figure is the steady state,
  not the index build. Exactly once is checked as in drain.py, and the most steps holding a
  claim at once (from each outcome row's claim to its write) against the limit.
- ``claim``: a queue of ``--backlog`` (1,000,000) visible messages with 100 groups and
  priorities 0-9, inserted server-side; then claims of 100 (vt 30 s, each taking new messages)
  with the plain claim (no flow row), and ``tasker.claim_flow`` with priorities, with groups,
  and with a max_running that does not hold (to see what counting costs): client wall time per
  claim (p50/p99 of ``--claims`` rounds) and ``EXPLAIN (ANALYZE, BUFFERS)`` of one more claim
  (a plpgsql function's buffers are its nested statements'), first without the flow indexes,
  then with them. A claim that takes longer than ``--claim-timeout`` is stopped and reported as
  such (without the group index a claim walks the whole queue once per group).

- ``guard``: what the flow-control guard adds to the plain claim (one probe of
  ``tasker.queue_flow``'s key, and the ``UNION ALL`` row that says "switch"): the claim of
  ``--base-queries`` (``tasker_worker/db/queries.py`` of a checkout before flow control) and this
  checkout's, both prepared and planned per execution as the worker runs them, alternated on one
  queue, claims of 16 taking new messages: client wall time per claim.

    python benchmarks/flow.py                          # drain and claim (about 25 minutes on 2 cores)
    python benchmarks/flow.py --only guard --base-queries /work/base-a2495/tasker_worker/db/queries.py
    python benchmarks/flow.py --only drain --steps 20000 --rounds 3
    python benchmarks/flow.py --only claim --backlog 100000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import psutil
import psycopg
from common import (
    NS,
    QUEUE,
    RERUNS,
    RESULTS,
    SEND_BATCH,
    ServerCpu,
    busy_cpu_s,
    commit_ms,
    disturbed,
    machine,
    percentiles_ms,
    print_table,
    process_tree_cpu,
    server,
    start_worker,
    stop,
    tasker_database,
    wait_for,
    wait_idle,
    wait_quiet,
    write_json,
)
from psycopg.types.json import Jsonb

from tasker_worker.db import queries
from tasker_worker.domain.steps import StepMessage

#: name -> (max_running, groups, priorities)
VARIANTS: dict[str, tuple[int | None, int, bool]] = {
    "none": (None, 0, False),
    "max_running 8": (8, 0, False),
    "max_running 64": (64, 0, False),
    "10 groups": (None, 10, False),
    "100 groups": (None, 100, False),
    "priorities": (None, 0, True),
}

DRAIN_COLUMNS = [
    ("round", "round"),
    ("setup", "code"),
    ("variant", "variant"),
    ("steps", "steps"),
    ("steps_per_s", "steps/s"),
    ("vs_none", "x none"),
    ("max_running_seen", "most held at once"),
    ("worker_cpu_us_per_step", "worker CPU us/step"),
    ("server_cpu_us_per_step", "server CPU us/step"),
    ("exactly_once", "exactly once"),
    ("others_cpu_s", "others' CPU s"),
    ("commit_ms", "commit ms"),
    ("load", "load 1m"),
]


# --- setting a namespace up ----------------------------------------------------------------------


def _bodies(n: int, groups: int, priorities: bool, first: int = 0) -> list[Jsonb]:
    extra: list[dict[str, Any]] = [{} for _ in range(n)]
    for k, e in enumerate(extra):
        i = first + k
        if groups:
            e["group"] = f"g{i % groups}"
        if priorities:
            e["priority"] = i % 10
    return [Jsonb(StepMessage.build(NS, "noop", {"i": first + k}, **extra[k])) for k in range(n)]


def enqueue(url: str, steps: int, groups: int, priorities: bool) -> None:
    """``steps`` steps with ``pgmq.send_batch``, 1,000 a statement (bodies built a batch at a time)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(0, steps, SEND_BATCH):
            bodies = _bodies(min(SEND_BATCH, steps - i), groups, priorities, i)
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, bodies))


async def _ensure_indexes(url: str) -> list[str]:
    from psycopg_pool import AsyncConnectionPool

    from tasker_worker.db import flow as flow_db

    async with AsyncConnectionPool(url, min_size=1, max_size=1, kwargs={"autocommit": True}, open=False) as pool:
        found = await flow_db.read_flow(pool, NS)
        return await flow_db.ensure_indexes(pool, NS, found[0]) if found else []


def set_flow(url: str, max_running: int | None, groups: bool, priorities: bool, indexes: bool = True) -> list[str]:
    """Flow control of the ``bench`` namespace as an operator (a limit) or its first claims
    (groups, priorities) leave it; with ``indexes``, the flow indexes built as the CLI and the
    supervisor build them. The names of the indexes built."""
    with psycopg.connect(url, autocommit=True) as conn:
        if max_running is not None:
            conn.execute("SELECT tasker.set_queue_limits(%s, %s, p_by => 'bench')", (NS, max_running))
        if groups or priorities:
            conn.execute(queries.NOTE_FLOW_FIELDS, (NS, priorities, groups))
    return anyio.run(_ensure_indexes, url) if indexes else []


def build_indexes(url: str, kinds: list[str]) -> list[str]:
    """The flow indexes of ``kinds`` on the bench queue, built as ``db/flow.ensure_indexes``
    builds them (``CREATE INDEX CONCURRENTLY``, the same names); their names."""
    from psycopg import sql as pgsql

    from tasker_worker.db import flow as flow_db

    names = []
    with psycopg.connect(url, autocommit=True) as conn:
        for kind in kinds:
            name = flow_db.index_name(QUEUE, kind)
            conn.execute(
                pgsql.SQL(queries.FLOW_INDEXES[kind]).format(
                    name=pgsql.Identifier(name), table=pgsql.Identifier("pgmq", "q_" + QUEUE)
                )
            )
            names.append(name)
    return names


def most_held(conn: psycopg.Connection[Any]) -> int:
    """The most steps that held a live claim at one instant: from each outcome row's claim
    (``claimed_at``) to its write (``recorded_at``), both on the server's clock. What
    ``max_running`` bounds (a no-op handler's own run is too short to overlap another's)."""
    row = conn.execute(
        "SELECT max(held) FROM (SELECT sum(d) OVER (ORDER BY t, d) AS held FROM ("
        " SELECT claimed_at AS t, 1 AS d FROM tasker.step_results"
        " UNION ALL SELECT recorded_at, -1 FROM tasker.step_results) AS e) AS s"
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# --- drain -------------------------------------------------------------------------------------------


def flow_drain(
    admin: str, variant: str, steps: int, tree: Path | None = None, environ: dict[str, str] | None = None
) -> dict[str, Any]:
    """One drain of ``variant`` on a fresh database, the worker at the shipped defaults (of
    the code in ``tree``, default this checkout; ``environ``: more variables for the worker)."""
    max_running, groups, priorities = VARIANTS[variant]
    url = tasker_database(admin, "bench_flow", tree)
    enqueue(url, steps, groups, priorities)
    built = set_flow(url, max_running, groups > 0, priorities)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE pgmq.q_{QUEUE}")
    commit = commit_ms(url)
    server_cpu = ServerCpu(url)
    proc = start_worker(url, None, env=None, tree=tree, settings=environ)
    try:
        worker = psutil.Process(proc.pid)
        with psycopg.connect(url, autocommit=True) as conn:

            def recorded() -> int:
                row = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()
                return int(row[0]) if row else 0

            wait_for(lambda: recorded() > 0, 120, "the first outcome", proc)
            cpu0 = process_tree_cpu(worker)
            server_cpu.start()
            busy0, own0 = busy_cpu_s(), time.process_time()
            wait_for(lambda: recorded() >= steps, 900, f"{steps} outcomes", proc, interval=0.25)
            cpu1 = process_tree_cpu(worker)
            server_s = server_cpu.seconds()
            others = busy_cpu_s() - busy0 - (cpu1 - cpu0) - (server_s or 0.0) - (time.process_time() - own0)
            first, last, distinct, succeeded = conn.execute(
                "SELECT min(started_at), max(recorded_at), count(DISTINCT step_uuid),"
                " count(*) FILTER (WHERE status = 'succeeded') FROM tasker.step_results"
            ).fetchone()
            left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()[0]
            peak = most_held(conn)
    finally:
        stop(proc)
    seconds = (last - first).total_seconds()
    return {
        "variant": variant,
        "steps": steps,
        "indexes": built,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 1),
        "max_running_seen": peak,
        "exactly_once": distinct == steps == succeeded and left == 0 and (max_running is None or peak <= max_running),
        "worker_cpu_us_per_step": round((cpu1 - cpu0) / steps * 1e6, 1),
        "server_cpu_us_per_step": round(server_s / steps * 1e6, 1) if server_s is not None else None,
        "others_cpu_s": round(others, 2),
        "commit_ms": commit,
    }


def drains(
    admin: str, variants: list[str], steps: int, rounds: int, setups: list[Any] | None = None
) -> list[dict[str, Any]]:
    """Every variant (and each of ``setups``: other code or settings, see drain.parse_setup)
    once per round, alternated; each against ``none`` of its round and setup."""
    rows: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        for setup in setups or [None]:
            base: float | None = None
            for variant in variants:
                for attempt in range(RERUNS + 1):
                    wait_idle()
                    row = flow_drain(
                        admin,
                        variant,
                        steps,
                        setup.tree if setup else None,
                        setup.environ() if setup else None,
                    )
                    row.update(round=r, setup=setup.label if setup else "", load=round(os.getloadavg()[0], 2))
                    row.update(disturbed=disturbed(row), attempt=attempt + 1)
                    if variant == "none" and not row["disturbed"]:
                        base = row["steps_per_s"]
                    row["vs_none"] = round(row["steps_per_s"] / base, 2) if base else None
                    rows.append(row)
                    print(
                        f"  round {r} {row['setup']} {variant}: {row['steps_per_s']:,.0f} steps/s,"
                        f" most held {row['max_running_seen']} (exactly once: {row['exactly_once']},"
                        f" others' CPU {row['others_cpu_s']} s in {row['seconds']} s, load {row['load']})"
                        + (" DISTURBED, run again" if row["disturbed"] and attempt < RERUNS else ""),
                        flush=True,
                    )
                    if not row["disturbed"]:
                        break
    return rows


# --- the claim on a long queue -----------------------------------------------------------------------

CLAIM_COLUMNS = [
    ("indexes", "flow indexes"),
    ("claim", "claim"),
    ("claims", "claims"),
    ("took", "took (each)"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("explain_ms", "EXPLAIN ms"),
    ("buffers", "buffers hit/read"),
    ("timed_out", "stopped"),
]

#: name -> (flow row: max_running, uses_priority, uses_groups) or None for the plain claim
CLAIMS: dict[str, tuple[int | None, bool, bool] | None] = {
    "plain claim (no flow row)": None,
    "claim_flow, priorities": (None, True, False),
    "claim_flow, groups + priorities": (None, True, True),
    "claim_flow, max_running (not reached) + priorities": (1_000_000, True, False),
}


def fill(conn: psycopg.Connection[Any], n: int, groups: int, queue: str = QUEUE) -> None:
    """``n`` visible messages with a group (of ``groups``) and a priority each, server-side, in
    batches (no notification: triggers off); then VACUUM ANALYZE."""
    conn.execute("SET session_replication_role = replica")
    for lo in range(0, n, 250_000):
        conn.execute(
            f"INSERT INTO pgmq.q_{queue} (vt, message)"
            " SELECT clock_timestamp(), jsonb_build_object('step_uuid', gen_random_uuid(),"
            " 'task_uuid', gen_random_uuid(), 'correlation_id', gen_random_uuid(), 'namespace', %s::text,"
            " 'handler', 'noop', 'inputs', '{}'::jsonb, 'group', 'g' || (g %% %s), 'priority', (g * 7) %% 10)"
            " FROM generate_series(%s::bigint, %s::bigint) AS g",
            (NS, groups, lo + 1, min(n, lo + 250_000)),
        )
    conn.execute("RESET session_replication_role")
    conn.execute(f"VACUUM ANALYZE pgmq.q_{queue}")


def _set_row(conn: psycopg.Connection[Any], flow: tuple[int | None, bool, bool] | None) -> None:
    conn.execute("DELETE FROM tasker.queue_flow WHERE namespace = %s", (NS,))
    if flow is not None:
        max_running, priority, groups = flow
        conn.execute(
            "INSERT INTO tasker.queue_flow (namespace, max_running, uses_priority, uses_groups) VALUES (%s, %s, %s, %s)",
            (NS, max_running, priority, groups),
        )


def _claim(conn: psycopg.Connection[Any], flow: Any, statements: queries.QueueStatements) -> tuple[str, Any]:
    if flow is None:
        return statements.claim, {"qty": 100, "vt": 30, "worker_id": "bench", "stamp": STAMP}
    return queries.CLAIM_FLOW, {
        "queue": QUEUE,
        "qty": 100,
        "vt": 30,
        "stamp": STAMP,
        "worker_id": "bench",
        "skip_msgs": [],
        "skip_handlers": [],
        "announce": False,
        "stored": False,
    }


STAMP = '{"tasker_claim": {"worker_id": "bench"}}'
BUFFERS = re.compile(r"Buffers: shared(?: hit=(\d+))?(?: read=(\d+))?")


def explain(conn: psycopg.Connection[Any], text: str, params: Any) -> tuple[float, str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of one claim, rolled back: (ms, top buffers, the plan)."""
    conn.execute("BEGIN")
    try:
        plan = [r[0] for r in conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + text, params).fetchall()]
    finally:
        conn.execute("ROLLBACK")
    ms = next((float(m.group(1)) for line in plan if (m := re.search(r"Execution Time: ([\d.]+) ms", line))), 0.0)
    top = next((m for line in plan if (m := BUFFERS.search(line))), None)
    buffers = f"{top.group(1) or 0}/{top.group(2) or 0}" if top else "-"
    return ms, buffers, "\n".join(plan)


def claim_costs(admin: str, backlog: int, groups: int, rounds: int, timeout_s: float) -> list[dict[str, Any]]:
    """The claims of CLAIMS on one long queue, without the flow indexes and then with them."""
    url = tasker_database(admin, "bench_flow_claim")
    statements = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    rows = []
    with psycopg.connect(
        url,
        autocommit=True,
        options=f"-c plan_cache_mode=force_custom_plan -c statement_timeout={int(timeout_s * 1000)}",
    ) as conn:
        t0 = time.perf_counter()
        fill(conn, backlog, groups)
        print(f"  filled {backlog:,} messages in {time.perf_counter() - t0:.0f} s", flush=True)
        for with_indexes in (False, True):
            if with_indexes:
                # Every index one of the claims reads, as queue limit and the supervisor build
                # them (db/flow.ensure_indexes builds priority or group, whichever is needed).
                t0 = time.perf_counter()
                built = build_indexes(url, ["claimed", "priority", "group"])
                conn.execute(f"ANALYZE pgmq.q_{QUEUE}")
                print(f"  built {', '.join(built)} in {time.perf_counter() - t0:.0f} s", flush=True)
            for name, flow in CLAIMS.items():
                _set_row(conn, flow)
                text, params = _claim(conn, flow, statements)
                samples, stopped = [], False
                n = rounds
                for _ in range(n):
                    t0 = time.perf_counter()
                    try:
                        got = conn.execute(text, params).fetchall()
                    except psycopg.errors.QueryCanceled:
                        stopped = True
                        break
                    samples.append(time.perf_counter() - t0)
                    if len([g for g in got if g[0] is not None]) != 100:
                        raise RuntimeError(f"{name}: claimed {len(got)} rows, not 100: {got[-1:]}")
                    if len(samples) >= 3 and sum(samples) > timeout_s:
                        break  # slow enough to know; enough rounds of it
                ms, buffers, plan = (0.0, "-", "") if stopped else explain(conn, text, params)
                timing = percentiles_ms(samples)
                rows.append(
                    {
                        "backlog": backlog,
                        "groups": groups,
                        "indexes": "yes" if with_indexes else "no",
                        "claim": name,
                        "claims": len(samples),
                        "took": 100,
                        "p50_ms": timing["p50"],
                        "p99_ms": timing["p99"],
                        "explain_ms": round(ms, 2) if ms else None,
                        "buffers": buffers,
                        "timed_out": f"> {timeout_s:.0f} s" if stopped else "",
                        "plan": plan,
                    }
                )
                r = rows[-1]
                print(
                    f"  indexes {r['indexes']} {name}: p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms,"
                    f" EXPLAIN {r['explain_ms']} ms buffers {buffers} {r['timed_out']}",
                    flush=True,
                )
        _set_row(conn, None)
    return rows


# --- the guard ---------------------------------------------------------------------------------------

GUARD_COLUMNS = [
    ("round", "round"),
    ("claim", "claim"),
    ("claims", "claims of 16"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("mean_ms", "mean ms"),
    ("planning_ms", "planning ms (EXPLAIN)"),
    ("execution_ms", "execution ms (EXPLAIN)"),
]


def guard(admin: str, base_queries: Path, rounds: int, claims: int) -> list[dict[str, Any]]:
    """The plain claim of ``base_queries`` against this checkout's, alternated (see the docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("base_queries", base_queries)
    assert spec is not None and spec.loader is not None
    base = importlib.util.module_from_spec(spec)
    sys.modules["base_queries"] = base  # dataclasses look their module up
    spec.loader.exec_module(base)
    # One queue each, filled alike and claimed alike (each claim's messages deleted after it, as a
    # settle would): neither statement walks what the other left behind.
    queues = {"before flow control": ("guarda", base), "with the guard": ("guardb", queries)}
    texts = {
        name: module.QueueStatements.build(f"worker_{ns}_queue", ns, archive=False, store_events=False).claim
        for name, (ns, module) in queues.items()
    }
    url = tasker_database(admin, "bench_flow_guard")
    rows = []
    params = {"qty": 16, "vt": 3600, "worker_id": "bench", "stamp": STAMP}
    with psycopg.connect(url, autocommit=True, options="-c plan_cache_mode=force_custom_plan") as conn:
        for ns, _ in queues.values():
            conn.execute("SELECT tasker.create_namespace_queue(%s)", (ns,))
            fill(conn, (rounds * (claims + 50) + 50) * 16, 1, f"worker_{ns}_queue")
        for name, text in texts.items():  # prepared and warm before the first timed round
            for _ in range(20):
                got = conn.execute(text, params, prepare=True).fetchall()
                conn.execute(
                    f"DELETE FROM pgmq.q_worker_{queues[name][0]}_queue WHERE msg_id = ANY(%s)", ([g[0] for g in got],)
                )
        for r in range(1, rounds + 1):
            for name, text in texts.items():
                table = f"pgmq.q_worker_{queues[name][0]}_queue"
                samples = []
                for _ in range(claims):
                    t0 = time.perf_counter()
                    got = conn.execute(text, params, prepare=True).fetchall()
                    samples.append(time.perf_counter() - t0)
                    if len(got) != 16:
                        raise RuntimeError(f"{name}: claimed {len(got)}, not 16")
                    conn.execute(f"DELETE FROM {table} WHERE msg_id = ANY(%s)", ([g[0] for g in got],))
                timing = percentiles_ms(samples)
                planning, execution = [], []
                for _ in range(30):  # the server's own split, from EXPLAIN ANALYZE (rolled back)
                    conn.execute("BEGIN")
                    plan = [x[0] for x in conn.execute("EXPLAIN (ANALYZE, SUMMARY) " + text, params).fetchall()]
                    conn.execute("ROLLBACK")
                    for line in plan:
                        if m := re.search(r"Planning Time: ([\d.]+) ms", line):
                            planning.append(float(m.group(1)))
                        if m := re.search(r"Execution Time: ([\d.]+) ms", line):
                            execution.append(float(m.group(1)))
                rows.append(
                    {
                        "round": r,
                        "claim": name,
                        "claims": claims,
                        "p50_ms": timing["p50"],
                        "p95_ms": timing["p95"],
                        "mean_ms": round(sum(samples) / len(samples) * 1000, 3),
                        "planning_ms": round(statistics.median(planning), 3),
                        "execution_ms": round(statistics.median(execution), 3),
                    }
                )
                print(
                    f"  round {r} {name}: p50 {timing['p50']} ms, mean {rows[-1]['mean_ms']} ms; server planning"
                    f" {rows[-1]['planning_ms']} ms, execution {rows[-1]['execution_ms']} ms (EXPLAIN medians)",
                    flush=True,
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=["drain", "claim", "guard"])
    parser.add_argument("--base-queries", type=Path, help="queries.py of a checkout before flow control (guard)")
    parser.add_argument("--guard-claims", type=int, default=300, help="claims per round and statement (guard)")
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of the drains")
    parser.add_argument(
        "--setup",
        action="append",
        metavar="LABEL|tree=PATH|KEY=V",
        help="drain with other code or settings too, alternated (drain.py's --setup; env is ignored)",
    )
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=100, help="groups of the long queue")
    parser.add_argument("--claims", type=int, default=30, help="timed claims of each kind")
    parser.add_argument("--claim-timeout", type=float, default=60.0, help="seconds a claim may take")
    parser.add_argument("--json", type=Path, default=RESULTS / "flow.json")
    args = parser.parse_args()
    chosen = set(args.only or ["drain", "claim"])
    result: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with server(None) as (admin, _):
        if "drain" in chosen:
            print("drain under flow control (worker at the shipped defaults)")
            from drain import parse_setup

            setups = [parse_setup(x) for x in args.setup] if args.setup else None
            result["drain"] = drains(admin, args.variants, args.steps, args.rounds, setups)
        print(f"load before the first run: {wait_quiet():.2f}", flush=True)
        if "guard" in chosen:
            if args.base_queries is None:
                raise SystemExit("--only guard needs --base-queries")
            print("the plain claim before flow control and with its guard")
            result["guard"] = guard(admin, args.base_queries, args.rounds, args.guard_claims)
        if "claim" in chosen:
            print(f"the claim on a queue of {args.backlog:,} messages ({args.groups} groups, priorities 0-9)")
            result["claim"] = claim_costs(admin, args.backlog, args.groups, args.claims, args.claim_timeout)
    if "drain" in result:
        print_table(result["drain"], DRAIN_COLUMNS, f"drain of {args.steps:,} no-op steps under flow control")
    if "guard" in result:
        print_table(result["guard"], GUARD_COLUMNS, "the plain claim: before flow control and with its guard")
    if "claim" in result:
        print_table(result["claim"], CLAIM_COLUMNS, f"claims of 100 on a queue of {args.backlog:,}")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
