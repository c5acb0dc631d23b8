"""What the benchmark scripts share: databases on one embedded server, tasker worker processes,
statement counting, percentiles, tables and JSON output.

Every benchmark is a script of its own (``python benchmarks/<name>.py``) that starts a temporary
embedded PostgreSQL, or uses ``--url`` (an admin URL of a server of yours: the benchmarks create
and drop databases there). ``benchmarks/summary.py`` runs them all against one server.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import psycopg
from psycopg.types.json import Jsonb

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tasker_worker.db.embedded import temporary_embedded  # noqa: E402
from tasker_worker.domain.steps import StepMessage  # noqa: E402


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM stops a benchmark as Ctrl-C does: its ``finally`` blocks stop the workers and the
    temporary server (a background job's SIGINT is ignored, so SIGTERM is how to stop it)."""
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _terminate)

NS = "bench"
QUEUE = f"worker_{NS}_queue"
SEND_BATCH = 1000


@contextlib.contextmanager
def server(url: str | None) -> Iterator[tuple[str, Path | None]]:
    """``(admin_url, data_dir)``: the given server, or a temporary embedded one (stopped after)."""
    if url:
        yield url, None
        return
    with temporary_embedded(prefix="tasker-bench-") as (admin, data_dir):
        yield admin, data_dir


def database(admin: str, name: str) -> str:
    """A new empty database ``name`` (dropped first if it exists); its URL."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    return psycopg.conninfo.make_conninfo(admin, dbname=name)


def tree_env(tree: Path | None) -> dict[str, str]:
    """The environment that makes a child process import ``tasker_worker`` from ``tree`` (a
    checkout of another commit, for before/after runs), or from this checkout (None)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    return env


def tasker_database(admin: str, name: str, tree: Path | None = None, *, source: Path | None = None) -> str:
    """A new database with the tasker schema (migrated by the code of ``tree``, default this
    checkout; ``source`` is the same) and the ``bench`` namespace queue; its URL."""
    tree = tree or source
    url = database(admin, name)
    env = {**tree_env(tree), "TASKER_DATABASE_URL": url}
    subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", "db", "migrate"],
        env=env,
        check=True,
        capture_output=True,
        cwd=tree or ROOT,
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return url


def enqueue_steps(url: str, steps: int, handler: str = "noop") -> float:
    """Send ``steps`` steps with ``pgmq.send_batch`` in batches of 1,000; return steps/s."""
    bodies = [Jsonb(StepMessage.build(NS, handler, {"i": i})) for i in range(steps)]
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(0, steps, SEND_BATCH):
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, bodies[i : i + SEND_BATCH]))
    return steps / (time.perf_counter() - t0)


def source_env(source: Path | None) -> dict[str, str]:
    """What to add to a child's environment to make it import tasker_worker from ``source`` (a
    source tree: PYTHONPATH comes before the editable install of this one); nothing for this
    tree. A child run with ``-m`` must also run in ``source`` (``cwd=source``): ``-m`` puts its
    working directory first on sys.path, so from this tree's root it would import this tree."""
    if source is None:
        return {}
    return {"PYTHONPATH": os.pathsep.join([str(source), *filter(None, [os.environ.get("PYTHONPATH")])])}


#: The environment overlay the benchmarks run with unless told otherwise (its concurrency is 32).
PRODUCTION = "production"


def worker_env(
    url: str,
    *,
    step_events: str = "derived",
    archive: bool = False,
    env: str | None = PRODUCTION,
    settings: dict[str, str] | None = None,
    tree: Path | None = None,
) -> dict[str, str]:
    """The environment of a benchmark ``tasker-worker run``.

    ``env``: the overlay (``TASKER_ENV``); None runs the shipped defaults as a new user gets them
    (no ``TASKER_ENV``: the development overlay, INFO logs, nothing tuned), and then
    ``step_events`` / ``archive`` are left to the configuration too. ``settings``: more
    ``TASKER__SECTION__KEY`` variables (a candidate default, say). Every other ``TASKER*``
    variable of this process is dropped, so that nothing leaks in from the caller's shell.
    """
    out = {
        **tree_env(tree),
        "TASKER_DATABASE_URL": url,
        "TASKER__WORKER__NAMESPACES": f'["{NS}"]',
        "TASKER__DATABASE__AUTO_MIGRATE": "false",
    }
    if env is not None:
        out.update(
            {
                "TASKER_ENV": env,
                "TASKER__LOGGING__LEVEL": "WARNING",
                "TASKER__EVENTS__STEP_EVENTS": step_events,
                "TASKER__QUEUES__ARCHIVE": "true" if archive else "false",
            }
        )
    out.update(settings or {})
    return out


