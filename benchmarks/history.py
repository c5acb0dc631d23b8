"""Partitioned outcome history (issue 35): the step path and retention over a large
``tasker.step_results``, before and after migration 0021.

- ``before``: the table as it was (migrations up to 0019): one primary key on step_uuid,
  version 4 step_uuids as producers made them, retention deleting the rows past the horizon in
  batches of 5,000 (the supervisor's statement of before 0021), then the VACUUM that the
  deleted rows ask for (autovacuum would run it; its cost is the delete's too).
- ``after``: the table partitioned by the day of each step_uuid's UUIDv7 time (0021), UUIDv7
  step_uuids, retention dropping the oldest day's partition (``tasker.drop_history_partition``,
  with its checks: no queued step of that day, no row finished within the horizon).

Each layout in a database of its own on one temporary embedded PostgreSQL (default settings,
``--url`` for a server of yours), one after the other (the first is dropped before the second
is filled, so the disk holds one at a time):

1. populate ``--rows`` outcome rows spread evenly over ``--days`` days (INSERT ... SELECT
   generate_series, a million rows a statement; before: the index built after the load), then
   VACUUM ANALYZE;
2. claim + dedup probe: ``--rounds`` claims of ``--batch`` messages (the worker's own claim
   statement, prepared, planned on each execution as a worker's session does), half of them
   steps already recorded at random points of the history (the probe finds them), half new;
   and as many claims of one message;
3. settle: the worker's settle statement for each claim of ``--batch`` (the new half recorded,
   the recorded half settled without a row): ms per statement and outcome rows written per
   second of settle time;
4. retention: remove the oldest day (``--rows / --days`` rows): seconds, WAL bytes written
   (pg_current_wal_lsn before and after, from a fresh CHECKPOINT), rows and partitions removed.

    python benchmarks/history.py                          # 10,000,000 rows over 10 days
    python benchmarks/history.py --rows 100000000         # 100,000,000 (about 30 GB on disk at a time)
    python benchmarks/history.py --rows 1000000 --only after
"""

from __future__ import annotations

import argparse
import random
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import psycopg
from common import NS, QUEUE, RESULTS, database, machine, percentiles_ms, print_table, server, write_json
from psycopg.types.json import Jsonb

from tasker_worker.db import migrations, queries
from tasker_worker.db.queue_client import encode_outcomes
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source, StepMessage, uuid7

#: The last migration of before the partitioned history.
BEFORE = "0019"
CHUNK = 1_000_000
#: The retention job's batch (``[retention] batch_size``'s default).
BATCH_SIZE = 5000

#: The claim's dedup probe and the settle's INSERT as they were before 0021: this branch's
#: statements with 0021's changes taken out (each replacement must match once, or the
#: comparison is stale).
_CLAIM_0021 = (
    (
        """, recorded AS MATERIALIZED (
    SELECT r.u FROM tasker.recorded_step_uuids(ARRAY(SELECT tasker.try_uuid(c.message ->> 'step_uuid') FROM claimed AS c)) AS r(u)
)
""",
        "\n",
    ),
    (
        """       coalesce(tasker.try_uuid(c.message ->> 'step_uuid') IN (SELECT r.u FROM recorded AS r), false),
       c.prior_read_at, NULL::text AS hold, NULL::float8 AS retry_after
  FROM claimed AS c""",
        """       d.step_uuid IS NOT NULL, c.prior_read_at, NULL::text AS hold, NULL::float8 AS retry_after
  FROM claimed AS c
  LEFT JOIN LATERAL (
      SELECT s.step_uuid FROM tasker.step_results AS s
       WHERE s.step_uuid = tasker.try_uuid(c.message ->> 'step_uuid')
       LIMIT 1) AS d ON true""",
    ),
)
_SETTLE_0021 = (
    ("source, events_stored, uuid_time)", "source, events_stored)"),
    ("s.source, false, tasker.uuid_time(s.step_uuid)", "s.source, false"),
    ("ON CONFLICT DO NOTHING\n", "ON CONFLICT (step_uuid) DO NOTHING\n"),
)
#: The retention statement of before 0021 (one batch; by ctid, found through the BRIN index).
PRUNE_BEFORE = """
DELETE FROM tasker.step_results
 WHERE ctid = ANY (ARRAY(
       SELECT ctid FROM tasker.step_results WHERE finished_at < %(cutoff)s LIMIT %(batch)s))
"""

