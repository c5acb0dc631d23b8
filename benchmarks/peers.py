"""The peers on the drain workload, and the raw SQL limit.

- PgQueuer (batch 10, its default, and batch 100, its best) and Procrastinate (concurrency 1,
  its default, and 16): pre-enqueue N no-op jobs through each one's documented bulk API, then
  one worker process consumes them; timed from the first job start until the worker returns
  with the queue empty (both have a "stop when the queue is empty" mode). Exactly-once is
  checked as for tasker-worker: N handler calls, N distinct jobs, nothing left.
- The raw limit: a server-side loop (one DO block, one connection) that claims 100 messages
  with ``pgmq.read`` and archives them with ``pgmq.archive``, committing each batch, with no
  Python at all: what the database can do on this machine for a pgmq claim/ack pair.

    python benchmarks/peers.py
    python benchmarks/peers.py --steps 5000 --skip procrastinate
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from common import (
    QUEUE,
    RESULTS,
    ServerCpu,
    busy_cpu_s,
    commit_ms,
    machine,
    print_table,
    server,
    tasker_database,
    write_json,
)
from systems import PgQueuer, Procrastinate, child_argv

COLUMNS = [
    ("system", "system"),
    ("steps", "jobs"),
    ("seconds", "seconds"),
    ("steps_per_s", "jobs/s"),
    ("enqueue_per_s", "enqueue/s"),
    ("worker_cpu_us_per_step", "worker CPU us/job"),
    ("server_cpu_us_per_step", "server CPU us/job"),
    ("exactly_once", "exactly once"),
]


def peer_drain(admin: str, system: PgQueuer | Procrastinate, steps: int) -> dict[str, Any]:
    """One drain of a peer on a fresh database."""
    url = anyio.run(system.install, admin, "bench_peer")
    enqueue_rate = system.enqueue_noop(url, steps)
    commit = commit_ms(url)
    server_cpu = ServerCpu(url)
    server_cpu.start()
    busy0, children0, own0, wall0 = busy_cpu_s(), _children_cpu(), time.process_time(), time.perf_counter()
    proc = subprocess.run(
        child_argv(system, "drain", url, steps), capture_output=True, text=True, timeout=1800, check=False
    )
    # Over the whole child process, its start-up and connections included.
    server_s = server_cpu.seconds()
    wall = time.perf_counter() - wall0
    others = busy_cpu_s() - busy0 - (_children_cpu() - children0) - (server_s or 0.0) - (time.process_time() - own0)
    if proc.returncode != 0:
        raise RuntimeError(f"{system.label} drain failed: {proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "system": system.label,
        "peer": system.name,
        **system.options(),
        **result,
        "enqueue_per_s": round(enqueue_rate, 1),
        "server_cpu_us_per_step": round(server_s / steps * 1e6, 1) if server_s is not None else None,
        "commit_ms": commit,
        # CPU the rest of the machine used meanwhile, over the child's whole run (its start-up too).
        "others_cpu_s": round(others, 2),
        "others_window_s": round(wall, 3),
    }


def _children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


RAW_LOOP = """
DO $$
DECLARE
    v_ids bigint[];
BEGIN
    LOOP
        SELECT array_agg(msg_id) INTO v_ids FROM pgmq.read('{queue}', 30, 100);
        EXIT WHEN v_ids IS NULL;
        PERFORM pgmq.archive('{queue}', v_ids);
        COMMIT;
    END LOOP;
END
$$
"""


def raw_limit(admin: str, steps: int) -> dict[str, Any]:
    """Claim 100 with pgmq.read, archive them, commit; in SQL only, on one connection."""
    from common import enqueue_steps

    url = tasker_database(admin, "bench_raw")
    enqueue_steps(url, steps)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        server_cpu = ServerCpu(url)
        server_cpu.start()
        t0 = time.perf_counter()
        conn.execute(RAW_LOOP.format(queue=QUEUE))
        seconds = time.perf_counter() - t0
        server_s = server_cpu.seconds()
        left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()
        archived = conn.execute(f"SELECT count(*) FROM pgmq.a_{QUEUE}").fetchone()
    return {
        "system": "raw SQL: pgmq.read 100 + archive",
        "steps": steps,
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 1),
        "server_cpu_us_per_step": round(server_s / steps * 1e6, 1) if server_s is not None else None,
        "exactly_once": bool(left and left[0] == 0 and archived and archived[0] == steps),
    }


def peers(steps: int, skip: list[str]) -> list[PgQueuer | Procrastinate]:
    """The peer configurations measured."""
    chosen: list[PgQueuer | Procrastinate] = []
    if "pgqueuer" not in skip:
        chosen += [PgQueuer(10), PgQueuer(100)]
    if "procrastinate" not in skip:
        chosen += [Procrastinate(1), Procrastinate(16)]
    return chosen


def run(admin: str, steps: int, skip: list[str]) -> list[dict[str, Any]]:
    """Every peer configuration, then the raw limit."""
    rows = []
    for system in peers(steps, skip):
        rows.append(peer_drain(admin, system, steps))
        print(f"  {system.label}: {rows[-1]['steps_per_s']:,.0f} jobs/s", flush=True)
    if "raw" not in skip:
        rows.append(raw_limit(admin, steps))
        print(f"  raw limit: {rows[-1]['steps_per_s']:,.0f} msgs/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--skip", nargs="*", default=[], choices=["pgqueuer", "procrastinate", "raw"])
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "peers.json")
    args = parser.parse_args()
    with server(args.url) as (admin, _):
        rows = run(admin, args.steps, args.skip)
    print_table(rows, COLUMNS, "peers: drain of no-op jobs, one worker process")
    write_json(args.json, {"machine": machine(), "peers": rows})


if __name__ == "__main__":
    main()
