"""Least privilege against a real server: a pgmq-only producer keeps working after our
migrations, a worker fleet runs as a login role holding only tasker_worker, a producer as one
holding only tasker_producer, and a command given too little says which grant is missing."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from listening import notifications_so_far
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, make_config, outcomes_at_least, running_worker, wait_until

REPO = Path(__file__).resolve().parent.parent
NS = "least"
QUEUE = f"worker_{NS}_queue"

#: What plain pgmq asks of a producer (pgmq's own documentation of a non-owner role).
PGMQ_ONLY_GRANTS = """
GRANT USAGE, CREATE ON SCHEMA pgmq TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgmq TO {role};
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgmq TO {role};
"""


@pytest.fixture
def logins(db_url: str) -> Iterator[dict[str, str]]:
    """Login roles (cluster-wide, so with unique names) and their URLs to the test database:
    ``pgmq_only`` (plain pgmq's privileges), ``producer``, ``worker``, ``operator`` (each holding
    only that tasker role) and ``nobody``. Dropped with everything granted to them at the end."""
    suffix = uuid.uuid4().hex[:8]
    password = uuid.uuid4().hex
    names = {kind: f"t_{kind}_{suffix}" for kind in ("pgmq_only", "producer", "worker", "operator", "nobody")}
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
        for kind, role in names.items():
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
            )
            if kind == "pgmq_only":
                conn.execute(PGMQ_ONLY_GRANTS.format(role=sql.Identifier(role).as_string(conn)))
            elif kind != "nobody":
                conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(f"tasker_{kind}"), sql.Identifier(role)))
    try:
        yield {kind: conninfo.make_conninfo(db_url, user=role, password=password) for kind, role in names.items()}
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
                (list(names.values()),),
            )
            for role in names.values():
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_pgmq_only_producer_works_as_on_plain_pgmq(db_url: str, logins: dict[str, str]) -> None:
    """send, send_batch, a raw INSERT, create_queue and drop_queue of its own queue, with the
    privileges plain pgmq needs and none on schema tasker; its sends are announced."""
    with (
        psycopg.connect(db_url, autocommit=True) as listener,
        psycopg.connect(logins["pgmq_only"], autocommit=True) as p,
    ):
        listener.execute('LISTEN "pgmq_message_ready"')
        assert p.execute("SELECT has_schema_privilege('tasker', 'USAGE')").fetchone() == (False,)
        [(one,)] = p.execute("SELECT pgmq.send(%s, '{\"a\": 1}')", (QUEUE,)).fetchall()
        batch = [r[0] for r in p.execute("SELECT * FROM pgmq.send_batch(%s, ARRAY['{}', '{}']::jsonb[])", (QUEUE,))]
        p.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) VALUES (now(), '{{}}')")
        p.execute("SELECT pgmq.create('producers_own')")
        [(own,)] = p.execute("SELECT pgmq.send('producers_own', '{}')").fetchall()
        notes = [n.payload for n in notifications_so_far(listener)]
        assert p.execute("SELECT pgmq.drop_queue('producers_own')").fetchone() == (True,)
    got = [json.loads(n) for n in notes]
    assert [(n["queue_name"], n["message_count"]) for n in got] == [
        (QUEUE, 1),
        (QUEUE, 2),
        (QUEUE, 1),
        ("producers_own", 1),
    ]
    assert got[0]["msg_id"] == one and got[1]["msg_ids"] == batch and got[3]["msg_id"] == own


def test_the_definer_functions_give_a_caller_no_new_power(logins: dict[str, str]) -> None:
    """The trigger helpers run as the owner, so they refuse what their caller could misuse: a
    worker cannot attach our trigger to another table, a producer cannot create queues."""
    with psycopg.connect(logins["worker"], autocommit=True) as w:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            w.execute("SELECT tasker.attach_notify_trigger('tasker.workers'::regclass)")
    with psycopg.connect(logins["producer"], autocommit=True) as p:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute("SELECT tasker.create_namespace_queue('mine')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute(f"DELETE FROM pgmq.q_{QUEUE}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            p.execute("UPDATE tasker.workers SET status = 'offline'")


@pytest.mark.anyio
async def test_a_fleet_runs_as_worker_roles_and_a_producer_as_a_producer_role(
    db_url: str, logins: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Two workers (registry, heartbeats, supervision, step events stored) log in holding only
    tasker_worker; a producer holding only tasker_producer sends with tasker.send_step and
    pgmq.send and reads the outcomes. Successes, a retry, a dead letter, the DLQ created on
    demand: all without one permission error."""
    reg = HandlerRegistry()

    async def flaky(ctx: Any, step: Any) -> int:
        if ctx.inputs.get("fail_once") and ctx.attempt == 1:
            raise RuntimeError("first attempt fails")
        return int(ctx.inputs.get("n", 0))

    reg.register("flaky", flaky)
    config = make_config(
        mode="Hybrid",
        namespaces=[NS, "second"],
        overrides={
            "database.auto_migrate": True,
            "retry.base_delay": "50ms",
            "events.step_events": "stored",
            "registry.heartbeat_interval": "200ms",
        },
    )
    caplog.set_level(logging.WARNING)
    async with (
        running_worker(logins["worker"], config, registry=reg),
        running_worker(logins["worker"], config, registry=reg),
    ):
        async with await psycopg.AsyncConnection.connect(logins["producer"], autocommit=True) as p:
            for n in range(10):
                await p.execute("SELECT tasker.send_step(%s, 'flaky', %s)", (NS, Jsonb({"n": n, "fail_once": n == 0})))
            await p.execute(
                "SELECT pgmq.send('worker_second_queue', %s)", (Jsonb(StepMessage.build("second", "flaky", {"n": 99})),)
            )
            await p.execute("SELECT tasker.send_step(%s, 'no_such_handler')", (NS,))
            await wait_until(outcomes_at_least(logins["producer"], 12), timeout=20)
            rows = await (
                await p.execute("SELECT status, count(*) FROM tasker.step_results GROUP BY 1 ORDER BY 1")
            ).fetchall()
            retried = await (
                await p.execute("SELECT max(attempts) FROM tasker.step_results WHERE status = 'succeeded'")
            ).fetchone()
            events = await (await p.execute("SELECT count(*) FROM tasker.event_log")).fetchone()
    assert rows == [("dead_lettered", 1), ("succeeded", 11)]
    assert retried == (2,) and events is not None and events[0] > 12
    dlq = await fetch(db_url, f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{QUEUE}_dlq")
    assert dlq == [("unknown_handler",)]
    denied = [r.getMessage() for r in caplog.records if "permission denied" in r.getMessage().lower()]
    assert denied == []
    workers = await fetch(db_url, "SELECT status, last_heartbeat_at IS NOT NULL FROM tasker.workers")
    assert workers == [("deregistered", True)] * 2


def _cli(url: str, tmp: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    env.update(TASKER_DATABASE_URL=url, TASKER_CONFIG_DIR=str(REPO / "config"), TASKER_ENV="test", HOME=str(tmp))
    return subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_a_command_given_too_little_names_the_missing_grant(logins: dict[str, str], tmp_path: Path) -> None:
    """Each command run by a role lacking its grant fails with one line naming the role to grant."""
    cases = [
        (logins["nobody"], ("queue", "send", NS, "--handler", "noop"), "GRANT tasker_producer TO"),
        (logins["worker"], ("dlq", "requeue", NS, "--all"), "GRANT tasker_operator TO"),
        (logins["nobody"], ("db", "migrate"), "run it as the role that owns them"),
    ]
    for url, argv, words in cases:
        done = _cli(url, tmp_path, *argv)
        assert done.returncode != 0, (argv, done.stdout)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "permission denied" in lines[0] and words in lines[0], (argv, done.stderr)
    # What the role holds, it may do: send (idempotently too), look a step up, cancel it.
    done = _cli(logins["producer"], tmp_path, "queue", "send", NS, "--handler", "noop")
    assert done.returncode == 0, done.stderr
    chosen = str(uuid.uuid4())
    for _ in range(2):
        done = _cli(
            logins["producer"],
            tmp_path,
            "queue",
            "send",
            NS,
            "--handler",
            "noop",
            "--step-uuid",
            chosen,
            "--delay",
            "600",
        )
        assert done.returncode == 0 and chosen in done.stdout, done.stderr
    assert _cli(logins["producer"], tmp_path, "steps", "show", chosen).returncode == 0
    with psycopg.connect(logins["producer"], autocommit=True) as conn:
        assert conn.execute("SELECT state FROM tasker.cancel_step(%s, %s::uuid)", (NS, chosen)).fetchone() == (
            "cancelled",
        )


@pytest.mark.anyio
async def test_a_worker_role_keeps_the_history_partitions_and_every_role_reads_them(
    db_url: str, logins: dict[str, str], no_day_partitions: None
) -> None:
    """The supervisor's history jobs as a login holding only tasker_worker: it creates day
    partitions and drops one past retention (owner's functions: it holds no DDL privilege),
    deletes past rows in a partition; the grants of the outcome table carry to every partition
    (a producer reads them, through the table or one by one) and nobody else may create or drop
    a partition."""
    from datetime import UTC, datetime, timedelta

    from tasker_worker.config.models import DatabaseConfig, RetentionConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.fleet import retention

    now = datetime.now(UTC)
    old_day = (now - timedelta(days=12)).date()
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
        conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts, worker_id,"
            " finished_at, uuid_time) SELECT u, %s, %s, g, 'succeeded', 1, 'old', at, tasker.uuid_time(u)"
            " FROM (SELECT g, at, tasker.uuid_v7(at) AS u FROM generate_series(1, 10) AS g,"
            " LATERAL (SELECT %s::timestamptz AS at) AS t) AS s",
            (NS, QUEUE, now - timedelta(days=12)),
        )
        conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts, worker_id,"
            " finished_at) SELECT gen_random_uuid(), %s, %s, g, 'succeeded', 1, 'old', now() - interval '9 days'"
            " FROM generate_series(1, 5) AS g",
            (NS, QUEUE),
        )
    with psycopg.connect(logins["worker"], autocommit=True) as w:
        assert w.execute("SELECT tasker.create_history_partition(%s)", (old_day,)).fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            w.execute("DROP TABLE tasker.step_results_default")
    pool = await open_pool(logins["worker"], DatabaseConfig(), max_size=2)
    try:
        assert len(await retention.ensure_partitions(pool, RetentionConfig(), now)) == 4
        with psycopg.connect(logins["producer"], autocommit=True) as p:
            name = f"step_results_{old_day:%Y%m%d}"
            assert p.execute(f"SELECT count(*) FROM tasker.{name}").fetchone() == (10,)
            assert p.execute("SELECT count(*) FROM tasker.step_results").fetchone() == (15,)
            for function in (
                "tasker.create_history_partition(current_date)",
                f"tasker.drop_history_partition('{name}', now())",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    p.execute(f"SELECT {function}")
        # 5 rows deleted, and the day's partition dropped (counted by its estimate).
        assert await retention.prune_outcomes(pool, RetentionConfig(), now) >= 5
    finally:
        await pool.close()
    assert await fetch(db_url, "SELECT count(*) FROM tasker.step_results") == [(0,)]
