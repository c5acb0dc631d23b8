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
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import psycopg
from anyio.streams.buffered import BufferedByteReceiveStream
from common import RESULTS, machine, percentiles_ms, print_table, server, write_json
from systems import Send, Tasker, child_argv

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
    sources = await anyio.to_thread.run_sync(_sources, url) if isinstance(system, Tasker) else {}
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
            }
        )
    return rows


def _sources(url: str) -> dict[int, str]:
    """``{probe index: event|poll}`` from the outcome rows (the probe handler returns its index)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT (result ->> 'i')::int, source FROM tasker.step_results").fetchall()
    return {int(i): str(src) for i, src in rows}


def run(admin: str, systems: list[Any], n_sequential: int, n_paced: int) -> list[dict[str, Any]]:
    """Every system in turn."""
    rows: list[dict[str, Any]] = []
    for system in systems:
        rows += anyio.run(measure, system, admin, n_sequential, n_paced)
        print(f"  {system.label}: p50 {rows[-2]['p50']} ms, p99 {rows[-2]['p99']} ms (sequential)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--paced", type=int, default=500)
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "latency.json")
    args = parser.parse_args()
    with server(args.url) as (admin, _):
        rows = run(admin, [Tasker(mode) for mode in args.modes], args.sequential, args.paced)
    print_table(rows, COLUMNS, "pickup latency: send -> handler start")
    write_json(args.json, {"machine": machine(), "latency": rows})


if __name__ == "__main__":
    main()
