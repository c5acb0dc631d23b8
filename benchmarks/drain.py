"""Drain benchmark of tasker-worker.

Enqueue N ``noop`` steps with ``pgmq.send_batch`` (the enqueue rate is reported on its own),
start one ``tasker-worker run`` process (or ``--processes K`` under its supervisor), and time
from the first handler start to the last outcome recorded. Per deployment mode, concurrency,
step events (derived, the default, or stored) and archive (off, the default, or on); the CPU
time per step of the worker processes and of the database server (when it runs on this machine)
is reported too. Every run checks exactly-once: N distinct outcomes, all succeeded, an empty
queue (and N archived messages with the archive on).

    python benchmarks/drain.py                       # 20,000 steps, every mode, concurrency 16, 128, 512
    python benchmarks/drain.py --modes Hybrid --concurrency 256 --step-events both --archive both
    python benchmarks/drain.py --modes Hybrid --concurrency 256 --processes 2

Configurations compared with each other run alternated (A, B, A, B, ...: ``--rounds``) on one
server, so that the machine's drift over minutes falls on all of them alike:

    python benchmarks/drain.py --defaults --rounds 3            # no flag at all: the shipped defaults
    python benchmarks/drain.py --defaults --trees /work/base-a2495 . --rounds 3   # before/after
    python benchmarks/drain.py --defaults --set worker.prefetch=0,32,64 --rounds 3  # candidates
    python benchmarks/drain.py --setup "base|tree=/work/base-a2495" --setup "prefetch 0|worker.prefetch=0" \
        --setup "production|env=production" --rounds 3    # any list of configurations
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg
from common import (
    QUEUE,
    RERUNS,
    RESULTS,
    ROOT,
    ServerCpu,
    busy_cpu_s,
    commit_ms,
    disturbed,
    enqueue_steps,
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
    worker_env,
    write_json,
)

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
COLUMNS = [
    ("label", "configuration"),
    ("round", "round"),
    ("mode", "mode"),
    ("concurrency", "conc"),
    ("step_events", "events"),
    ("archive", "archive"),
    ("processes", "procs"),
    ("steps", "steps"),
    ("seconds", "seconds"),
    ("steps_per_s", "steps/s"),
    ("enqueue_per_s", "enqueue/s"),
    ("worker_cpu_us_per_step", "worker CPU us/step"),
    ("server_cpu_us_per_step", "server CPU us/step"),
    ("exactly_once", "exactly once"),
    ("others_cpu_s", "others' CPU s"),
    ("commit_ms", "commit ms"),
    ("load", "load 1m"),
]


@dataclass(frozen=True)
class WorkerSetup:
    """How a drain's worker is started: its overlay (None: no TASKER_ENV, the shipped defaults),
    its flags (None: none given), more settings (dotted keys), and whose code runs it."""

    label: str
    mode: str | None = "Hybrid"
    concurrency: int | None = None
    env: str | None = "production"
    settings: dict[str, str] = field(default_factory=dict)
    tree: Path | None = None
    #: Not tasker at all: PgQueuer with this batch size (a yardstick in the same rounds).
    pgqueuer_batch: int | None = None

    def environ(self) -> dict[str, str]:
        """``settings`` as ``TASKER__SECTION__KEY`` variables (a name already in capitals, such as
        ``TASKER__WORKER__PREFETCH``, is taken as it is)."""
        return {k if k.isupper() else "TASKER__" + k.replace(".", "__").upper(): v for k, v in self.settings.items()}


def drain(
    admin: str,
    mode: str | None,
    concurrency: int | None,
    steps: int,
    step_events: str = "derived",
    archive: bool = False,
    processes: int = 1,
    setup: WorkerSetup | None = None,
) -> dict[str, Any]:
    """One drain run on a fresh database (``setup``: the worker's overlay, settings and code;
    by default the production overlay with ``mode`` and ``concurrency`` as flags)."""
    setup = setup or WorkerSetup(f"{mode} c{concurrency}", mode, concurrency)
    effective = effective_config(setup)
    mode = effective.get("event_system.deployment_mode", mode)
    concurrency = effective.get("event_system.max_concurrent_processors", concurrency)
    url = tasker_database(admin, "bench_drain", setup.tree)
    enqueue_rate = enqueue_steps(url, steps)
    commit = commit_ms(url)
    server_cpu = ServerCpu(url)
    extra: dict[str, Any] = {"step_events": step_events, "archive": archive} if setup.env is not None else {}
    proc = start_worker(
        url,
        setup.mode,
        setup.concurrency,
        processes,
        tree=setup.tree,
        env=setup.env,
        settings=setup.environ(),
        **extra,
    )
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
            # The times come from the outcome rows, not from this loop, so it can look rarely:
            # a count(*) every 20 ms was several percent of a core taken from the drain.
            wait_for(lambda: recorded() >= steps, 900, f"{steps} outcomes", proc, interval=0.25)
            cpu1 = process_tree_cpu(worker)
            server_s = server_cpu.seconds()
            busy = busy_cpu_s() - busy0
            own = time.process_time() - own0
            first, last, distinct, succeeded = conn.execute(
                "SELECT min(started_at), max(recorded_at), count(DISTINCT step_uuid),"
                " count(*) FILTER (WHERE status = 'succeeded') FROM tasker.step_results"
            ).fetchone()
            left = conn.execute(f"SELECT count(*) FROM pgmq.q_{QUEUE}").fetchone()[0]
            archived = conn.execute(f"SELECT count(*) FROM pgmq.a_{QUEUE}").fetchone()[0]
    finally:
        stop(proc)
    seconds = (last - first).total_seconds()
    return {
        "label": setup.label,
        "tree": str(setup.tree) if setup.tree else None,
        "env": setup.env,
        "settings": setup.settings,
        "mode": mode,
        "concurrency": concurrency,
        "prefetch": effective.get("worker.prefetch"),
        "batch_size": effective.get("event_system.fallback_poller.batch_size"),
        "step_events": step_events,
        "archive": archive,
        "processes": processes,
        "steps": steps,
        "exactly_once": distinct == steps == succeeded and left == 0 and archived == (steps if archive else 0),
        "seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 1),
        "enqueue_per_s": round(enqueue_rate, 1),
        # From the first outcome on: the start-up is not part of the per-step cost.
        "worker_cpu_us_per_step": round((cpu1 - cpu0) / steps * 1e6, 1),
        # Includes this script's count(*) every 250 ms and the server's background processes.
        "server_cpu_us_per_step": round(server_s / steps * 1e6, 1) if server_s is not None else None,
        # CPU the rest of the machine used meanwhile (other people's work: noise in the figure).
        "others_cpu_s": round(busy - (cpu1 - cpu0) - (server_s or 0.0) - own, 2),
        "commit_ms": commit,
        "load": round(os.getloadavg()[0], 2),
    }


def effective_config(setup: WorkerSetup, url: str = "postgresql://unused") -> dict[str, Any]:
    """The settings a worker of ``setup`` runs with (``tasker-worker config show --json`` in its
    environment, with its flags), ``{dotted key: value}``."""
    argv = [sys.executable, "-m", "tasker_worker.cli.main", "config", "show", "--json"]
    env = worker_env(url, env=setup.env, settings=setup.environ(), tree=setup.tree)
    if setup.mode is not None:
        env["TASKER__EVENT_SYSTEM__DEPLOYMENT_MODE"] = setup.mode
    if setup.concurrency is not None:
        env["TASKER__EVENT_SYSTEM__MAX_CONCURRENT_PROCESSORS"] = str(setup.concurrency)
    out = subprocess.run(argv, env=env, cwd=setup.tree or ROOT, capture_output=True, text=True, check=True, timeout=60)
    return {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in json.loads(out.stdout).items()}


def alternated(admin: str, setups: list[WorkerSetup], steps: int, rounds: int) -> list[dict[str, Any]]:
    """Every setup once per round, in the same order each round (A, B, A, B, ...), each run
    after the machine has been idle for a moment (``wait_idle``); a run during which others used
    more than ``DISTURBED_CORES`` is marked disturbed and run again (at most ``RERUNS`` times;
    every run is kept, with ``disturbed`` and ``attempt``)."""
    print(f"  load before the first run: {wait_quiet():.2f}", flush=True)
    rows = []
    for r in range(1, rounds + 1):
        for setup in setups:
            for attempt in range(RERUNS + 1):
                idle_before = wait_idle()
                if setup.pgqueuer_batch is not None:
                    import peers
                    from systems import PgQueuer

                    row = peers.peer_drain(admin, PgQueuer(setup.pgqueuer_batch), steps)
                    row.update(label=setup.label, concurrency=None, load=round(os.getloadavg()[0], 2))
                else:
                    row = drain(admin, setup.mode, setup.concurrency, steps, setup=setup)
                row["round"] = r
                row["busy_before"] = idle_before
                row["disturbed"] = disturbed(row)
                row["attempt"] = attempt + 1
                rows.append(row)
                print(
                    f"  round {r} {setup.label}: {row['steps_per_s']:,.0f} steps/s, CPU us/step"
                    f" {row['worker_cpu_us_per_step']} + {row['server_cpu_us_per_step']}"
                    f" (c{row['concurrency']}, exactly once: {row['exactly_once']}) [load {_load()},"
                    f" others' CPU {row['others_cpu_s']} s in {row['seconds']} s, commit {row['commit_ms']} ms]"
                    + (" DISTURBED, run again" if row["disturbed"] and attempt < RERUNS else ""),
                    flush=True,
                )
                if not row["disturbed"]:
                    break
    return rows


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(
    admin: str,
    modes: list[str],
    concurrency: list[int],
    steps: int,
    events: list[str] | None = None,
    archive: list[bool] | None = None,
    processes: int = 1,
) -> list[dict[str, Any]]:
    """Every combination, printed as it completes."""
    rows = []
    for mode in modes:
        for conc in concurrency:
            for ev in events or ["derived"]:
                for arch in archive or [False]:
                    rows.append(drain(admin, mode, conc, steps, ev, arch, processes))
                    r = rows[-1]
                    print(
                        f"  {mode} c{conc} events={ev} archive={'on' if arch else 'off'} processes={processes}:"
                        f" {r['steps_per_s']:,.0f} steps/s (exactly once: {r['exactly_once']})",
                        flush=True,
                    )
    return rows


def setups_from_args(args: argparse.Namespace) -> list[WorkerSetup]:
    """The configurations to alternate: ``--defaults`` (no flag, no TASKER_ENV) or ``--env``,
    times each ``--set`` candidate, times each ``--trees`` checkout."""
    trees: list[Path | None] = [Path(t).resolve() for t in args.trees] if args.trees else [None]
    candidates: list[dict[str, str]] = []
    for spec in args.set or [None]:
        if spec is None:
            candidates.append({})
            continue
        key, _, values = spec.partition("=")
        candidates += [{key: v} for v in values.split(",")]
    env = None if args.defaults else args.env
    concurrency: list[int | None] = [None] if args.defaults and not args.concurrency_given else list(args.concurrency)
    out = []
    for tree in trees:
        for conc in concurrency:
            for cand in candidates:
                parts = [_commit(tree) if args.trees else "", "defaults" if env is None else env]
                parts += [f"c{conc}"] if conc is not None else []
                parts += [f"{k.split('.')[-1]}={v}" for k, v in cand.items()]
                out.append(
                    WorkerSetup(
                        " ".join(p for p in parts if p),
                        None if args.defaults else args.modes[0],
                        conc,
                        env,
                        cand,
                        None if tree is None or tree == Path(ROOT).resolve() else tree,
                    )
                )
    return out


def _commit(tree: Path | None) -> str:
    """The short commit of a checkout (its folder name if it is not a git checkout)."""
    where = tree or Path(ROOT)
    out = subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or where.name


def parse_setup(spec: str) -> WorkerSetup:
    """``label|key=value|...``: ``tree`` (a checkout), ``env`` (an overlay, or ``none`` for no
    TASKER_ENV: the default), ``mode`` and ``concurrency`` (flags); any other key is a setting
    (dotted, or a variable name in capitals). ``label|pgqueuer=100``: PgQueuer at that batch
    size instead (peers.py's drain), a yardstick in the same rounds."""
    label, *pairs = spec.split("|")
    fields: dict[str, Any] = {"mode": None, "concurrency": None, "env": None, "tree": None, "pgqueuer_batch": None}
    settings: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "tree":
            tree = Path(value).resolve()
            fields["tree"] = None if tree == Path(ROOT).resolve() else tree
        elif key == "env":
            fields["env"] = None if value == "none" else value
        elif key == "mode":
            fields["mode"] = value
        elif key == "concurrency":
            fields["concurrency"] = int(value)
        elif key == "pgqueuer":
            fields["pgqueuer_batch"] = int(value)
        else:
            settings[key] = value
    return WorkerSetup(
        label, fields["mode"], fields["concurrency"], fields["env"], settings, fields["tree"], fields["pgqueuer_batch"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--concurrency", type=int, nargs="+", default=None)
    parser.add_argument("--step-events", choices=["derived", "stored", "both"], default="derived")
    parser.add_argument("--archive", choices=["off", "on", "both"], default="off")
    parser.add_argument("--processes", type=int, default=1, help="worker processes under one supervisor")
    parser.add_argument(
        "--defaults", action="store_true", help="no flag and no TASKER_ENV: the shipped defaults (alternated runs)"
    )
    parser.add_argument("--env", help="run the worker with this overlay (alternated runs; default production)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=V1,V2",
        help="candidate values of a dotted setting, each a configuration of its own (alternated runs)",
    )
    parser.add_argument("--trees", nargs="+", help="checkouts whose code runs the worker, alternated")
    parser.add_argument(
        "--setup", action="append", metavar="LABEL|KEY=V|...", help="a configuration (repeat; see parse_setup)"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds of every configuration")
    parser.add_argument("--url", help="admin URL of a server to use instead of a temporary embedded one")
    parser.add_argument("--json", type=Path, default=RESULTS / "drain.json")
    args = parser.parse_args()
    args.concurrency_given = args.concurrency is not None
    if args.concurrency is None:
        args.concurrency = [16, 128, 512]
    events = {"derived": ["derived"], "stored": ["stored"], "both": ["derived", "stored"]}[args.step_events]
    archive = {"off": [False], "on": [True], "both": [False, True]}[args.archive]
    started = time.time()
    compare = args.defaults or args.env or args.set or args.trees or args.rounds > 1
    with server(args.url) as (admin, _):
        if args.setup:
            rows = alternated(admin, [parse_setup(x) for x in args.setup], args.steps, args.rounds)
        elif compare:
            if not args.env and not args.defaults:
                args.env = "production"
            rows = alternated(admin, setups_from_args(args), args.steps, args.rounds)
        else:
            rows = run(admin, args.modes, args.concurrency, args.steps, events, archive, args.processes)
    print_table(rows, COLUMNS, "drain (noop steps)")
    write_json(args.json, {"machine": machine(), "started": started, "drain": rows})


if __name__ == "__main__":
    main()