#: Every column a worker writes, as a worker writes it; {step} is the step_uuid expression,
#: {at} the time the step was made (g counts the rows).
ROWS = """
INSERT INTO tasker.step_results (step_uuid, task_uuid, correlation_id, namespace, queue_name, msg_id, handler,
                                 status, result, attempts, worker_id, enqueued_at, claimed_at, started_at,
                                 finished_at, source, recorded_at, events_stored{stamp_column})
SELECT u, md5(g::text || 't')::uuid, md5(g::text || 'c')::uuid, 'bench', 'worker_bench_queue', g, 'noop',
       'succeeded', jsonb_build_object('ok', true, 'n', g), 1, 'bench-worker-1', at, at + interval '2 ms',
       at + interval '3 ms', at + interval '5 ms', 'event', at + interval '6 ms', false{stamp_value}
  FROM (SELECT g, at, {step} AS u
          FROM (SELECT g, %(start)s::timestamptz + (g - 1) * %(spacing)s::interval AS at
                  FROM generate_series(%(first)s::bigint, %(last)s::bigint) AS g) AS t) AS s
"""


def statements(layout: str) -> tuple[str, str]:
    """The worker's claim and settle statements for ``layout``."""
    built = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False)
    claim, settle = built.claim, built.settle
    if layout == "before":
        for new, old in _CLAIM_0021:
            assert claim.count(new) == 1, new
            claim = claim.replace(new, old)
        for new, old in _SETTLE_0021:
            assert settle.count(new) == 1, new
            settle = settle.replace(new, old)
    return claim, settle


def prepare(admin: str, layout: str) -> str:
    """A database with the schema of ``layout`` and the bench queue; its URL."""
    url = database(admin, f"bench_history_{layout}")
    anyio.run(migrations.migrate, url, BEFORE if layout == "before" else None)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return url


def populate(url: str, layout: str, rows: int, days: int, now: datetime) -> dict[str, Any]:
    """``rows`` outcome rows, the oldest made ``days`` days before today's midnight."""
    start = datetime.combine((now - timedelta(days=days)).date(), datetime.min.time(), UTC)
    spacing = timedelta(days=days) / rows
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("SET synchronous_commit = off")
        if layout == "before":
            # Today's producers: random step_uuids. The indexes are built after the load (faster).
            conn.execute("ALTER TABLE tasker.step_results DROP CONSTRAINT step_results_pkey")
            conn.execute("DROP INDEX tasker.step_results_finished_brin")
            text = ROWS.format(step="gen_random_uuid()", stamp_column="", stamp_value="")
        else:
            for d in range(days + 4):  # the days of the history, today and three ahead
                conn.execute("SELECT tasker.create_history_partition(%s)", ((start + timedelta(days=d)).date(),))
            text = ROWS.format(
                step="tasker.uuid_v7(at)", stamp_column=", uuid_time", stamp_value=", tasker.uuid_time(u)"
            )
        for first in range(1, rows + 1, CHUNK):
            last = min(rows, first + CHUNK - 1)
            conn.execute(text, {"start": start, "spacing": spacing, "first": first, "last": last})
            print(f"  {layout}: {last:,} rows", flush=True)
        if layout == "before":
            conn.execute("ALTER TABLE tasker.step_results ADD CONSTRAINT step_results_pkey PRIMARY KEY (step_uuid)")
            conn.execute("CREATE INDEX step_results_finished_brin ON tasker.step_results USING brin (finished_at)")
        conn.execute("VACUUM ANALYZE tasker.step_results")
        size = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('tasker.step_results'))"
            " FROM pg_partition_tree('tasker.step_results')"
        )
        total = int(size.fetchone()[0])  # type: ignore[index]
    return {"populate_s": round(time.perf_counter() - t0, 1), "table_gib": round(total / 2**30, 2)}


