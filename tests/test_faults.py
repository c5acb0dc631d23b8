"""The fault and hostile-input suite at reduced sizes (``python benchmarks/chaos.py`` runs the
full sizes). Each scenario asserts the promise with the ledger: nothing lost, nothing doubled."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from typing import Any

import chaos
import psycopg
import pytest
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage

pytestmark = pytest.mark.heavy


def assert_kept_the_promise(result: chaos.Result) -> None:
    assert result.lost == 0, result
    assert result.doubled == 0, result
    assert result.details.get("successes_without_one_ledger_row", 0) == 0, result


def test_kill9_mid_step(db_url: str) -> None:
    result = chaos.kill9(db_url, steps=600, processes=3, every_s=0.4)
    assert_kept_the_promise(result)
    assert result.in_queue == 0 and result.dead_lettered == 0
    assert result.details["kills"] >= 1 and result.details["unclean_exits"] == []


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load(mode: str) -> None:
    with chaos.dedicated_server() as (url, restart):
        result = chaos.pg_restart(url, restart, steps=300, mode=mode)
    assert_kept_the_promise(result)
    assert result.in_queue == 0 and result.details["exit_code"] == 0
    assert result.recovery_s is not None


@pytest.mark.parametrize("mode", ["Hybrid", "EventDrivenOnly"])
def test_connection_loss(db_url: str, mode: str) -> None:
    result = chaos.connection_loss(db_url, steps=400, mode=mode)
    assert_kept_the_promise(result)
    assert result.in_queue == 0 and result.details["connections_killed"] >= 2
    assert result.details["exit_code"] == 0
    assert (result.details["listener_reconnects"] or 0) >= 1  # the gap shows in the counters


def test_fleet_contention(db_url: str) -> None:
    result = chaos.contention(db_url, steps=3000, processes=4, concurrency=16)
    assert_kept_the_promise(result)
    assert result.in_queue == 0 and result.dead_lettered == 0
    assert result.details["workers_that_ran"] >= 2


def test_poison_message(db_url: str) -> None:
    result = chaos.poison(db_url, steps=3, max_attempts=3)
    assert result.lost == 0 and result.dead_lettered == 3
    assert result.details["attempts"] == [3, 3, 3]
    assert result.details["requeued"] == "requeued 3" and result.details["back_in_queue"] == 3


def test_held_transaction_horizon_degrades_health_and_recovers(db_url: str) -> None:
    result = chaos.held_horizon(db_url, steps=400)
    assert_kept_the_promise(result)
    assert result.details["status_while_held"] == "degraded", result.details
    assert result.details["reasons_while_held"], result.details
    assert result.recovery_s is not None  # healthy again after the transaction ended


# --- hostile input -----------------------------------------------------------------------------


def hostile_planning_inputs() -> list[dict[str, Any]]:
    grid = {"width": 4, "height": 4, "resolution": 1.0, "cells": ""}
    return [
        {"grid": {**grid, "width": -4}, "start": {"x": 0.5, "y": 0.5}, "goal": {"x": 1.5, "y": 1.5}},
        {"grid": grid, "start": {"x": math.nan, "y": 0.5}, "goal": {"x": 1.5, "y": 1.5}},
        {"grid": {**grid, "width": 10**6, "height": 10**6}, "start": {"x": 0, "y": 0}, "goal": {"x": 1, "y": 1}},
        {"grid": "not a grid"},
    ]


def test_hostile_input_never_kills_a_worker(db_url: str) -> None:
    chaos.prepare(db_url)
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.canary (id int)")
        conn.execute("INSERT INTO public.canary VALUES (1)")
        q = chaos.QUEUE
        conn.execute("SELECT pgmq.send(%s, '\"just a string\"'::jsonb)", (q,))
        conn.execute("SELECT pgmq.send(%s, '[1, 2, 3]'::jsonb)", (q,))
        conn.execute("SELECT pgmq.send(%s, 'null'::jsonb)", (q,))
        conn.execute(f"INSERT INTO pgmq.q_{q} (vt, message) VALUES (now(), '{{\"handler\": 7}}')")
        big = StepMessage.build(chaos.NS, "noop", {"blob": "x" * (1 << 20)})
        unknown = StepMessage.build(chaos.NS, "no_such_handler'; DROP TABLE public.canary; --", {})
        planning = [StepMessage.build(chaos.NS, "path_plan", i) for i in hostile_planning_inputs()]
        # NaN is not JSON: send it the way a careless producer would, as text pgmq cannot parse...
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (q, json.dumps(planning[1])))
        planning[1]["inputs"]["start"]["x"] = "NaN"  # ...and as the string a lenient encoder emits
        conn.execute("SELECT pgmq.send_batch(%s, %s::jsonb[])", (q, [Jsonb(b) for b in [big, unknown, *planning]]))
        normal = StepMessage.build(chaos.NS, "noop", {})
    env = chaos.base_env(db_url)
    proc = chaos.start_run(env, "--mode", "Hybrid")
    try:
        hostile_total = 4 + 2 + len(planning)
        chaos.wait_outcomes(db_url, 2 + len(planning), timeout=60)  # the ones with a step_uuid
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SELECT pgmq.send(%s, %s)", (chaos.QUEUE, Jsonb(normal)))
        chaos.wait_outcomes(db_url, 3 + len(planning), timeout=60)
        assert proc.poll() is None  # alive
    finally:
        code, err = chaos.stop(proc)
    assert code == 0, err
    with psycopg.connect(db_url, autocommit=True) as conn:
        statuses = dict(conn.execute("SELECT step_uuid::text, status FROM tasker.step_results").fetchall())
        assert statuses[normal["step_uuid"]] == "succeeded"
        assert statuses[big["step_uuid"]] == "succeeded"  # 1 MB is large, not hostile
        assert statuses[unknown["step_uuid"]] == "dead_lettered"
        # Each invalid planning request is dead-lettered at once (no attempt can fix it), with
        # the field at fault named.
        fields = ["grid.width", "start.x", "grid.width", "grid:"]
        for body, field in zip(planning, fields, strict=True):
            status, error = conn.execute(
                "SELECT status, error FROM tasker.step_results WHERE step_uuid = %s", (body["step_uuid"],)
            ).fetchone() or (None, None)
            assert status == "dead_lettered" and error["reason"] == "validation_error", (body["inputs"], error)
            assert field in error["message"], error
        dlq = conn.execute(
            f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{chaos.DLQ} ORDER BY msg_id"
        ).fetchall()
        # Everything but the big noop and the normal step, in the order sent: the four bodies that
        # are no step message, the handler name that is no valid name, the four bad requests.
        assert [r[0] for r in dlq] == ["malformed_message"] * 5 + ["validation_error"] * len(planning)
        assert len(dlq) == hostile_total - 1
        assert conn.execute("SELECT count(*) FROM public.canary").fetchone() == (1,)
        assert conn.execute(f"SELECT count(*) FROM pgmq.q_{chaos.QUEUE}").fetchone() == (0,)


@pytest.mark.parametrize(
    "worker_id",
    ["x'; DROP TABLE public.canary; --", "名前-😀", "a" * 201, "", "a/b", "tab\there"],
)
def test_hostile_worker_ids_through_the_api(db_url: str, worker_id: str) -> None:
    import anyio
    import httpx

    from tasker_worker.api.app import ApiContext, create_app
    from tasker_worker.db.connection import open_pool
    from tasker_worker.testing import make_config

    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.canary (id int)")

    async def go() -> tuple[int, int]:
        config = make_config()
        pool = await open_pool(db_url, config.database, max_size=2)
        try:
            app = create_app(ApiContext(pool, config))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                body = {"worker_id": worker_id, "name": "n", "hostname": "h", "pid": 1}
                created = await client.post("/api/workers", json=body)
                fetched = await client.get(f"/api/workers/{worker_id}") if created.status_code == 201 else created
                return created.status_code, fetched.status_code
        finally:
            await pool.close()

    created, fetched = anyio.run(go)
    if len(worker_id) in range(1, 201) and "/" not in worker_id and worker_id.isprintable():
        assert (created, fetched) == (201, 200)
    else:
        assert created == 400
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('public.canary') IS NOT NULL").fetchone() == (True,)


# --- bad configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra_env", "args", "code", "words"),
    [
        ({"TASKER__EVENT_SYSTEM__DEPLOYMENT_MODE": "Sometimes"}, [], 2, "deployment_mode"),
        ({"TASKER__WORKER__NAMESPACES": "not json"}, [], 2, "TASKER__WORKER__NAMESPACES"),
        ({"TASKER__EVENT_SYSTEM__MAX_CONCURRENT_PROCESSORS": "many"}, [], 2, "max_concurrent_processors"),
        ({}, ["--config", "/nonexistent/tasker"], 2, "/nonexistent/tasker"),
        ({"TASKER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, [], 1, "cannot connect"),
    ],
)
def test_bad_configuration_is_one_line_and_starts_nothing(
    db_url: str, extra_env: dict[str, str], args: list[str], code: int, words: str
) -> None:
    env = {**chaos.base_env(db_url, TASKER__DATABASE__AUTO_MIGRATE="true"), **extra_env}
    proc = subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *args, "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], proc.stderr
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM tasker.workers").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM pgmq.meta WHERE queue_name LIKE 'worker_chaos%'").fetchone() == (0,)
