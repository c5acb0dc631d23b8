"""NOTIFY at many producers: what the send trigger's notification costs producers, and what
migrations 0020 and 0024 give back.

A transaction that sent a NOTIFY takes a database-wide lock at commit, so notifying producers
commit one at a time. Measured as a new user would: producers each send one step per transaction
(``SELECT pgmq.send(...)``, autocommit, one connection each, in threads) into one namespace queue
for ``--seconds``; 1, 8 and 32 of them at once; one database, the trigger in each of these states
in turn (rounds alternate them: a slow minute of the machine hits all; the table shows medians):

- ``off``:      the triggers disabled: no notification at all (the ceiling);
- ``main``:     the trigger before 0020 (migration 0015's function): every send notifies;
- ``notify``:   the trigger in force (0024's: the decision in its WHEN clause) with an idle
                listening worker: every send notifies (the rule's reads are the difference from
                ``main``);
- ``drained``:  the trigger in force while every listening worker drains the namespace: no
                notification (a listener row holding a drain lease stands for them; ``--e2e``
                runs real ones);
- ``drained-0020``: the same with 0020's trigger (its function decides at every send): the
                before of 0024;
- ``quiet``:    the trigger in force with ``notify = false`` for the namespace.

``--e2e``: the same producers (``--e2e-producers``, 32) for ``--seconds`` while one real worker
(``tasker-worker run``, noop steps) runs the steps, then until it has run them all: main's trigger
with an EventDrivenOnly worker, the trigger in force (0024's) with an EventDrivenOnly worker, and
the triggers disabled with a PollingOnly worker (a 100 ms poll: the no-notify reference under the
same worker load).
Sends/s, steps/s, notifications per send (a listening session counts them), and the pickup
latency: send (the transaction's start, ``enqueued_at``) to handler start, from the outcome rows,
so a commit held up by the notify lock counts, as it does for the user. ``--paced R``: the same
at R sends/s in all (each producer on a fixed schedule), a rate every trigger sustains: the
pickup latency there is the fair comparison. ``--idle N``: N sequential sends to an idle
EventDrivenOnly worker, each awaited until its handler started (as ``latency.py``), main's
trigger and the one in force, alternately.

    python benchmarks/notify.py                                # the curve, 3 rounds of 5 s
    python benchmarks/notify.py --rounds 5 --e2e --paced 400 --idle 300
    python benchmarks/notify.py --producers 32 --variants off drained --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from anyio.streams.buffered import BufferedByteReceiveStream
from common import (
    NS,
    QUEUE,
    RESULTS,
    ServerCpu,
    machine,
    percentiles_ms,
    print_table,
    server,
    stop,
    tasker_database,
    wait_for,
    worker_env,
    write_json,
)
from latency import Probe, sequential
from systems import Tasker, child_argv

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = ROOT / "sql" / "migrations"
VARIANTS = ["off", "main", "notify", "drained", "drained-0020", "quiet"]
#: One step per send, each with its own ids (built by the server: the same cost in every variant).
SEND = f"""
SELECT pgmq.send(%s, jsonb_build_object('step_uuid', gen_random_uuid(), 'task_uuid', gen_random_uuid(),
                                         'correlation_id', gen_random_uuid(), 'namespace', '{NS}',
                                         'handler', 'noop', 'inputs', '{{}}'::jsonb))