def start_worker(
    url: str,
    mode: str | None,
    concurrency: int | None = None,
    processes: int = 1,
    *,
    cpus: str | None = None,
    tree: Path | None = None,
    **env: Any,
) -> subprocess.Popen[str]:
    """One ``tasker-worker run`` process, or ``processes`` under its supervisor. ``mode`` and
    ``concurrency`` None: no flag (the configuration's). ``cpus``: pinned with ``taskset -c``.
    ``tree``: the code of another checkout (run from that checkout, with its configuration).
    Its stderr goes to a temporary file (kept for the error message if it dies; a pipe nobody
    reads would stop a worker that logs at INFO once it filled up)."""
    argv = [sys.executable, "-m", "tasker_worker.cli.main", "run"]
    if mode is not None:
        argv += ["--mode", mode]
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    if processes > 1:
        argv += ["--processes", str(processes)]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    err = tempfile.TemporaryFile(mode="w+", prefix="tasker-bench-worker-")
    proc = subprocess.Popen(argv, env=worker_env(url, tree=tree, **env), stderr=err, text=True, cwd=tree or ROOT)
    _ERR_FILES[proc.pid] = err
    return proc


#: The stderr file of each worker start_worker started, by pid.
_ERR_FILES: dict[int, Any] = {}


def worker_error(proc: subprocess.Popen[str]) -> str:
    """The tail of a worker's stderr (start_worker's temporary file, or the pipe of another)."""
    err = _ERR_FILES.get(proc.pid)
    if err is not None:
        err.seek(0)
        return str(err.read())[-2000:]
    try:
        return proc.communicate(timeout=10)[1][-2000:]
    except (subprocess.TimeoutExpired, ValueError):
        return ""