def sample_recorded(url: str, n: int) -> list[str]:
    """``n`` step_uuids of recorded outcomes, from all over the history."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT sum(reltuples) FROM pg_class WHERE relname LIKE 'step\\_results%%' AND relkind = 'r'"
        ).fetchone()
        share = min(100.0, max(0.001, 400.0 * n / max(1.0, float(rows[0] or 1))))  # type: ignore[index]
        found = conn.execute(
            f"SELECT step_uuid::text FROM tasker.step_results TABLESAMPLE SYSTEM ({share:.4f})"
        ).fetchall()
    picked = [r[0] for r in found]
    random.shuffle(picked)
    assert len(picked) >= n, (len(picked), n)
    return picked[:n]


def step_path(url: str, layout: str, rounds: int, batch: int) -> dict[str, Any]:
    """Claims of ``batch`` (half recorded steps, half new) and their settles, and claims of one."""
    claim_text, settle_text = statements(layout)
    recorded = sample_recorded(url, rounds * batch // 2 + rounds)
    fresh = (lambda: str(uuid.uuid4())) if layout == "before" else (lambda: str(uuid7()))
    bodies = []
    for i in range(rounds * batch + rounds):
        message = StepMessage.build(NS, "noop", {"i": i})
        message["step_uuid"] = recorded.pop() if i % 2 == 0 and recorded else fresh()
        bodies.append(Jsonb(message))
    claims: list[float] = []
    singles: list[float] = []
    settles: list[float] = []
    written = 0
    hits = 0
    with psycopg.connect(url, autocommit=True, options="-c plan_cache_mode=force_custom_plan") as conn:
        for i in range(0, len(bodies), 1000):
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, bodies[i : i + 1000]))
        conn.execute(f"VACUUM ANALYZE pgmq.q_{QUEUE}")
        stamp = '{"tasker_claim": {"worker_id": "bench"}}'
        params = {"vt": 300, "worker_id": "bench", "stamp": stamp}
        for _ in range(rounds):
            t0 = time.perf_counter()
            got = conn.execute(claim_text, {**params, "qty": batch}, prepare=True).fetchall()
            claims.append(time.perf_counter() - t0)
            now = time.time()
            outcomes = []
            for r in got:
                msg = ClaimedMessage(QUEUE, r[0], r[1], r[2], r[3], r[4], r[5], r[6], Source.POLL, 0.0)
                msg.step = StepMessage.decode(msg.body)
                hits += bool(r[6])
                status = None if r[6] else OutcomeStatus.SUCCEEDED
                outcomes.append(Outcome(msg, status, {"ok": True}, None, now, now))
            t0 = time.perf_counter()
            conn.execute(
                settle_text, {"outcomes": encode_outcomes(outcomes), "worker_id": "bench"}, prepare=True
            ).fetchall()
            settles.append(time.perf_counter() - t0)
            written += sum(1 for o in outcomes if o.status is not None)
        for _ in range(rounds):
            t0 = time.perf_counter()
            conn.execute(claim_text, {**params, "qty": 1}, prepare=True).fetchall()
            singles.append(time.perf_counter() - t0)
        # The claims of one are not settled: their messages would hold their days (retention
        # keeps the day of a step still queued).
        conn.execute("SELECT pgmq.purge_queue(%s)", (QUEUE,))
    c, one, s = percentiles_ms(claims), percentiles_ms(singles), percentiles_ms(settles)
    return {
        "claim_batch": batch,
        "claim_p50_ms": c["p50"],
        "claim_p99_ms": c["p99"],
        "claim_1_p50_ms": one["p50"],
        "claim_1_p99_ms": one["p99"],
        "dedup_hits": hits,
        "settle_p50_ms": s["p50"],
        "settle_p99_ms": s["p99"],
        "settle_rows_per_s": round(written / sum(settles), 1),
    }


def _wal(conn: psycopg.Connection[Any]) -> str:
    return str(conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0])  # type: ignore[index]


def _wal_since(conn: psycopg.Connection[Any], lsn: str) -> int:
    return int(conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (lsn,)).fetchone()[0])  # type: ignore[index]


def prune(url: str, layout: str, days: int, now: datetime) -> dict[str, Any]:
    """Remove the oldest day of the history as retention does; what it cost."""
    oldest = datetime.combine((now - timedelta(days=days)).date(), datetime.min.time(), UTC)
    cutoff = oldest + timedelta(days=1)
    with psycopg.connect(url, autocommit=True) as conn:
        before = int(conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()[0])  # type: ignore[index]
        conn.execute("CHECKPOINT")
        lsn = _wal(conn)
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        if layout == "before":
            batches = 0
            while True:
                n = conn.execute(PRUNE_BEFORE, {"cutoff": cutoff, "batch": BATCH_SIZE}).rowcount
                batches += 1
                if n < BATCH_SIZE:
                    break
            out["delete_s"] = round(time.perf_counter() - t0, 2)
            out["delete_wal_mib"] = round(_wal_since(conn, lsn) / 2**20, 1)
            out["statements"] = batches
            lsn_vacuum, t1 = _wal(conn), time.perf_counter()
            conn.execute("VACUUM tasker.step_results")
            out["vacuum_s"] = round(time.perf_counter() - t1, 2)
            out["vacuum_wal_mib"] = round(_wal_since(conn, lsn_vacuum) / 2**20, 1)
            out["partitions_dropped"] = 0
        else:
            name = f"step_results_{oldest:%Y%m%d}"
            answer = conn.execute(
                "SELECT tasker.drop_history_partition(%s, %s, 1000)", (name, now - timedelta(days=days - 1))
            ).fetchone()
            assert answer == ("dropped",), answer
            out["statements"] = 1
            out["partitions_dropped"] = 1
        out["seconds"] = round(time.perf_counter() - t0, 2)
        out["wal_mib"] = round(_wal_since(conn, lsn) / 2**20, 1)
        after = int(conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()[0])  # type: ignore[index]
    out["rows_removed"] = before - after
    return out


def run(admin: str, layout: str, rows: int, days: int, rounds: int, batch: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    url = prepare(admin, layout)
    try:
        result: dict[str, Any] = {"layout": layout, "rows": rows, "days": days}
        result.update(populate(url, layout, rows, days, now))
        result.update(step_path(url, layout, rounds, batch))
        result["retention"] = prune(url, layout, days, now)
        return result
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS bench_history_{layout} WITH (FORCE)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=200, help="claims (and settles) measured")
    parser.add_argument("--batch", type=int, default=100, help="messages per claim")
    parser.add_argument("--only", nargs="+", choices=["before", "after"], default=["before", "after"])
    parser.add_argument("--url", help="an admin URL of your own server (default: a temporary embedded one)")
    parser.add_argument("--json", type=Path, default=RESULTS / "history.json")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "runs": []}
    with server(args.url) as (admin, _):
        with psycopg.connect(admin, autocommit=True) as conn:
            out["server"] = {
                k: conn.execute(f"SHOW {k}").fetchone()[0]  # type: ignore[index]
                for k in ("server_version", "shared_buffers", "max_wal_size", "checkpoint_timeout")
            }
        for layout in args.only:
            out["runs"].append(run(admin, layout, args.rows, args.days, args.rounds, args.batch))
    runs = out["runs"]
    print_table(
        runs,
        [
            ("layout", "layout"),
            ("rows", "rows"),
            ("table_gib", "GiB"),
            ("claim_p50_ms", f"claim {args.batch} p50 ms"),
            ("claim_p99_ms", "p99"),
            ("claim_1_p50_ms", "claim 1 p50 ms"),
            ("claim_1_p99_ms", "p99"),
            ("settle_p50_ms", f"settle {args.batch} p50 ms"),
            ("settle_p99_ms", "p99"),
            ("settle_rows_per_s", "rows/s"),
        ],
        f"step path over {args.rows:,} outcome rows ({args.days} days); half of each claim already recorded",
    )
    print_table(
        [{"layout": r["layout"], **r["retention"]} for r in runs],
        [
            ("layout", "layout"),
            ("rows_removed", "rows removed"),
            ("partitions_dropped", "partitions dropped"),
            ("statements", "statements"),
            ("seconds", "seconds"),
            ("wal_mib", "WAL MiB"),
            ("delete_s", "of which delete s"),
            ("vacuum_s", "vacuum s"),
            ("vacuum_wal_mib", "vacuum WAL MiB"),
        ],
        "retention: the oldest day removed",
    )
    print(f"server: {out['server']}")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
