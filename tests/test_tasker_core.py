"""tasker-core's wire against a real PostgreSQL: its producer SQL, its notifications, and its
steps left alone (docs/tasker-core.md).

``TASKER_CORE_STEP_POLLS``: how many poll cycles of a Hybrid worker a tasker-core step must
survive (default 25 at a 200 ms poll). The issue asks for a minute of a Hybrid worker: at the
default poll interval (5 s) that is 12 cycles, and each cycle (and each notification) is where
the worker could take the step; the worker's own timing is what the cycles count, so 25 short
ones cover more chances to take it than a minute of default ones.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import psycopg
import pytest
from listening import notifications_so_far
from logcapture import json_logs, lines
from prometheus_client.parser import text_string_to_metric_families
from psycopg import conninfo, sql
from psycopg.types.json import Jsonb

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.db import migrations, queries
from tasker_worker.db.connection import open_pool
from tasker_worker.domain.notifications import MESSAGE_READY_CHANNEL, message_ready_channel
from tasker_worker.domain.steps import StepMessage
from tasker_worker.testing import fetch, fetch_value, make_config, outcomes_at_least, running_worker, wait_until

NS = "tcore"
QUEUE = f"worker_{NS}_queue"
POLLS = int(os.environ.get("TASKER_CORE_STEP_POLLS", "25"))

# --- a mirror of tasker-core's serde rules (crates/tasker-pgmq/src/events.rs, 0.1.8) ------------
# PgmqNotifyEvent is tagged on event_type; each variant's required keys and types below. serde
# ignores unknown keys; a missing Option is None; metadata defaults to an empty map.

_I64 = (-(2**63), 2**63 - 1)
_I32 = (-(2**31), 2**31 - 1)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})")
_REQUIRED: dict[str, dict[str, str]] = {
    "message_ready": {"msg_id": "i64", "queue_name": "str", "namespace": "str", "ready_at": "time"},
    "message_with_payload": {
        "msg_id": "i64",
        "queue_name": "str",
        "namespace": "str",
        "message": "any",
        "ready_at": "time",
    },
    "batch_ready": {
        "msg_ids": "[i64]",
        "queue_name": "str",
        "namespace": "str",
        "message_count": "i64",
        "ready_at": "time",
        "delay_seconds": "i32",
    },
}
_OPTIONAL: dict[str, dict[str, str]] = {
    "message_ready": {"metadata": "map", "visibility_timeout_seconds": "i32?"},
    "message_with_payload": {"delay_seconds": "i32"},
    "batch_ready": {"metadata": "map"},
}


def _int_in(value: Any, bounds: tuple[int, int]) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and bounds[0] <= value <= bounds[1]


def _fits(kind: str, value: Any) -> bool:
    if kind == "any":
        return True
    if kind == "str":
        return isinstance(value, str)
    if kind == "i64":
        return _int_in(value, _I64)
    if kind == "i32":
        return _int_in(value, _I32)
    if kind == "i32?":
        return value is None or _int_in(value, _I32)
    if kind == "[i64]":
        return isinstance(value, list) and all(_int_in(v, _I64) for v in value)
    if kind == "map":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if kind == "time":
        return isinstance(value, str) and _RFC3339.fullmatch(value) is not None
    raise AssertionError(kind)


def tasker_core_refuses(payload: dict[str, Any]) -> list[str]:
    """Why tasker-core's listener would drop ``payload`` (empty: it reads it)."""
    event_type = payload.get("event_type")
    if event_type not in _REQUIRED:
        return [f"unknown event_type {event_type!r}"]
    problems = [f"{k} missing" for k in _REQUIRED[event_type] if k not in payload]
    for key, kind in {**_REQUIRED[event_type], **_OPTIONAL[event_type]}.items():
        if key in payload and not _fits(kind, payload[key]):
            problems.append(f"{key}={payload[key]!r} is not {kind}")
    return problems


def test_the_mirror_refuses_what_tasker_core_refuses() -> None:
    ready = {"msg_id": 1, "queue_name": "q", "namespace": "n", "ready_at": "2026-01-01T00:00:00.5+00:00"}
    assert tasker_core_refuses({"event_type": "message_ready", **ready}) == []
    batch = {"event_type": "batch_ready", "msg_ids": [1], "message_count": 1, **ready}
    assert tasker_core_refuses(batch) == ["delay_seconds missing"]  # what our batch_ready lacked
    assert tasker_core_refuses({**batch, "delay_seconds": 0, "ready_at": "2026-01-01 00:00:00"}) != []
    assert tasker_core_refuses({"event_type": "message_with_payload", **ready}) == ["message missing"]


