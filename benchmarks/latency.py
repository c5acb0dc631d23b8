"""Pickup latency: how long from a producer's send until the handler starts.

Two shapes, each on a fresh database:

- ``sequential``: 1,000 sends one after another, each awaited until its handler has started;
- ``paced``: 500 sends at 100 per second from the producer's connection, not awaited.

The worker runs in a process of its own (``systems.py ... serve``) and prints the wall-clock
time at which each ``probe`` handler started; the producer, in this process, notes the time just
before each send. Both read the same host clock. The send itself (the producer's INSERT, its
NOTIFY and its commit) is part of the latency, as it is for a user. For tasker-worker the source
of each claim (a notification or a poll) comes from the outcome rows; PollingOnly runs with a
100 ms polling interval, so about 50 ms is its expected latency for messages arriving at random.

    python benchmarks/latency.py                     # tasker-worker, every mode
    python benchmarks/latency.py --modes Hybrid --sequential 200 --paced 100

The single-claimer matrix (``--fleet``): 1/4/8/16 ``tasker-worker run`` processes at the shipped
defaults listening on one namespace, ``single_claimer`` on and off (and other ``claim_grace``
values), a paced stream of single sends; the pickup of each step from its outcome row (send to
handler start: ``started_at - enqueued_at``; and to its claim). Configurations alternate within
each round. ``--pin spread`` pins worker *i* to core *i* mod the cores (``taskset``), ``--pin
split`` puts the server and the producer on core 0 and the workers on the others, so the figure
is less the scheduler's:

    python benchmarks/latency.py --fleet 1 4 8 16 --single-claimer on off --claim-grace 50ms 10ms \
        --pin spread --rounds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
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
    machine,
    percentiles_ms,
    pin_server,
    print_table,
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
from systems import Send, Tasker, child_argv

from tasker_worker.db import queries
from tasker_worker.domain.steps import StepMessage

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
WARMUP = 20
COLUMNS = [
    ("system", "system"),
    ("shape", "shape"),
    ("n", "n"),
    ("p50", "p50 ms"),
    ("p95", "p95 ms"),
    ("p99", "p99 ms"),
    ("max", "max ms"),
    ("sources", "claimed by"),
]


class Probe:
    """Start times of jobs by index, as the worker process reports them."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}
        self._events: dict[int, anyio.Event] = {}

    def start(self, i: int, at: float) -> None:
        """Job ``i``'s handler started at wall-clock time ``at``."""
        self.started.setdefault(i, at)
        self._event(i).set()

    def _event(self, i: int) -> anyio.Event:
        return self._events.setdefault(i, anyio.Event())

    async def wait(self, i: int, timeout: float) -> None:
        """Until job ``i`` has started (at most ``timeout`` seconds)."""
        with anyio.fail_after(timeout):
            await self._event(i).wait()


async def sequential(send: Send, probe: Probe, n: int, first: int = 0) -> dict[int, float]:
    """``n`` sends, each awaited until started; ``{index: send-to-start seconds}``."""
    sent: dict[int, float] = {}
    for i in range(first, first + n):
        sent[i] = time.time()
        await send(i)
        await probe.wait(i, 30)
    return {i: probe.started[i] - t for i, t in sent.items()}


async def paced(send: Send, probe: Probe, n: int, rate: float, first: int = 0) -> dict[int, float]:
    """``n`` sends at ``rate`` per second, then wait for all; ``{index: seconds}``."""
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    for k, i in enumerate(range(first, first + n)):
        delay = t0 + k / rate - time.perf_counter()
        if delay > 0:
            await anyio.sleep(delay)
        sent[i] = time.time()
        await send(i)
    for i in sent:
        await probe.wait(i, 60)
    return {i: probe.started[i] - t for i, t in sent.items()}


