"""Worker processes: SIGTERM drain and release, two processes on one queue, supervisor restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from chaos import free_port, get_json, poll_until
from ledger_handlers import LEDGER_DDL
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage

TESTS = Path(__file__).resolve().parent
NS = "proc"
QUEUE = f"worker_{NS}_queue"


@pytest.fixture
def env(cli_env: dict[str, str], db_url: str) -> dict[str, str]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return {
        **cli_env,
        "PYTHONPATH": str(TESTS),
        "TASKER_LEDGER_URL": db_url,
        "TASKER__WORKER__HANDLER_MODULES": '["ledger_handlers"]',
        "TASKER__WORKER__NAMESPACES": f'["{NS}"]',
    }


def send(url: str, handler: str, inputs: list[dict[str, Any]], **extra: Any) -> list[dict[str, Any]]:
    bodies = [StepMessage.build(NS, handler, i, **extra) for i in inputs]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (QUEUE, [Jsonb(b) for b in bodies]))
    return bodies


def value(url: str, query: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


def wait_for(url: str, query: str, expected: Any, timeout: float) -> None:
    poll_until(lambda: value(url, query) == expected, timeout, f"{query!r} to be {expected!r}")


def start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "run", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_sigterm_drains_in_flight_and_releases_the_rest(env: dict[str, str], db_url: str) -> None:
    send(db_url, "sleep", [{"seconds": 0.5}] * 4 + [{"seconds": 60}] * 2, timeout=120)
    proc = start({**env, "TASKER__WORKER__SHUTDOWN_TIMEOUT": "2s"}, "--mode", "Hybrid", "--concurrency", "8")
    try:
        wait_for(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 1", 6, 30)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert value(db_url, "SELECT count(*) FROM tasker.step_results WHERE status = 'succeeded'") == 4
    # The two long steps are back at once, their attempt given back.
    assert value(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 0 AND vt <= now()") == 2
    final = json.loads(err.strip().splitlines()[-1])
    assert final["counters"]["released"] == 2 and final["counters"]["succeeded"] == 4


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_the_event_loop_follows_the_config(env: dict[str, str], db_url: str, choice: str) -> None:
    bodies = send(db_url, "ledger", [{"i": i} for i in range(40)])
    loop_env = {**env, "TASKER__WORKER__EVENT_LOOP": choice, "TASKER__LOGGING__LEVEL": "INFO"}
    proc = start(loop_env, "--mode", "Hybrid", "--concurrency", "8")
    try:
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results WHERE status = 'succeeded'", len(bodies), 30)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    # uvloop is a dependency here (Linux), so "auto" takes it.
    assert f"loop={'uvloop' if choice == 'auto' else 'asyncio'}" in err
    assert value(db_url, "SELECT count(DISTINCT step_uuid) FROM public.ledger") == len(bodies)


def test_two_processes_on_one_queue_never_double_process(env: dict[str, str], db_url: str) -> None:
    proc = start(env, "--mode", "Hybrid", "--processes", "2", "--concurrency", "8")
    try:
        # Both processes are up before the steps exist: sent earlier, the first process to start
        # could drain all of them before the second has imported its handlers (CI saw that).
        wait_for(db_url, "SELECT count(*) FROM tasker.workers WHERE status = 'active'", 2, 30)
        bodies = send(db_url, "ledger", [{"i": i} for i in range(600)])
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results", len(bodies), 90)
    finally:
        code, err = stop(proc, timeout=60)
    assert code == 0, err
    assert value(db_url, "SELECT count(*) FROM public.ledger") == len(bodies)
    assert value(db_url, "SELECT count(DISTINCT step_uuid) FROM public.ledger") == len(bodies)
    assert value(db_url, "SELECT count(DISTINCT pid) FROM public.ledger") == 2  # both did work
    assert value(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


def test_supervisor_restarts_a_killed_worker(env: dict[str, str], db_url: str) -> None:
    proc = start(env, "--mode", "Hybrid", "--processes", "2")
    try:
        wait_for(db_url, "SELECT count(*) FROM tasker.workers WHERE status IN ('pending', 'active')", 2, 30)
        victim = value(db_url, "SELECT pid FROM tasker.workers ORDER BY registered_at LIMIT 1")
        os.kill(victim, signal.SIGKILL)
        wait_for(db_url, "SELECT count(*) FROM tasker.workers", 3, 30)  # a new worker registered
        bodies = send(db_url, "ledger", [{"i": i} for i in range(50)])
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results", len(bodies), 30)
    finally:
        code, err = stop(proc, timeout=60)
    assert code == 0, err
    assert "restarting" in err


def cli(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_status_and_dlq_commands(env: dict[str, str], db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT pgmq.send(%s, '[\"not a step\"]')", (QUEUE,))
    send(db_url, "fail", [{"mode": "non_retryable", "message": "bad input"}])
    send(db_url, "noop", [{}])
    proc = start(env, "--mode", "Hybrid")
    try:
        wait_for(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq", 2, 30)
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results WHERE status = 'succeeded'", 1, 30)
        status = cli(env, "status", "--json")
        assert status.returncode == 0, status.stderr
        workers = json.loads(status.stdout)
        assert len(workers) == 1 and workers[0]["deployment_mode"] == "Hybrid"
        assert "counters" in workers[0]["stats"]
    finally:
        code, err = stop(proc)
    assert code == 0, err
    listed = cli(env, "dlq", "list", NS)
    assert listed.returncode == 0
    assert "malformed_message" in listed.stdout and "bad input" in listed.stdout
    assert cli(env, "dlq", "requeue", NS).returncode == 2  # must say which
    requeued = cli(env, "dlq", "requeue", NS, "--all")
    assert requeued.returncode == 0 and "requeued 2" in requeued.stdout
    assert value(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 2
    assert value(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq") == 0
    # Each requeue is on record, by whom (the malformed message has no step_uuid to name).
    by = value(
        db_url,
        "SELECT array_agg(data->>'by' ORDER BY event_id) FROM tasker.events WHERE event_type = 'DeadLetterRequeued'",
    )
    assert by == ["cli", "cli"]
    stopped = json.loads(cli(env, "status", "--json", "--all").stdout)
    assert stopped[0]["status"] == "deregistered" and stopped[0]["deregister_reason"] == "SIGTERM"


def test_second_signal_stops_immediately_and_loses_nothing(env: dict[str, str], db_url: str) -> None:
    send(db_url, "sleep", [{"seconds": 60}], timeout=120)
    proc = start(
        {**env, "TASKER__WORKER__SHUTDOWN_TIMEOUT": "60s", "TASKER__LOGGING__LEVEL": "INFO"}, "--mode", "Hybrid"
    )
    try:
        wait_for(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 1", 1, 30)
        proc.send_signal(signal.SIGTERM)
        # Signals of one kind do not queue: wait until the first one was handled.
        assert proc.stderr is not None
        for line in proc.stderr:
            if "shutting down" in line:
                break
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, err = stop(proc, timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0, err
    assert time.monotonic() - t0 < 10
    # Still in its queue (claimed until its vt expires): not lost, not recorded.
    assert value(db_url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 1
    assert value(db_url, "SELECT count(*) FROM tasker.step_results") == 0


def test_run_serves_the_api_and_the_fleet_commands_see_the_worker(env: dict[str, str], db_url: str) -> None:
    port = free_port()
    send(db_url, "noop", [{}] * 5)
    proc = start({**env, "TASKER__API__ENABLED": "true", "TASKER__API__PORT": str(port)}, "--mode", "Hybrid")
    try:
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results", 5, 30)
        poll_until(lambda: get_json(port, "/health/live")[0] == 200, 30, "the API")
        status, health = get_json(port, "/health/detailed")
        assert status == 200 and health["status"] == "healthy", health
        [worker_id] = value(db_url, "SELECT array_agg(worker_id) FROM tasker.workers")
        listener = next(c for c in health["checks"] if c["name"] == f"worker {worker_id} listener")
        assert listener["status"] == "healthy"
        assert get_json(port, f"/api/workers/{worker_id}")[1]["endpoint"] == f"http://127.0.0.1:{port}"
        dashboard = get_json(port, "/workers")  # the pages come with the API
        assert dashboard[0] == 200 and worker_id in dashboard[1]
        _, metrics = get_json(port, "/metrics")
        assert f'tasker_worker_processed_total{{worker_id="{worker_id}"}} 5.0' in metrics
        shown = cli(env, "workers", "show", worker_id)
        assert shown.returncode == 0 and "heartbeats (newest" in shown.stdout
        listed = json.loads(cli(env, "workers", "list", "--json").stdout)
        assert [w["worker_id"] for w in listed] == [worker_id]
    finally:
        code, err = stop(proc)
    assert code == 0, err
    assert json.loads(cli(env, "workers", "list", "--json").stdout) == []
    assert json.loads(cli(env, "workers", "list", "--all", "--json").stdout)[0]["status"] == "deregistered"
    stats = json.loads(cli(env, "workers", "stats", "--json").stdout)
    assert stats["by_status"]["deregistered"] == 1
    assert cli(env, "workers", "show", "nobody").returncode != 0
    replay = cli(env, "events", "replay")
    assert replay.returncode == 0 and "projection equals the live tables" in replay.stdout
    compacted = cli(env, "events", "replay", "--compact", "--older-than", "0s", "--json")
    assert compacted.returncode == 0, compacted.stderr
    report = json.loads(compacted.stdout)
    assert report["consistent"] is True and report["compacted"] > 0 and report["events_applied"] == 0


def test_the_sigterm_line_names_the_worker_and_the_row_keeps_its_final_statistics(
    env: dict[str, str], db_url: str
) -> None:
    proc = start(
        {**env, "TASKER__LOGGING__LEVEL": "INFO", "TASKER__REGISTRY__HEARTBEAT_INTERVAL": "60s"},
        "--mode",
        "Hybrid",
    )
    try:
        wait_for(db_url, "SELECT count(*) FROM tasker.workers WHERE status = 'active'", 1, 30)
        send(db_url, "ledger", [{"i": i} for i in range(3)])
        wait_for(db_url, "SELECT count(*) FROM tasker.step_results", 3, 30)
    finally:
        code, err = stop(proc)
    assert code == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [sigterm] = [r for r in records if str(r.get("message", "")).startswith("SIGTERM: shutting down")]
    worker_id = value(db_url, "SELECT worker_id FROM tasker.workers")
    assert sigterm["worker_id"] == worker_id and sigterm["deployment_mode"] == "Hybrid"
    # The only heartbeat went out before the steps: what the row says now was written at exit.
    row = value(
        db_url,
        "SELECT json_build_object('p', processed, 's', stats -> 'counters' -> 'succeeded', 'st', status) FROM tasker.workers",
    )
    assert row == {"p": 3, "s": 3, "st": "deregistered"}