# --- helpers ---------------------------------------------------------------------------------


def _core_step() -> dict[str, str]:
    """A tasker-core step message: three UUIDs, its handler and inputs are in its own tables."""
    return {"task_uuid": str(uuid.uuid4()), "step_uuid": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())}


def _connect_as_tasker_core(url: str) -> psycopg.Connection[Any]:
    """A session as tasker-core's producers have one: `tasker` on the search_path, functions
    called unqualified."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SET search_path = tasker, public")
    return conn


def _drain(conn: psycopg.Connection[Any]) -> list[tuple[str, str]]:
    return [(n.channel, n.payload) for n in notifications_so_far(conn)]


def _listen(url: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f'LISTEN "{message_ready_channel(NS)}"')
    conn.execute(f'LISTEN "{MESSAGE_READY_CHANNEL}"')
    return conn


# --- the producer functions and their notifications -------------------------------------------


def test_every_payload_on_the_ready_channels_is_read_by_tasker_core(url: str) -> None:
    """Ours (the trigger for pgmq.send, send_batch, a raw INSERT, a delay, a batch of 10,000; a
    put-back's announcement) and those of tasker-core's producer functions: each send is one
    notification per channel, under 8,000 bytes, with tasker-core's fields and ours."""
    step = StepMessage.build(NS, "noop", {"n": 1})
    # 3,600 and 4,000 characters, 7,200 and 8,000 bytes: both under tasker-core's threshold,
    # which it measures in characters (the second then fails its send: pg_notify's 8,000 bytes).
    wide, wider = "é" * 3600, "é" * 4000
    with _listen(url) as lc, _connect_as_tasker_core(url) as tc:
        sends: list[str] = []

        def send(label: str, sql: str, params: Any = None) -> None:
            tc.execute(sql, params)
            sends.append(label)

        send("send", "SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(step)))
        send("send delayed", "SELECT pgmq.send(%s, %s, 7)", (QUEUE, Jsonb(step)))
        send("send_batch", "SELECT pgmq.send_batch(%s, ARRAY[%s, %s]::jsonb[])", (QUEUE, Jsonb(step), Jsonb(step)))
        send("insert", f"INSERT INTO pgmq.q_{QUEUE} (vt, message) SELECT now(), '{{}}' FROM generate_series(1, 3)")
        send("batch 10000", "SELECT count(*) FROM pgmq.send_batch(%s, array_fill('{}'::jsonb, ARRAY[10000]))", (QUEUE,))
        send("core", "SELECT pgmq_send_with_notify(%s, %s)", (QUEUE, Jsonb(step)))
        send("core delayed", "SELECT pgmq_send_with_notify(%s, %s, 3)", (QUEUE, Jsonb(step)))
        send("core wide", "SELECT pgmq_send_with_notify(%s, %s)", (QUEUE, Jsonb({"text": wide})))
        send("core wider", "SELECT pgmq_send_with_notify(%s, %s)", (QUEUE, Jsonb({"text": wider})))
        send(
            "core batch",
            "SELECT count(*) FROM pgmq_send_batch_with_notify(%s, ARRAY[%s, %s]::jsonb[])",
            (QUEUE, Jsonb(step), Jsonb(step)),
        )
        send(
            "core batch 1000 delayed",
            "SELECT count(*) FROM pgmq_send_batch_with_notify(%s, array_fill('{}'::jsonb, ARRAY[1000]), 2)",
            (QUEUE,),
        )
        ids = [r[0] for r in tc.execute(f"SELECT msg_id FROM pgmq.q_{QUEUE} ORDER BY msg_id LIMIT 150")]

        # What a put-back's announcement sends (QueueClient.announce_ready).
        tc.execute(queries.ANNOUNCE_READY, {"queue": QUEUE, "ids": ids[:1], "delay": 0.25})
        tc.execute(queries.ANNOUNCE_READY, {"queue": QUEUE, "ids": ids, "delay": 1.6})
        sends += ["announce one", "announce many"]
        got = _drain(lc)

    by_channel: dict[str, list[dict[str, Any]]] = {}
    for channel, payload in got:
        assert len(payload.encode()) < 8000
        by_channel.setdefault(channel, []).append(json.loads(payload))
    namespaced = by_channel[message_ready_channel(NS)]
    assert len(namespaced) == len(sends), "one notification per send, not one from the trigger as well"
    assert [p["event_type"] for p in by_channel[MESSAGE_READY_CHANNEL]] == [
        p["event_type"] for p in namespaced[: len(sends) - 2]
    ]  # announcements go to the namespace's channel only
    for label, payload in zip(sends, namespaced, strict=True):
        assert tasker_core_refuses(payload) == [], (label, payload)
        assert payload["queue_name"] == QUEUE and payload["namespace"] == NS, label
        assert isinstance(payload["delay_seconds"], int), label
    shown = dict(zip(sends, namespaced, strict=True))
    assert shown["send"]["event_type"] == "message_ready" and shown["send"]["delay_seconds"] == 0
    assert shown["send delayed"]["delay_seconds"] == 7
    assert shown["send_batch"]["event_type"] == "batch_ready" and shown["send_batch"]["delay_seconds"] == 0
    assert shown["batch 10000"]["message_count"] == 10000 and len(shown["batch 10000"]["msg_ids"]) == 100
    core = shown["core"]
    assert core["event_type"] == "message_with_payload" and core["message"] == step
    delayed = shown["core delayed"]
    assert delayed["delay_seconds"] == 3
    assert (datetime.fromisoformat(delayed["ready_at"]) - datetime.now(UTC)).total_seconds() > 1
    for label in ("core wide", "core wider"):  # measured in bytes: sent without the message, never cut
        omitted = shown[label]
        assert omitted["event_type"] == "message_ready" and omitted["payload_omitted"] is True, label
        assert "message" not in omitted, label
    big = shown["core batch 1000 delayed"]
    assert big["event_type"] == "batch_ready" and big["message_count"] == 1000 and big["delay_seconds"] == 2
    assert len(big["msg_ids"]) == 100 and big["truncated"] is True
    assert big["max_msg_id"] - big["min_msg_id"] == 999
    assert shown["announce one"]["event_type"] == "message_ready" and shown["announce one"]["delay_seconds"] == 0
    assert shown["announce many"]["event_type"] == "batch_ready" and shown["announce many"]["delay_seconds"] == 2


def test_a_function_send_rolled_back_or_failed_leaves_the_trigger_announcing(url: str) -> None:
    """The trigger is quiet only for the statement a producer function announces itself: a
    plain send after it, in the same transaction, is announced as before, and a failed call
    leaves nothing switched off."""
    with _listen(url) as lc, _connect_as_tasker_core(url) as tc:
        with tc.transaction():
            tc.execute("SELECT pgmq_send_with_notify(%s, '{}')", (QUEUE,))
            tc.execute("SELECT pgmq.send(%s, '{}')", (QUEUE,))
        with pytest.raises(psycopg.errors.UndefinedTable):
            tc.execute("SELECT pgmq_send_with_notify('worker_nowhere_queue', '{}')")
        tc.execute("SELECT pgmq.send(%s, '{}')", (QUEUE,))
        got = [json.loads(p) for c, p in _drain(lc) if c == message_ready_channel(NS)]
    assert [p["event_type"] for p in got] == ["message_with_payload", "message_ready", "message_ready"]


def test_read_specific_message_claims_one_visible_message(url: str) -> None:
    with _connect_as_tasker_core(url) as tc:
        [(msg_id,)] = tc.execute("SELECT pgmq_send_with_notify(%s, '{\"a\": 1}')", (QUEUE,)).fetchall()
        [row] = tc.execute("SELECT * FROM pgmq_read_specific_message(%s, %s, 20)", (QUEUE, msg_id)).fetchall()
        assert row[0] == msg_id and row[1] == 1 and row[4] == {"a": 1}
        assert (row[3] - datetime.now(UTC)).total_seconds() > 15
        # Invisible now: a second read (or any other reader) gets nothing.
        assert tc.execute("SELECT * FROM pgmq_read_specific_message(%s, %s)", (QUEUE, msg_id)).fetchall() == []
        with pytest.raises(psycopg.errors.UndefinedTable):
            tc.execute("SELECT * FROM pgmq_read_specific_message('worker_nowhere_queue', 1)")


def test_a_producer_role_sends_through_them_with_tasker_on_its_search_path(url: str) -> None:
    """Granted to tasker_producer, called unqualified as tasker-core does (the search_path set on
    its role, docs/tasker-core.md); reading one message claims, which is a worker's privilege."""
    suffix = uuid.uuid4().hex[:8]
    password = uuid.uuid4().hex
    roles = {"producer": f"t_core_producer_{suffix}", "worker": f"t_core_worker_{suffix}"}
    with psycopg.connect(url, autocommit=True) as admin:
        for kind, role in roles.items():
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                    sql.Identifier(role), sql.Literal(password), sql.Identifier(f"tasker_{kind}")
                )
            )
            admin.execute(
                sql.SQL('ALTER ROLE {} SET search_path = "$user", public, tasker').format(sql.Identifier(role))
            )
    try:
        as_producer = conninfo.make_conninfo(url, user=roles["producer"], password=password)
        as_worker = conninfo.make_conninfo(url, user=roles["worker"], password=password)
        with psycopg.connect(as_producer, autocommit=True) as p:
            [(msg_id,)] = p.execute("SELECT pgmq_send_with_notify(%s, %s)", (QUEUE, Jsonb(_core_step()))).fetchall()
            batch = p.execute("SELECT * FROM pgmq_send_batch_with_notify(%s, ARRAY['{}', '{}']::jsonb[], 1)", (QUEUE,))
            assert len(batch.fetchall()) == 2
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                p.execute("SELECT * FROM pgmq_read_specific_message(%s, %s)", (QUEUE, msg_id))
        with psycopg.connect(as_worker, autocommit=True) as w:
            [row] = w.execute("SELECT msg_id, read_ct FROM pgmq_read_specific_message(%s, %s)", (QUEUE, msg_id))
            assert row == (msg_id, 1)
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY(%s)",
                (list(roles.values()),),
            )
            for role in roles.values():
                admin.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_database_that_has_tasker_cores_functions_keeps_them(blank_db_url: str) -> None:
    """Created only where absent: tasker-core's migrations ran first, so its functions stay."""
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA tasker")
        conn.execute(
            "CREATE FUNCTION tasker.pgmq_send_with_notify(queue_name text, message jsonb, delay_seconds integer DEFAULT 0)"
            " RETURNS bigint LANGUAGE sql AS 'SELECT -7::bigint'"
        )
    anyio.run(migrations.migrate, blank_db_url)
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        assert conn.execute("SELECT tasker.pgmq_send_with_notify('x', '{}')").fetchone() == (-7,)
        created = conn.execute(
            "SELECT to_regprocedure('tasker.pgmq_send_batch_with_notify(text, jsonb[], integer)') IS NOT NULL,"
            "       to_regprocedure('tasker.pgmq_read_specific_message(text, bigint, integer)') IS NOT NULL"
        ).fetchone()
        assert created == (True, True)