async def measure(system: Any, admin: str, n_sequential: int, n_paced: int) -> list[dict[str, Any]]:
    """Both shapes for one system on a fresh database."""
    url = await system.install(admin, "bench_latency")
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
                    await sequential(send, probe, WARMUP, first=-WARMUP)
                    seq = await sequential(send, probe, n_sequential)
                    pac = await paced(send, probe, n_paced, 100.0, first=n_sequential)
                tg.cancel_scope.cancel()
        finally:
            await proc.stdin.aclose()
            with anyio.move_on_after(30):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    sources, split = await anyio.to_thread.run_sync(_sources, url) if isinstance(system, Tasker) else ({}, {})
    rows = []
    for shape, samples in (("sequential", seq), ("paced 100/s", pac)):
        by_source: dict[str, int] = {}
        for i in samples:
            src = sources.get(i, "?")
            by_source[src] = by_source.get(src, 0) + 1
        rows.append(
            {
                "system": system.label,
                **system.options(),
                "shape": shape,
                "n": len(samples),
                **percentiles_ms(list(samples.values())),
                "sources": ", ".join(f"{k} {v}" for k, v in sorted(by_source.items())) if sources else "-",
                # tasker only, from the outcome rows: send (its INSERT) -> claim (server clock),
                # claim -> handler start (the worker's clock), p50 ms.
                **_split_p50(split, samples),
            }
        )
    return rows


def _split_p50(split: dict[int, tuple[float, float]], samples: dict[int, float]) -> dict[str, float | None]:
    if not split:
        return {}
    to_claim = [split[i][0] for i in samples if i in split]
    to_start = [split[i][1] for i in samples if i in split]
    return {
        "send_to_claim_p50": percentiles_ms(to_claim)["p50"],
        "claim_to_start_p50": percentiles_ms(to_start)["p50"],
    }


