"""The NOTIFY contract: one notification per statement per queue, bounded payloads."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from listening import notifications_so_far

Conn = psycopg.Connection[Any]


def listen(url: str, *channels: str) -> Conn:
    conn = psycopg.connect(url, autocommit=True)
    for channel in channels:
        conn.execute(f'LISTEN "{channel}"')
    return conn


def drain(conn: Conn) -> list[tuple[str, dict[str, Any], int]]:
    """Every notification of the statements committed so far (see ``listening``)."""
    return [(n.channel, json.loads(n.payload), len(n.payload.encode())) for n in notifications_so_far(conn)]


@pytest.fixture
def queue(conn: Conn) -> str:
    return str(conn.execute("SELECT tasker.create_namespace_queue('alpha')").fetchone()[0])


def test_send_notifies_both_channels_once(db_url: str, conn: Conn, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha", "pgmq_message_ready") as lc:
        msg_id = conn.execute("SELECT pgmq.send(%s, '{\"x\": 1}')", (queue,)).fetchone()[0]
        got = drain(lc)
    assert sorted(c for c, _, _ in got) == ["pgmq_message_ready", "pgmq_message_ready.alpha"]
    payload = got[0][1]
    assert payload["event_type"] == "message_ready"
    assert payload["queue_name"] == queue and payload["namespace"] == "alpha"
    assert payload["msg_id"] == msg_id
    ready_at = datetime.fromisoformat(payload["ready_at"])
    assert abs((ready_at - datetime.now(UTC)).total_seconds()) < 5


def test_send_batch_is_one_notification(db_url: str, conn: Conn, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha") as lc:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT * FROM pgmq.send_batch(%s, ARRAY['{\"a\":1}','{\"a\":2}','{\"a\":3}']::jsonb[])", (queue,)
            )
        ]
        got = drain(lc)
    assert len(got) == 1
    payload = got[0][1]
    assert payload["event_type"] == "batch_ready"
    assert payload["msg_ids"] == ids and payload["message_count"] == 3


def test_batch_of_ten_thousand_stays_under_8000_bytes(db_url: str, conn: Conn, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha", "pgmq_message_ready") as lc:
        conn.execute(
            "SELECT count(*) FROM pgmq.send_batch(%s, (SELECT array_agg(jsonb_build_object('i', g)) "
            "FROM generate_series(1, 10000) g))",
            (queue,),
        )
        got = drain(lc)
    assert len(got) == 2
    for _, payload, size in got:
        assert size < 8000
        assert payload["message_count"] == 10000
        assert payload["max_msg_id"] - payload["min_msg_id"] == 9999
        assert len(payload["msg_ids"]) <= 100 and payload["truncated"] is True


def test_raw_insert_notifies_once_per_statement(db_url: str, conn: Conn, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha") as lc:
        conn.execute(
            f"INSERT INTO pgmq.q_{queue} (vt, message) "
            "SELECT now(), jsonb_build_object('n', g) FROM generate_series(1, 5) g"
        )
        conn.execute(f"INSERT INTO pgmq.q_{queue} (vt, message) VALUES (now(), '{{}}')")
        got = drain(lc)
    assert [p["message_count"] for _, p, _ in got] == [5, 1]


def test_delayed_message_has_future_ready_at(db_url: str, conn: Conn, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha") as lc:
        conn.execute("SELECT pgmq.send(%s, '{}', 60)", (queue,))
        got = drain(lc)
    ready_at = datetime.fromisoformat(got[0][1]["ready_at"])
    assert (ready_at - datetime.now(UTC)).total_seconds() > 50


def test_large_non_ascii_messages_keep_payload_small(db_url: str, conn: Conn, queue: str) -> None:
    body = {"text": "żółć 🚀 漢字" * 2000}  # ~40 KB, multi-byte
    with listen(db_url, "pgmq_message_ready.alpha") as lc:
        conn.execute("SELECT pgmq.send(%s, %s)", (queue, psycopg.types.json.Jsonb(body)))
        conn.execute(
            "SELECT pgmq.send_batch(%s, ARRAY[%s, %s]::jsonb[])",
            (queue, psycopg.types.json.Jsonb(body), psycopg.types.json.Jsonb(body)),
        )
        got = drain(lc)
    assert len(got) == 2
    assert all(size < 8000 for _, _, size in got)


def test_queue_created_after_migrate_by_plain_pgmq_gets_trigger(db_url: str, conn: Conn) -> None:
    conn.execute("SELECT pgmq.create('worker_late_queue')")
    conn.execute("SELECT pgmq.create_unlogged('side_channel')")
    with listen(db_url, "pgmq_message_ready.late", "pgmq_message_ready") as lc:
        conn.execute("SELECT pgmq.send('worker_late_queue', '{}')")
        conn.execute("SELECT pgmq.send('side_channel', '{}')")
        got = drain(lc)
    namespaced = [p for c, p, _ in got if c == "pgmq_message_ready.late"]
    assert len(namespaced) == 1 and namespaced[0]["namespace"] == "late"
    side = [p for c, p, _ in got if c == "pgmq_message_ready" and p["queue_name"] == "side_channel"]
    assert len(side) == 1 and side[0]["namespace"] == "side_channel"


def test_long_queue_name_does_not_break_send(db_url: str, conn: Conn) -> None:
    name = "q" * 47  # pgmq's limit; its namespaced channel would be too long for pg_notify
    conn.execute("SELECT pgmq.create(%s)", (name,))
    with listen(db_url, "pgmq_message_ready") as lc:
        conn.execute("SELECT pgmq.send(%s, '{}')", (name,))
        got = drain(lc)
    assert [p["queue_name"] for _, p, _ in got] == [name]


def test_concurrent_producers_do_not_block_each_other(db_url: str, queue: str) -> None:
    a = psycopg.connect(db_url)
    b = psycopg.connect(db_url)
    try:
        a.execute('SELECT pgmq.send(%s, \'{"p": "a"}\')', (queue,))  # transaction A stays open
        done = threading.Event()

        def produce_b() -> None:
            b.execute("SET LOCAL lock_timeout = '3s'")
            b.execute("SET LOCAL statement_timeout = '3s'")
            b.execute('SELECT pgmq.send(%s, \'{"p": "b"}\')', (queue,))
            b.commit()
            done.set()

        t = threading.Thread(target=produce_b)
        t.start()
        assert done.wait(10), "producer B was blocked by producer A's open transaction"
        t.join()
        a.commit()
        count = a.execute(f"SELECT count(*) FROM pgmq.q_{queue}").fetchone()
        assert count == (2,)
    finally:
        a.close()
        b.close()


def test_rolled_back_send_does_not_notify(db_url: str, queue: str) -> None:
    with listen(db_url, "pgmq_message_ready.alpha") as lc, psycopg.connect(db_url) as c:
        c.execute("SELECT pgmq.send(%s, '{}')", (queue,))
        c.rollback()
        assert drain(lc) == []