# --- a worker of ours on tasker-core's sends ------------------------------------------------------


@pytest.mark.anyio
async def test_an_event_driven_worker_runs_every_step_sent_through_tasker_cores_functions_once(url: str) -> None:
    """EventDrivenOnly has no poller: only the functions' notifications (message_with_payload,
    a signal-only message_ready, batch_ready; delayed or not) can wake it."""
    config = make_config(mode="EventDrivenOnly", namespaces=[NS])
    bodies = [StepMessage.build(NS, "noop", {"n": i}) for i in range(9)]
    for big in (bodies[1], bodies[7]):
        big["inputs"]["padding"] = "x" * 8000  # too large to travel with its notification
    async with running_worker(url, config) as worker:
        assert worker.event_system is not None and worker.event_system.listener is not None
        with _connect_as_tasker_core(url) as tc:

            def one(body: dict[str, Any], delay: int) -> None:
                tc.execute("SELECT pgmq_send_with_notify(%s, %s, %s)", (QUEUE, Jsonb(body), delay))

            def batch(some: list[dict[str, Any]], delay: int) -> None:
                tc.execute(
                    "SELECT count(*) FROM pgmq_send_batch_with_notify(%s, %s::jsonb[], %s)",
                    (QUEUE, [Jsonb(b) for b in some], delay),
                )

            one(bodies[0], 0)
            one(bodies[1], 0)
            batch(bodies[2:5], 0)
            batch(bodies[5:7], 1)
            one(bodies[7], 1)
            # Sent last, due last: nothing else wakes the worker for it.
            one(bodies[8], 3)
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=30)
    rows = await fetch(url, "SELECT step_uuid::text, status FROM tasker.step_results")
    assert sorted(rows) == sorted((b["step_uuid"], "succeeded") for b in bodies)
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq") == 0