"""
DRAINER = "bench-drainer"
TRIGGER = f"pgmq.q_{QUEUE}"
COLUMNS = [
    ("producers", "producers"),
    ("variant", "trigger"),
    ("sends_per_s", "sends/s (median)"),
    ("vs_off", "x off"),
    ("server_cpu_us_per_send", "server CPU us/send"),
    ("rounds", "each round"),
]
E2E_COLUMNS = [
    ("variant", "trigger"),
    ("worker", "worker"),
    ("producers", "producers"),
    ("sends_per_s", "sends/s"),
    ("vs_off", "x off"),
    ("steps_per_s", "steps/s"),
    ("notifications_per_send", "NOTIFY/send"),
    ("p50", "pickup p50 ms"),
    ("p95", "p95 ms"),
    ("p99", "p99 ms"),
    ("exactly_once", "exactly once"),
]
IDLE_COLUMNS = [
    ("variant", "trigger"),
    ("n", "n"),
    ("p50", "p50 ms"),
    ("p95", "p95 ms"),
    ("p99", "p99 ms"),
    ("max", "max ms"),
]


def trigger_function(migration: str) -> str:
    """The ``CREATE OR REPLACE FUNCTION tasker.notify_message_ready()`` of one migration file."""
    text = (MIGRATIONS / migration).read_text()
    start = text.index("CREATE OR REPLACE FUNCTION tasker.notify_message_ready()")
    end = text.index("\n$$;", start) + len("\n$$;")
    return text[start:end]


def migration_named(prefix: str) -> str:
    """The file name of migration ``prefix`` (its number)."""
    return next(p.name for p in sorted(MIGRATIONS.glob(f"{prefix}_*.sql")))


MAIN_TRIGGER = trigger_function("0015_tasker_core_wire.sql")
TRIGGER_0020 = trigger_function(migration_named("0020"))
#: The trigger function in force: that of the last migration that defines it.
CURRENT_TRIGGER = trigger_function(
    next(
        p.name
        for p in sorted(MIGRATIONS.glob("*.sql"), reverse=True)
        if "tasker.notify_message_ready()" in p.read_text()
    )
)
#: The shape before 0024: the statement-level trigger runs its function at every send (the
#: function decides). Its WHEN (true), its argument and a delayed-row trigger that never fires
#: make it look current to tasker.attach_notify_trigger, which a worker's start runs
#: (ensure_notify_triggers) and which would otherwise replace it.
PLAIN_TRIGGER = (
    f"CREATE TRIGGER tasker_notify_message_ready AFTER INSERT ON {TRIGGER} REFERENCING NEW TABLE AS new_rows "
    "FOR EACH STATEMENT WHEN (true) EXECUTE FUNCTION tasker.notify_message_ready('bench');"
    f"CREATE TRIGGER tasker_mark_delayed_send BEFORE INSERT ON {TRIGGER} FOR EACH ROW WHEN (false) "
    "EXECUTE FUNCTION tasker.mark_delayed_send()"
)


def set_variant(url: str, variant: str) -> None:
    """Put the database in ``variant``'s state, with an empty queue."""
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("tasker_notify_message_ready", "tasker_mark_delayed_send"):
            conn.execute(f"DROP TRIGGER IF EXISTS {name} ON {TRIGGER}")
        if variant == "main":
            conn.execute(MAIN_TRIGGER)
            conn.execute(PLAIN_TRIGGER)
        elif variant == "drained-0020":
            conn.execute(TRIGGER_0020)
            conn.execute(PLAIN_TRIGGER)
        else:
            conn.execute(CURRENT_TRIGGER)
            conn.execute("SELECT tasker.attach_notify_trigger(%s::regclass)", (TRIGGER,))
            if variant == "off":
                # Disabled, not dropped: a worker's start (ensure_notify_triggers) would attach them.
                conn.execute(f"ALTER TABLE {TRIGGER} DISABLE TRIGGER tasker_notify_message_ready")
                conn.execute(f"ALTER TABLE {TRIGGER} DISABLE TRIGGER tasker_mark_delayed_send")
        conn.execute("DELETE FROM tasker.queue_listeners")
        conn.execute("SELECT tasker.set_queue_notify(%s, %s, 'bench')", (NS, variant != "quiet"))
        if variant == "notify":
            conn.execute("SELECT * FROM tasker.keep_listening(%s, %s, 3600)", (DRAINER, [NS]))
        elif variant.startswith("drained"):
            conn.execute("SELECT tasker.take_drain(%s, %s, 3600, 3600)", (NS, DRAINER))
        conn.execute(f"TRUNCATE {TRIGGER}")
        conn.execute("CHECKPOINT")  # every run starts with the same WAL state