def _sources(url: str) -> tuple[dict[int, str], dict[int, tuple[float, float]]]:
    """``{probe index: event|poll}`` from the outcome rows (the probe handler returns its index),
    and ``{probe index: (enqueued -> claimed, claimed -> started) seconds}``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT (result ->> 'i')::int, source, extract(epoch FROM claimed_at - enqueued_at),"
            " extract(epoch FROM started_at - claimed_at) FROM tasker.step_results"
        ).fetchall()
    return {int(i): str(src) for i, src, _, _ in rows}, {int(i): (float(a), float(b)) for i, _, a, b in rows}


def run(admin: str, systems: list[Any], n_sequential: int, n_paced: int) -> list[dict[str, Any]]:
    """Every system in turn."""
    rows: list[dict[str, Any]] = []
    for system in systems:
        rows += anyio.run(measure, system, admin, n_sequential, n_paced)
        print(f"  {system.label}: p50 {rows[-2]['p50']} ms, p99 {rows[-2]['p99']} ms (sequential)", flush=True)
    return rows


# --- the single-claimer matrix ------------------------------------------------------------------

FLEET_COLUMNS = [
    ("round", "round"),
    ("workers", "workers"),
    ("single_claimer", "single claimer"),
    ("claim_grace", "claim_grace"),
    ("pin", "pin"),
    ("n", "n"),
    ("p50", "start p50 ms"),
    ("p95", "start p95 ms"),
    ("p99", "start p99 ms"),
    ("claim_p50", "claim p50 ms"),
    ("claim_p99", "claim p99 ms"),
    ("sources", "claimed by"),
    ("load", "load 1m"),
]


def _cpus_for(i: int, pin: str) -> str | None:
    """The ``taskset -c`` list of worker ``i`` (None: not pinned)."""
    n = os.cpu_count() or 1
    if pin == "spread":
        return str(i % n)
    if pin == "split":
        return ",".join(str(c) for c in range(1, n)) if n > 1 else "0"
    return None


def _listening(url: str, workers: int) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            "         AND application_name = 'tasker-listener'),"
            "       (SELECT count(*) FROM tasker.workers WHERE status = 'active')"
        ).fetchone()
    return bool(row and row[0] >= workers and row[1] >= workers)


def fleet(
    admin: str,
    workers: int,
    single_claimer: bool,
    claim_grace: str | None,
    pin: str,
    n: int,
    rate: float,
    warmup_s: float = 3.0,
) -> dict[str, Any]:
    """A paced stream of ``n`` single sends at ``rate``/s into one namespace, ``workers``
    listening at the shipped defaults (only ``single_claimer`` and ``claim_grace`` set)."""
    url = tasker_database(admin, "bench_fleet_latency")
    settings = {"TASKER__EVENT_SYSTEM__LISTENER__SINGLE_CLAIMER": "true" if single_claimer else "false"}
    if claim_grace is not None:
        settings["TASKER__EVENT_SYSTEM__LISTENER__CLAIM_GRACE"] = claim_grace
    procs = [start_worker(url, None, env=None, settings=settings, cpus=_cpus_for(i, pin)) for i in range(workers)]
    own = os.sched_getaffinity(0)
    try:
        wait_for(lambda: _listening(url, workers), 120, "the fleet listening", procs[0], interval=0.2)
        if pin == "split":
            os.sched_setaffinity(0, {0})
        time.sleep(warmup_s)  # start-up traffic (registration, catch-up claims) is not the stream's
        load = os.getloadavg()[0]
        bodies = [Jsonb(StepMessage.build(NS, "noop", {"i": i})) for i in range(n)]
        with psycopg.connect(url, autocommit=True) as producer:
            start = time.perf_counter()
            for i, body in enumerate(bodies):
                pause = start + i / rate - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                producer.execute(queries.SEND, (QUEUE, body, 0), prepare=True)

            def settled() -> bool:
                row = producer.execute("SELECT count(*) FROM tasker.step_results").fetchone()
                return bool(row and row[0] >= n)

            wait_for(settled, 120, "the stream settled", procs[0], interval=0.1)
            rows = producer.execute(
                "SELECT extract(epoch FROM started_at - enqueued_at), extract(epoch FROM claimed_at - enqueued_at),"
                " source FROM tasker.step_results"
            ).fetchall()
    finally:
        os.sched_setaffinity(0, own)
        for proc in procs:
            stop(proc)
    start_ms = percentiles_ms([float(r[0]) for r in rows])
    claim_ms = percentiles_ms([float(r[1]) for r in rows])
    sources: dict[str, int] = {}
    for r in rows:
        sources[str(r[2])] = sources.get(str(r[2]), 0) + 1
    return {
        "workers": workers,
        "single_claimer": single_claimer,
        "claim_grace": claim_grace or "50ms (default)",
        "pin": pin,
        "n": len(rows),
        "rate": rate,
        **start_ms,
        "claim_p50": claim_ms["p50"],
        "claim_p99": claim_ms["p99"],
        "sources": ", ".join(f"{k} {v}" for k, v in sorted(sources.items())),
        "load": round(load, 2),
    }


def fleet_matrix(
    admin: str,
    data_dir: Any,
    sizes: list[int],
    claimers: list[bool],
    graces: list[str | None],
    pins: list[str],
    n: int,
    rate: float,
    rounds: int,
) -> list[dict[str, Any]]:
    """Every combination once per round, alternated; ``split`` also pins the server to core 0."""
    print(f"  load before the first run: {wait_quiet():.2f}", flush=True)
    rows = []
    for r in range(1, rounds + 1):
        for size in sizes:
            for pin in pins:
                for on in claimers:
                    for grace in graces if on else [None]:
                        wait_idle()
                        with pin_server(admin, "0" if pin == "split" else None):
                            row = fleet(admin, size, on, grace, pin, n, rate)
                        row["round"] = r
                        rows.append(row)
                        print(
                            f"  round {r} workers {size} single_claimer {on} grace {row['claim_grace']} pin {pin}:"
                            f" start p50 {row['p50']} p99 {row['p99']} ms (load {row['load']})",
                            flush=True,
                        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--paced", type=int, default=500)
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fleet", type=int, nargs="+", help="the single-claimer matrix with these fleet sizes")
    parser.add_argument("--single-claimer", nargs="+", choices=["on", "off"], default=["on", "off"])
    parser.add_argument(
        "--claim-grace", nargs="+", default=[None], help="claim_grace values to try with the single claimer"
    )
    parser.add_argument("--pin", nargs="+", choices=["none", "spread", "split"], default=["none"])
    parser.add_argument("--stream", type=int, default=300, help="steps in the fleet's paced stream")
    parser.add_argument("--rate", type=float, default=50.0, help="sends per second of the fleet's stream")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with server(args.url) as (admin, data_dir):
        if args.fleet:
            rows = fleet_matrix(
                admin,
                data_dir,
                args.fleet,
                [c == "on" for c in args.single_claimer],
                [None if g in (None, "default") else g for g in args.claim_grace],
                args.pin,
                args.stream,
                args.rate,
                args.rounds,
            )
            print_table(rows, FLEET_COLUMNS, "pickup latency of a paced stream, by fleet size and single claimer")
            write_json(args.json or RESULTS / "latency_fleet.json", {"machine": machine(), "fleet": rows})
            return
        rows = run(admin, [Tasker(mode) for mode in args.modes], args.sequential, args.paced)
    print_table(rows, COLUMNS, "pickup latency: send -> handler start")
    write_json(args.json or RESULTS / "latency.json", {"machine": machine(), "latency": rows})


if __name__ == "__main__":
    main()