@pytest.mark.anyio
async def test_a_tasker_core_step_survives_a_hybrid_worker_untouched(url: str) -> None:
    """Left on its queue for tasker-core's workers (read count restored, nothing in our DLQ, no
    outcome), logged once for its queue, counted; while our own steps run, and a malformed one
    of ours is still dead-lettered as malformed_message."""
    overrides = {"event_system.fallback_poller.polling_interval": "200ms"}
    config = make_config(mode="Hybrid", namespaces=[NS], overrides=overrides)
    core = [_core_step(), _core_step()]
    with json_logs() as buffer:
        async with running_worker(url, config) as worker:
            async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                await conn.execute("SET search_path = tasker, public")
                core_ids = [
                    (await (await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(core[0])))).fetchone())[0]
                ]  # type: ignore[index]
                row = await (
                    await conn.execute("SELECT pgmq_send_with_notify(%s, %s)", (QUEUE, Jsonb(core[1])))
                ).fetchone()
                core_ids.append(row[0])  # type: ignore[index]
                ours = StepMessage.build(NS, "noop", {})
                await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(ours)))
                malformed = {**_core_step(), "handler": "noop"}  # ours (it names a handler), missing a namespace
                await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(malformed)))
            counters = worker.stats.counters
            await wait_until(lambda: counters["tasker_core_steps_left"] >= 2, timeout=20)
            polls_then = counters["claims_poll"]
            await wait_until(lambda: counters["claims_poll"] >= polls_then + POLLS, timeout=POLLS * 2 + 30)
            await wait_until(outcomes_at_least(url, 2), timeout=20)
            left = counters["tasker_core_steps_left"]
            metrics = await _metrics(url, config, worker)
    rows = await fetch(url, f"SELECT msg_id, read_ct, message, vt <= clock_timestamp() FROM pgmq.q_{QUEUE} ORDER BY 1")
    assert rows == [(core_ids[0], 0, core[0], True), (core_ids[1], 0, core[1], True)]
    assert left == 2, "each was given back once, then left alone"
    dead = await fetch(url, f"SELECT message, headers -> 'tasker_dlq' ->> 'reason' FROM pgmq.q_{QUEUE}_dlq")
    assert dead == [(malformed, "malformed_message")]
    outcomes = dict(await fetch(url, "SELECT step_uuid::text, status FROM tasker.step_results"))
    assert outcomes == {ours["step_uuid"]: "succeeded", malformed["step_uuid"]: "dead_lettered"}
    said = [line for line in lines(buffer) if "tasker-core steps" in line.get("message", "")]
    assert len(said) == 1 and said[0]["queue"] == QUEUE
    [sample] = [
        s
        for f in text_string_to_metric_families(metrics)
        for s in f.samples
        if s.name == "tasker_worker_tasker_core_steps_left_total" and s.labels == {"worker_id": worker.worker_id}
    ]
    assert sample.value == 2


async def _metrics(url: str, config: Any, worker: Any) -> str:
    """What ``GET /metrics`` of an API beside ``worker`` answers."""
    pool = await open_pool(url, config.database, max_size=2)
    try:
        transport = httpx.ASGITransport(app=create_app(ApiContext.for_worker(pool, config, worker)))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
            return (await api.get("/metrics")).text
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_the_harness_leaves_a_tasker_core_step_as_the_worker_does() -> None:
    """The rule is the rulebook's, so HandlerHarness (the real runner, in memory) keeps it too."""
    from tasker_worker.testing import HandlerHarness

    harness = HandlerHarness()
    core = _core_step()
    harness.send_raw(core)
    harness.send_raw({**_core_step(), "inputs": {}})  # names a key of ours: a malformed step of ours
    await harness.run_until_settled(within=30)
    assert [(m.body, m.read_ct) for m in harness.pending()] == [(core, 0)]
    [dead] = harness.dead_letters
    assert dead.body["inputs"] == {} and not harness.outcome(core["step_uuid"])
