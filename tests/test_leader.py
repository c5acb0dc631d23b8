"""Supervision leadership across processes: two ``tasker-worker api`` processes compete for the
advisory lock, exactly one runs the jobs, and when the leader is killed the other takes over."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from typing import Any

import psycopg
from chaos import poll_until

from tasker_worker.db import queries
from tasker_worker.fleet.leader import SUPERVISION_LOCK


def start_api(env: dict[str, str]) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasker_worker.cli.main", "api", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the process prints its address once it serves
    match = re.search(r"http://[^:]+:(\d+)", line)
    if not match:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"api did not start: {line!r} {err}")
    return proc, int(match.group(1))


def leader(url: str) -> list[tuple[int, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute(queries.LEADER_BACKEND, (SUPERVISION_LOCK,)).fetchall()]


def candidates(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'tasker-supervisor:%'"
        ).fetchone()
        return int(row[0]) if row else 0


def status_of(url: str, worker_id: str) -> str | None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT status FROM tasker.workers WHERE worker_id = %s", (worker_id,)).fetchone()
        return str(row[0]) if row else None


def post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
        return data


def register_and_beat(port: int, worker_id: str) -> None:
    post(port, "/api/workers", {"worker_id": worker_id, "name": "w", "hostname": "h", "pid": 1})
    post(port, f"/api/workers/{worker_id}/heartbeat", {"active_steps": 0})


def test_one_leader_and_takeover_after_the_leader_is_killed(cli_env: dict[str, str], db_url: str) -> None:
    procs = [start_api(cli_env), start_api(cli_env)]
    try:
        poll_until(lambda: candidates(db_url) == 2 and len(leader(db_url)) == 1, 20, "two candidates, one leader")
        [(_, app_name)] = leader(db_url)
        pids = {p.pid: (p, port) for p, port in procs}
        leader_pid = int(app_name.rsplit("-", 1)[1])
        assert leader_pid in pids
        follower_pid = next(pid for pid in pids if pid != leader_pid)
        follower_port = pids[follower_pid][1]

        # The jobs run (whoever registers the worker, the leader activates it).
        register_and_beat(follower_port, "first")
        poll_until(lambda: status_of(db_url, "first") == "active", 15, "the leader to activate a worker")

        pids[leader_pid][0].send_signal(signal.SIGKILL)
        took = poll_until(
            lambda: [a for _, a in leader(db_url)] == [f"tasker-supervisor:api-{socket.gethostname()}-{follower_pid}"],
            15,
            "the follower to take over",
        )
        print(f"takeover after SIGKILL of the leader: {took:.3f}s")
        register_and_beat(follower_port, "second")
        poll_until(lambda: status_of(db_url, "second") == "active", 15, "the new leader to activate a worker")

        survivor = pids[follower_pid][0]
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(timeout=30) == 0
        assert candidates(db_url) == 0 and leader(db_url) == []
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