def produce(url: str, producers: int, seconds: float, rate: float | None = None) -> tuple[int, float]:
    """``producers`` threads sending one step per transaction for ``seconds`` (timed from when
    all of them are connected), as fast as they can or ``rate`` sends/s in all (each on a fixed
    schedule); (sends, seconds)."""
    counts = [0] * producers
    connected = threading.Barrier(producers + 1)
    go = threading.Event()
    until: list[float] = []

    def one(k: int) -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            connected.wait()
            go.wait()
            n = 0
            end = until[0]
            start = end - seconds + (k / rate if rate else 0.0)  # producers spread over the period
            while time.monotonic() < end:
                if rate:
                    wait = start + n * producers / rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                conn.execute(SEND, (QUEUE,))
                n += 1
            counts[k] = n

    threads = [threading.Thread(target=one, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    connected.wait()
    t0 = time.monotonic()
    until.append(t0 + seconds)
    go.set()
    for t in threads:
        t.join()
    return sum(counts), time.monotonic() - t0


def curve(
    url: str, producer_counts: list[int], variants: list[str], rounds: int, seconds: float
) -> list[dict[str, Any]]:
    """Sends/s of each variant at each producer count, rounds alternating the variants."""
    cpu = ServerCpu(url)
    rates: dict[tuple[int, str], list[float]] = {}
    cpus: dict[tuple[int, str], list[float]] = {}
    for p in producer_counts:
        for r in range(rounds):
            for v in variants:
                set_variant(url, v)
                cpu.start()
                sent, took = produce(url, p, seconds)
                used = cpu.seconds()
                rates.setdefault((p, v), []).append(sent / took)
                if used is not None:
                    cpus.setdefault((p, v), []).append(used / sent * 1e6)
            line = ", ".join(f"{v} {rates[(p, v)][-1]:,.0f}" for v in variants)
            print(f"  {p} producers, round {r + 1}: {line}", flush=True)
    rows = []
    for p in producer_counts:
        off = statistics.median(rates[(p, "off")]) if (p, "off") in rates else None
        for v in variants:
            med = statistics.median(rates[(p, v)])
            rows.append(
                {
                    "producers": p,
                    "variant": v,
                    "sends_per_s": round(med, 1),
                    "vs_off": round(med / off, 2) if off else None,
                    "server_cpu_us_per_send": round(statistics.median(cpus[(p, v)]), 1) if (p, v) in cpus else None,
                    "rounds": ", ".join(f"{x:,.0f}" for x in rates[(p, v)]),
                }
            )
    return rows


def start_worker(url: str, mode: str, concurrency: int) -> subprocess.Popen[str]:
    """``tasker-worker run`` on the bench namespace (production config; PollingOnly polls every 100 ms)."""
    env = worker_env(url)
    if mode == "PollingOnly":
        env["TASKER__EVENT_SYSTEM__FALLBACK_POLLER__POLLING_INTERVAL"] = "100ms"
    argv = [sys.executable, "-m", "tasker_worker.cli.main", "run", "--mode", mode, "--concurrency", str(concurrency)]
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def e2e(
    url: str, variant: str, mode: str, producers: int, seconds: float, concurrency: int, rate: float | None = None
) -> dict[str, Any]:
    """Producers (flat out, or ``rate`` sends/s in all) while a real worker runs the steps; then
    until it has run them all."""
    set_variant(url, variant)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM tasker.queue_listeners")
        conn.execute("TRUNCATE tasker.step_results")
    proc = start_worker(url, mode, concurrency)
    try:
        with psycopg.connect(url, autocommit=True) as conn, psycopg.connect(url, autocommit=True) as listener:

            def listening() -> bool:
                if mode == "PollingOnly":
                    return True
                row = conn.execute("SELECT count(*) FROM tasker.queue_listeners").fetchone()
                return bool(row and row[0])

            wait_for(listening, 60, "the worker's listener row", proc)
            listener.execute(f'LISTEN "pgmq_message_ready.{NS}"')
            sent, took = produce(url, producers, seconds, rate)

            def done() -> bool:
                row = conn.execute("SELECT count(*) FROM tasker.step_results").fetchone()
                return bool(row and row[0] >= sent)

            wait_for(done, 600, f"{sent} outcomes", proc, interval=0.25)
            listener.execute("SELECT pg_notify('bench_sentinel', '')")
            listener.execute('LISTEN "bench_sentinel"')
            listener.execute("SELECT pg_notify('bench_sentinel', '')")
            notified = 0
            for n in listener.notifies(timeout=60):
                if n.channel == "bench_sentinel":
                    break
                if json.loads(n.payload).get("message_count"):
                    notified += 1
            first, last, count, distinct = conn.execute(
                "SELECT min(started_at), max(recorded_at), count(*), count(DISTINCT step_uuid) FROM tasker.step_results"
            ).fetchone()
            pickup = [
                r[0]
                for r in conn.execute(
                    "SELECT extract(epoch FROM started_at - enqueued_at)::float8 FROM tasker.step_results"
                )
            ]
            left = conn.execute(f"SELECT count(*) FROM {TRIGGER}").fetchone()[0]
    finally:
        stop(proc)
    return {
        "variant": variant,
        "worker": mode,
        "producers": producers,
        "sends_per_s": round(sent / took, 1),
        "steps_per_s": round(count / (last - first).total_seconds(), 1),
        "rate": rate,
        "notifications_per_send": round(notified / sent, 3),
        **percentiles_ms(pickup),
        "exactly_once": count == distinct == sent and left == 0,
    }


async def idle_latency(url: str, variant: str, n: int) -> list[float]:
    """Sequential sends to an idle EventDrivenOnly worker, each awaited until its handler started."""
    set_variant(url, variant)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM tasker.queue_listeners")
    system = Tasker("EventDrivenOnly")
    probe = Probe()
    ready = anyio.Event()
    async with await anyio.open_process(
        child_argv(system, "serve", url), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None
    ) as proc:
        assert proc.stdout is not None and proc.stdin is not None

        async def read_lines() -> None:
            assert proc.stdout is not None
            lines = BufferedByteReceiveStream(proc.stdout)
            while True:
                line = (await lines.receive_until(b"\n", 4096)).decode()
                if line == "ready":
                    ready.set()
                elif line.startswith("started "):
                    _, i, at = line.split()
                    probe.start(int(i), float(at))

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_lines)
                with anyio.fail_after(60):
                    await ready.wait()
                async with system.producer(url) as send:
                    await sequential(send, probe, 20, first=-20)
                    samples = await sequential(send, probe, n)
                tg.cancel_scope.cancel()
        finally:
            await proc.stdin.aclose()
            with anyio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    return list(samples.values())


def e2e_table(
    url: str, args: argparse.Namespace, rate: float | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The end-to-end runs, alternating the triggers; the median run of each (by sends/s)."""
    runs: list[dict[str, Any]] = []
    for _ in range(args.e2e_rounds):
        for variant, mode in (("main", "EventDrivenOnly"), ("drained", "EventDrivenOnly"), ("off", "PollingOnly")):
            label = "0024" if variant == "drained" else variant
            row = e2e(url, variant, mode, args.e2e_producers, args.seconds, args.concurrency, rate)
            row["variant"] = label
            runs.append(row)
            print(
                f"  e2e {label} {mode}: {row['sends_per_s']:,.0f} sends/s, NOTIFY/send {row['notifications_per_send']},"
                f" pickup p50 {row['p50']} ms",
                flush=True,
            )
    rows = []
    for label in ("main", "0024", "off"):
        mine = sorted((r for r in runs if r["variant"] == label), key=lambda r: r["sends_per_s"])
        rows.append(dict(mine[len(mine) // 2]))
    off = next(r["sends_per_s"] for r in rows if r["variant"] == "off")
    for r in rows:
        r["vs_off"] = round(r["sends_per_s"] / off, 2)
    shape = f"{rate:g} sends/s" if rate else "flat out"
    title = f"end to end: {args.e2e_producers} producers ({shape}), one worker (concurrency {args.concurrency})"
    print_table(rows, E2E_COLUMNS, title)
    return rows, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--producers", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-curve", action="store_true", help="skip the producer curve")
    parser.add_argument("--e2e", action="store_true", help="also run producers against a real worker")
    parser.add_argument("--e2e-producers", type=int, default=32)
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64, help="the e2e worker's concurrency")
    parser.add_argument("--paced", type=float, default=0, help="also end to end at this many sends/s in all (0: no)")
    parser.add_argument("--idle", type=int, default=0, help="sequential sends for the idle pickup latency (0: none)")
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "notify.json")
    args = parser.parse_args()
    out: dict[str, Any] = {"machine": machine(), "started": time.time(), "seconds": args.seconds}
    with server(args.url) as (admin, _):
        url = tasker_database(admin, "bench_notify")
        with psycopg.connect(url, autocommit=True) as conn:
            out["server_version"] = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        if not args.no_curve:
            rows = curve(url, args.producers, args.variants, args.rounds, args.seconds)
            print_table(rows, COLUMNS, f"producers: one send per transaction, {args.seconds:g} s per round")
            out["curve"] = rows
        if args.e2e:
            out["e2e"], out["e2e_runs"] = e2e_table(url, args, None)
        if args.paced:
            out["paced"], out["paced_runs"] = e2e_table(url, args, args.paced)
        if args.idle:
            # Two runs of each, alternating; the percentiles are over both runs' samples.
            samples: dict[str, list[float]] = {"main": [], "notify": []}
            for _ in range(2):
                for variant in samples:
                    samples[variant] += anyio.run(idle_latency, url, variant, args.idle // 2)
            rows = [
                {"variant": "0024" if v == "notify" else v, "n": len(got), **percentiles_ms(got)}
                for v, got in samples.items()
            ]
            print_table(rows, IDLE_COLUMNS, "idle pickup latency (EventDrivenOnly): send -> handler start")
            out["idle_latency"] = rows
    write_json(args.json, out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