def process_tree_cpu(proc: psutil.Process) -> float:
    """CPU seconds (user + system) of a process and its live children."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += sum(p.cpu_times()[:2])
    return total


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, then wait (bounded); SIGKILL if it does not go."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
    err = _ERR_FILES.pop(proc.pid, None)
    if err is not None:
        err.close()


def wait_for(
    predicate: Any,
    timeout: float,
    what: str,
    proc: subprocess.Popen[str] | None = None,
    interval: float = 0.02,
) -> None:
    """Poll ``predicate()`` every ``interval`` s until true; fail after ``timeout`` or if ``proc`` dies."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"worker exited while waiting for {what}: {worker_error(proc)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached within {timeout:.0f}s")
        time.sleep(interval)


class ServerCpu:
    """CPU time (user + system) the database server's processes spend between two readings.

    Found through the parent of a backend (the postmaster), so only for a server on this
    machine (``seconds`` is None otherwise). The postmaster's own time, the time of its
    children that have exited (the kernel adds it to the postmaster's ``children_*`` times when
    it reaps them) and that of its live children: backends that come and go between the
    readings are counted too.
    """

    def __init__(self, url: str) -> None:
        self._postmaster: psutil.Process | None = None
        with psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            try:
                parent = psutil.Process(int(row[0])).parent() if row else None
            except psutil.Error:
                parent = None
        if parent is not None and "postgres" in parent.name():
            self._postmaster = parent
        self._start = 0.0

    def _total(self) -> float:
        assert self._postmaster is not None
        t = self._postmaster.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in self._postmaster.children():
            with contextlib.suppress(psutil.Error):
                c = child.cpu_times()
                total += c.user + c.system
        return total

    def start(self) -> None:
        """First reading."""
        if self._postmaster is not None:
            self._start = self._total()

    def seconds(self) -> float | None:
        """CPU seconds spent since ``start`` (None when the server is not visible)."""
        if self._postmaster is None:
            return None
        return self._total() - self._start


@contextlib.contextmanager
def pin_server(url: str, cpus: str | None) -> Iterator[None]:
    """Pin the database server (its postmaster and every process of it, so the backends it forks
    meanwhile too) to ``cpus`` (``taskset -c``) for the block; None: leave it alone. Only for a
    server on this machine that we started (the benchmarks' temporary one)."""
    if cpus is None:
        yield
        return
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
    postmaster = psutil.Process(int(row[0])).parent() if row else None
    if postmaster is None:
        raise RuntimeError("the server's postmaster is not visible from here")
    everything = ",".join(str(c) for c in range(os.cpu_count() or 1))

    def pin(to: str) -> None:
        for proc in [postmaster, *postmaster.children()]:
            with contextlib.suppress(psutil.Error):
                proc.cpu_affinity([int(c) for c in to.split(",")])

    pin(cpus)
    try:
        yield
    finally:
        pin(everything)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (every process, not idle or waiting on I/O)."""
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


#: The longest ``wait_quiet`` and ``wait_idle`` wait, in seconds (``BENCH_MAX_WAIT``): on a
#: machine shared with work that never pauses, a bound so that a run still happens (its load and
#: ``others_cpu_s`` are in the results).
MAX_WAIT_S = float(os.environ.get("BENCH_MAX_WAIT", "900"))


def wait_quiet(max_load: float = 1.5, timeout_s: float | None = None) -> float:
    """Wait (bounded) until the 1-minute load average is below ``max_load``; the load then.
    The benchmarks' figures are taken on a quiet machine: a shared one is noise."""
    timeout_s = MAX_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def commit_ms(url: str, n: int = 30) -> float:
    """The median time of a one-row INSERT committed synchronously (a WAL flush): how fast the
    disk is right now, beside each figure (a shared machine's disk varies as its CPU does)."""
    samples = []
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.bench_commit (x integer)")
        for i in range(n):
            t0 = time.perf_counter()
            conn.execute("INSERT INTO public.bench_commit VALUES (%s)", (i,))
            samples.append(time.perf_counter() - t0)
        conn.execute("DROP TABLE public.bench_commit")
    return round(float(np.median(samples)) * 1000, 2)


#: A run during which the rest of the machine used more than this many cores on average is
#: marked disturbed and run again (up to ``RERUNS`` times, ``BENCH_RERUNS``); every run is kept
#: in the results.
DISTURBED_CORES = 0.25
RERUNS = int(os.environ.get("BENCH_RERUNS", "2"))


def disturbed(row: dict[str, Any]) -> bool:
    """Whether others' CPU during a run (``others_cpu_s`` over ``seconds``) makes it noise."""
    others, seconds = row.get("others_cpu_s"), row.get("others_window_s") or row.get("seconds")
    return bool(others is not None and seconds and others / seconds > DISTURBED_CORES)


def wait_idle(max_cores: float = 0.15, window_s: float = 3.0, timeout_s: float | None = None) -> float:
    """Before a timed run, wait (bounded) until the machine has been idle for ``window_s``: all
    its processes together busy less than ``max_cores`` cores (between two runs of ours, what
    is busy is somebody else's). The cores busy in the last window."""
    timeout_s = MAX_WAIT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    while True:
        b0 = busy_cpu_s()
        time.sleep(window_s)
        cores = (busy_cpu_s() - b0) / window_s
        if cores < max_cores or time.monotonic() > deadline:
            return round(cores, 2)


def percentiles_ms(samples_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in ms of samples in seconds."""
    if not samples_s:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    arr = np.asarray(samples_s, dtype=float) * 1000.0
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": round(float(arr.max()), 2),
    }


class StatementLog:
    """Counts the statements the server runs in one database, from the server's own log.

    Sets ``log_statement = 'all'`` on the database (new sessions pick it up) and counts the
    lines of the embedded server's log file (``<data_dir>/pgdata/log``) that log a statement
    of that database. Only for a server we started ourselves: its log is ours to read.
    """

    LINE = re.compile(r"LOG:\s+(statement|execute [^:]*):")

    def __init__(self, admin: str, data_dir: Path, dbname: str) -> None:
        self.admin = admin
        self.log_file = data_dir / "pgdata" / "log"
        self.dbname = dbname
        self._offset = 0
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {dbname} SET log_statement = 'all'")
            # A server-wide setting: fine on the temporary server this class is meant for.
            conn.execute("ALTER SYSTEM SET log_line_prefix = '[db=%d] [app=%a] '")
            conn.execute("SELECT pg_reload_conf()")

    def mark(self) -> None:
        """Start counting from here."""
        self._offset = self.log_file.stat().st_size

    def seen(self, *fragments: str) -> bool:
        """Whether every one of ``fragments`` occurs in the log since ``mark`` (a statement the
        worker was waited for to send: read from the log, it costs the database nothing)."""
        with self.log_file.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode("utf-8", "replace")
        return all(fragment in text for fragment in fragments)

    def count(self) -> int:
        """Statements of the database logged since ``mark``."""
        tag = f"[db={self.dbname}] "
        with self.log_file.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode("utf-8", "replace")
        return sum(1 for line in text.splitlines() if line.startswith(tag) and self.LINE.search(line))

    #: How a logged statement of the step path is recognised (any other is "other").
    KINDS = (
        ("claim", "FOR UPDATE SKIP LOCKED"),
        ("settle", "jsonb_to_recordset"),
        ("probe", "WHERE EXISTS (SELECT 1 FROM"),
    )
    #: Transaction control is not a statement of its own for these counts.
    CONTROL = re.compile(r"^(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE)\b", re.I)

    def counts(self, exclude_app: str | None = None) -> dict[str, int]:
        """Statements of the database logged since ``mark`` by kind (``claim``, ``settle``,
        ``probe``, ``other``), leaving out the sessions of ``exclude_app`` and BEGIN/COMMIT."""
        tag = f"[db={self.dbname}] "
        with self.log_file.open("rb") as f:
            f.seek(self._offset)
            text = f.read().decode("utf-8", "replace")
        entries: list[list[str]] = []
        for line in text.splitlines():
            if line.startswith("[db="):
                entries.append([line])
            elif entries:
                entries[-1].append(line)  # a statement's continuation lines
        out: dict[str, int] = {}
        for entry in entries:
            head = entry[0]
            match = self.LINE.search(head)
            if not head.startswith(tag) or match is None:
                continue
            if exclude_app is not None and f"[app={exclude_app}] " in head:
                continue
            statement = "\n".join([head[match.end() :], *entry[1:]]).strip()
            if self.CONTROL.match(statement):
                continue
            kind = next((k for k, marker in self.KINDS if marker in statement), "other")
            out[kind] = out.get(kind, 0) + 1
        return out


class TransactionCount:
    """The transactions one database committed (``pg_stat_database.xact_commit``), read from
    the admin database so that reading them costs the counted database nothing.

    A backend reports its counts when it goes idle, at most once a second; a report held back
    goes out within 10 s (PostgreSQL's ``PGSTAT_IDLE_INTERVAL``) or when the backend exits. A
    reading therefore lags by up to 10 s: a window must open more than 10 s after the last
    burst it should not count (a start), and ``settle`` waits until no session (autovacuum's
    included) is connected to the database, after which the counts are final. Autovacuum's
    transactions in the database count too: they commit without any statement in the log.
    """

    def __init__(self, admin: str, dbname: str) -> None:
        self.admin = admin
        self.dbname = dbname

    def read(self) -> int:
        """Committed transactions of the database so far (as reported)."""
        with psycopg.connect(self.admin, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (self.dbname,)).fetchone()
        return int(row[0]) if row else 0

    def sessions(self) -> int:
        """Backends connected to the database now (clients and autovacuum workers)."""
        with psycopg.connect(self.admin, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.dbname,)).fetchone()
        return int(row[0]) if row else 0

    def settle(self, timeout: float = 60.0) -> int:
        """Wait until nobody is connected to the database; then the final count."""
        wait_for(lambda: self.sessions() == 0, timeout, f"every session of {self.dbname} gone", interval=0.05)
        return self.read()


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str = "") -> None:
    """Rows as an aligned table; ``columns`` is ``[(key, header), ...]``."""
    if title:
        print(f"\n{title}")
    cells = [[_cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths, strict=True)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)), flush=True)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"\nwrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import platform

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
