"""Registry benchmark: heartbeat rate through WorkerLifecycle, replay and compaction time.

    python benchmarks/registry.py [--workers 500] [--heartbeats 20]

Registers ``--workers`` workers, sends ``--heartbeats`` heartbeats each (every fourth one
flips ``busy``, so the log also grows), runs the supervision sweeps, then times
``events replay`` (replay + comparison with the live table), a compaction of the whole log, and
a replay from the snapshot. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tasker_worker.config.models import DatabaseConfig, EventsConfig, RegistryConfig  # noqa: E402
from tasker_worker.db import migrations  # noqa: E402
from tasker_worker.db.connection import open_pool  # noqa: E402
from tasker_worker.db.embedded import temporary_embedded  # noqa: E402
from tasker_worker.domain.clock import ManualClock  # noqa: E402
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration  # noqa: E402
from tasker_worker.fleet import eventlog  # noqa: E402
from tasker_worker.fleet.lifecycle import WorkerLifecycle  # noqa: E402
from tasker_worker.fleet.supervision import SupervisionJobs  # noqa: E402


async def run(url: str, workers: int, beats: int) -> dict[str, Any]:
    await migrations.migrate(url)
    pool = await open_pool(url, DatabaseConfig(), max_size=8)
    clock = ManualClock()
    commands = WorkerLifecycle(pool, clock, heartbeat_history=100)
    jobs = SupervisionJobs(commands, RegistryConfig(), EventsConfig())
    out: dict[str, Any] = {"workers": workers, "heartbeats_per_worker": beats}
    try:
        t0 = time.perf_counter()
        ids = [
            await commands.register(WorkerRegistration(worker_id=f"w{i}", name="bench", hostname="h", pid=i))
            for i in range(workers)
        ]
        out["register_per_s"] = round(workers / (time.perf_counter() - t0), 1)

        async def beat(worker_id: str) -> None:
            for j in range(beats):
                await commands.heartbeat(worker_id, Heartbeat(processed=j, busy=(j // 4) % 2 == 1))

        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for chunk in range(8):  # eight concurrent senders, like eight workers' heartbeats at once
                tg.start_soon(_each, ids[chunk::8], beat)
        out["heartbeats_per_s"] = round(workers * beats / (time.perf_counter() - t0), 1)
        await jobs.activate_pending()

        t0 = time.perf_counter()
        report = await eventlog.replay_and_compare(pool)
        out["replay_s"] = round(time.perf_counter() - t0, 3)
        out["events_replayed"] = report.events_applied
        out["consistent"] = report.consistent

        clock.advance(3600)
        t0 = time.perf_counter()
        out["compacted_events"] = await eventlog.compact(pool, clock.now())
        out["compaction_s"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        after = await eventlog.replay_and_compare(pool)
        out["replay_from_snapshot_s"] = round(time.perf_counter() - t0, 3)
        out["consistent_after_compaction"] = after.consistent and after.workers == report.workers
    finally:
        await pool.close()
    return out


async def _each(ids: list[str], beat: Any) -> None:
    for worker_id in ids:
        await beat(worker_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=500)
    parser.add_argument("--heartbeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "registry.json")
    args = parser.parse_args()
    with temporary_embedded(prefix="tasker-bench-") as (url, _):
        result = anyio.run(run, url, args.workers, args.heartbeats)
    for key, value in result.items():
        print(f"{key:<28} {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
