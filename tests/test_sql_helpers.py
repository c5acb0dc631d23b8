"""SQL helpers for plain-SQL producers, and hostile names through SQL, Python and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from tasker_worker.domain.names import namespace_of, queue_name, validate_namespace
from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import InvalidName

Conn = psycopg.Connection[Any]

HOSTILE = [
    "x'; DROP TABLE canary; --",
    'quote"name',
    "semi;colon",
    "Upper",
    "ünïcødé",
    "a" * 31,
    "",
    "1starts_with_digit",
    "dollar$sign",
    "space name",
    "tab\tname",
    "dash-name",
]


@pytest.fixture
def canary(conn: Conn) -> Conn:
    conn.execute("CREATE TABLE public.canary (id int)")
    conn.execute("INSERT INTO public.canary VALUES (42)")
    return conn


def canary_alive(conn: Conn) -> bool:
    return conn.execute("SELECT id FROM public.canary").fetchone() == (42,)


def test_send_step_builds_a_valid_message(conn: Conn) -> None:
    conn.execute("SELECT tasker.create_namespace_queue('orders')")
    msg_id = conn.execute(
        "SELECT tasker.send_step('orders', 'noop', '{\"k\": [1, 2]}', 0, NULL, NULL, 5, 2.5)"
    ).fetchone()[0]
    body = conn.execute("SELECT message FROM pgmq.q_worker_orders_queue WHERE msg_id = %s", (msg_id,)).fetchone()[0]
    step = StepMessage.parse(body)
    assert step.namespace == "orders" and step.handler == "noop" and step.inputs == {"k": [1, 2]}
    assert step.attempt_limit == 5 and step.timeout == 2.5
    other = conn.execute("SELECT tasker.send_step('orders', 'noop')").fetchone()[0]
    body2 = conn.execute("SELECT message FROM pgmq.q_worker_orders_queue WHERE msg_id = %s", (other,)).fetchone()[0]
    assert body2["step_uuid"] != body["step_uuid"] and body2["inputs"] == {}


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("'orders', 'no pe'", "handler name"),
        ("'orders', 'noop', '[1]'", "inputs must be a JSON object"),
        ("'orders', 'noop', '{}', -1", "delay"),
        ("'orders', 'noop', '{}', 0, NULL, NULL, 0", "attempt_limit"),
        ("'nosuchns', 'noop'", "does not exist"),
    ],
)
def test_send_step_rejects_bad_arguments(conn: Conn, args: str, words: str) -> None:
    conn.execute("SELECT tasker.create_namespace_queue('orders')")
    with pytest.raises(psycopg.Error, match=words):
        conn.execute(f"SELECT tasker.send_step({args})")


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_namespaces_rejected_in_sql(canary: Conn, name: str) -> None:
    with pytest.raises(psycopg.Error, match="namespace"):
        canary.execute("SELECT tasker.create_namespace_queue(%s)", (name,))
    with pytest.raises(psycopg.Error, match="namespace"):
        canary.execute("SELECT tasker.send_step(%s, 'noop')", (name,))
    assert canary_alive(canary)
    assert canary.execute("SELECT count(*) FROM pgmq.meta").fetchone() == (0,)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_namespaces_rejected_in_python(name: str) -> None:
    with pytest.raises(InvalidName):
        validate_namespace(name)
    with pytest.raises(InvalidName):
        queue_name(name)


def test_namespace_round_trip() -> None:
    assert namespace_of(queue_name("planning")) == "planning"
    assert namespace_of("worker_planning_queue_dlq") is None
    assert namespace_of("random") is None


def test_hostile_names_through_the_cli(canary: Conn, cli_env: dict[str, str]) -> None:
    for name in ["x'; DROP TABLE canary; --", "semi;colon", "a" * 200, "ünï"]:
        for argv in (["queue", "create", name], ["queue", "send", name, "--handler", "noop"], ["queue", "purge", name]):
            proc = subprocess.run(
                [sys.executable, "-m", "tasker_worker.cli.main", *argv],
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 2, (argv, proc.stderr)
            assert proc.stderr.startswith("error: namespace") and proc.stderr.count("\n") == 1
    assert canary_alive(canary)


def test_pgmq_rejects_injection_in_raw_queue_names(canary: Conn) -> None:
    with pytest.raises(psycopg.Error):
        canary.execute("SELECT pgmq.create(%s)", ("x'; DROP TABLE canary; --",))
    with pytest.raises(psycopg.Error):
        canary.execute("SELECT tasker.peek_messages(%s)", ("nope; DROP TABLE canary",))
    assert canary_alive(canary)


def test_step_message_parse_errors_are_readable() -> None:
    from tasker_worker.errors import StepValidationError

    for payload in ([1, 2], "text", 7, None, {"handler": "x"}, {**StepMessage.build("a", "noop"), "step_uuid": "zz"}):
        with pytest.raises(StepValidationError) as info:
            StepMessage.parse(payload)
        assert "\n" not in str(info.value)
    good = StepMessage.build("a", "noop", {"x": 1})
    assert StepMessage.parse(json.loads(json.dumps(good))).inputs == {"x": 1}


@pytest.mark.anyio
async def test_claims_from_sql_and_python(conn: Conn, db_url: str) -> None:
    """tasker.claim_steps from SQL and QueueClient.claim: oldest visible first, vt and read_ct
    moved, the dedup flag, StepAssigned rows under the claimant when step events are stored (and
    none when they are derived, the default), malformed bodies claimed too (to be
    dead-lettered), invisible rows skipped, an unknown queue a clear error."""
    from tasker_worker.config.models import DatabaseConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.db.queue_client import QueueClient
    from tasker_worker.domain.steps import Source
    from tasker_worker.errors import QueueNotFound

    conn.execute("SELECT tasker.create_namespace_queue('agree')")
    queue = queue_name("agree")
    done = StepMessage.build("agree", "noop")
    conn.execute(
        "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, attempts,"
        " worker_id, finished_at, uuid_time) VALUES (%s, 'agree', %s, 0, 'noop', 'succeeded', 1, 'earlier', now(),"
        " tasker.uuid_time(%s))",
        (done["step_uuid"], queue, done["step_uuid"]),
    )
    bodies: list[Any] = [done, StepMessage.build("agree", "noop"), [1, 2], StepMessage.build("agree", "noop")]
    for body in bodies:
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body)))
    conn.execute("SET tasker.step_events = 'stored'")
    sql_rows = conn.execute("SELECT msg_id, read_ct, already_done FROM tasker.claim_steps(%s, 30, 2, 'sql')", (queue,))
    assert [(r[1], r[2]) for r in sql_rows.fetchall()] == [(1, True), (1, False)]
    conn.execute("RESET tasker.step_events")

    pool = await open_pool(db_url, DatabaseConfig(), max_size=1)
    try:
        client = QueueClient(pool, store_events=True)
        claimed = await client.claim(queue, 30, 10, Source.POLL, worker_id="py")
        assert [(m.msg_id, m.read_ct, m.already_done) for m in claimed] == [(3, 1, False), (4, 1, False)]
        assert json.loads(claimed[0].body) == [1, 2] and json.loads(claimed[1].body) == bodies[3]
        assert await client.claim(queue, 30, 10, Source.POLL) == []  # all invisible now
        with pytest.raises(QueueNotFound):
            await client.claim('no"such', 30, 1, Source.POLL)
        # Derived step events (the default): a claim writes no event row, from Python or SQL.
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(StepMessage.build("agree", "noop"))))
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(StepMessage.build("agree", "noop"))))
        assert len(await QueueClient(pool).claim(queue, 30, 1, Source.POLL, worker_id="quiet")) == 1
        assert len(conn.execute("SELECT * FROM tasker.claim_steps(%s, 30, 1, 'quiet')", (queue,)).fetchall()) == 1
    finally:
        await pool.close()
    events = conn.execute(
        "SELECT worker_id, msg_id, step_uuid IS NULL FROM tasker.events WHERE event_type = 'StepAssigned'"
        " ORDER BY event_id"
    ).fetchall()
    assert events == [("sql", 1, False), ("sql", 2, False), ("py", 3, True), ("py", 4, False)]
    vts = conn.execute(f"SELECT count(*) FROM pgmq.q_{queue} WHERE vt > now() + interval '20 seconds'").fetchone()
    assert vts == (6,)


@pytest.mark.anyio
async def test_claims_can_leave_handlers_and_messages_alone(conn: Conn, db_url: str) -> None:
    """The skipping claim (open circuits, rejected steps) leaves the named handlers' messages
    and the named ids in the queue untouched (read_ct unchanged) and claims the rest in order."""
    from tasker_worker.config.models import DatabaseConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.db.queue_client import QueueClient
    from tasker_worker.domain.steps import Source

    conn.execute("SELECT tasker.create_namespace_queue('skips')")
    queue = queue_name("skips")
    for handler in ["noop", "charge", "noop", "noop", "charge"]:
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(StepMessage.build("skips", handler))))
    pool = await open_pool(db_url, DatabaseConfig(), max_size=1)
    try:
        client = QueueClient(pool)
        first = await client.claim(queue, 30, 10, Source.POLL, skip_handlers=["charge"], skip_msgs=[3])
        assert [m.msg_id for m in first] == [1, 4]
        second = await client.claim(queue, 30, 10, Source.POLL, skip_msgs=[5])
        assert [m.msg_id for m in second] == [2, 3]
    finally:
        await pool.close()
    read_cts = conn.execute(f"SELECT msg_id, read_ct FROM pgmq.q_{queue} ORDER BY msg_id").fetchall()
    assert read_cts == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 0)]


@pytest.mark.anyio
async def test_the_claim_is_planned_for_the_queue_it_meets(conn: Conn, db_url: str) -> None:
    """The claim is a prepared statement, but the pool's sessions plan it at every execution
    (plan_cache_mode = force_custom_plan): a plan made while the queue was empty and analyzed so
    is never reused once it is full (a frozen generic plan once made such a claim take 919 ms)."""
    from tasker_worker.config.models import DatabaseConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.db.queue_client import QueueClient

    conn.execute("SELECT tasker.create_namespace_queue('plans')")
    queue = queue_name("plans")
    conn.execute(f"ANALYZE pgmq.q_{queue}")
    pool = await open_pool(db_url, DatabaseConfig(), max_size=1)
    try:
        statement = QueueClient(pool).statements(queue).claim
        params = {"qty": 10, "vt": 30, "worker_id": None, "stamp": '{"tasker_claim": {"worker_id": null}}'}
        async with pool.connection() as c:
            for _ in range(8):  # past the five custom plans after which PostgreSQL may go generic
                assert await (await c.execute(statement, params, prepare=True)).fetchall() == []
            body = json.dumps(StepMessage.build("plans", "noop"))
            conn.execute("SELECT pgmq.send_batch(%s, array_fill(%s::jsonb, ARRAY[20000]))", (queue, body))
            claimed = await (await c.execute(statement, params, prepare=True)).fetchall()
            cur = await c.execute(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements WHERE statement = %s",
                (_numbered(statement),),
            )
            plans = await cur.fetchall()
    finally:
        await pool.close()
    assert len(claimed) == 10
    assert plans == [(0, 9)]


def _numbered(statement: str) -> str:
    """``statement`` with its named parameters numbered as psycopg sends them (in order of
    first appearance), as pg_prepared_statements shows it."""
    names: list[str] = []
    for name in re.findall(r"%\((\w+)\)s", statement):
        if name not in names:
            names.append(name)
    for i, name in enumerate(names, 1):
        statement = statement.replace(f"%({name})s", f"${i}")
    return statement


def test_sql_settle_is_fenced_and_records_once(conn: Conn) -> None:
    """tasker.record_outcomes from SQL: a settle carrying a read_ct the message no longer has
    (its claim was taken over) is refused and leaves the message as it is; the holder's settle
    goes through; a second message of the same step settles but adds no second outcome row."""
    conn.execute("SELECT tasker.create_namespace_queue('fenced')")
    queue = queue_name("fenced")
    body = StepMessage.build("fenced", "noop")
    for _ in range(2):
        conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (queue, json.dumps(body)))
    first, second = (r[0] for r in conn.execute("SELECT msg_id FROM pgmq.read(%s, 30, 2)", (queue,)).fetchall())
    conn.execute(f"UPDATE pgmq.q_{queue} SET vt = now() WHERE msg_id = %s", (first,))
    [(retaken,)] = conn.execute("SELECT read_ct FROM pgmq.read(%s, 30, 1)", (queue,)).fetchall()
    assert retaken == 2

    def settle(msg_id: int, read_ct: int, result: str) -> list[tuple[Any, ...]]:
        outcome = {"msg_id": msg_id, "read_ct": read_ct, "status": "succeeded", "result": result}
        return conn.execute(
            "SELECT msg_id, acked FROM tasker.record_outcomes(%s, 'w', %s::jsonb)", (queue, json.dumps([outcome]))
        ).fetchall()

    assert settle(first, 1, "stale") == [(first, False)]
    assert conn.execute(f"SELECT read_ct FROM pgmq.q_{queue} WHERE msg_id = %s", (first,)).fetchone() == (2,)
    assert conn.execute("SELECT count(*) FROM tasker.step_results").fetchone() == (0,)
    assert settle(first, 2, "holder") == [(first, True)]
    assert settle(second, 1, "duplicate") == [(second, True)]
    assert conn.execute(f"SELECT count(*) FROM pgmq.q_{queue}").fetchone() == (0,)
    assert conn.execute("SELECT result, attempts FROM tasker.step_results").fetchall() == [("holder", 2)]
