"""Queue tables carry the storage settings that keep them lean (migration 0017)."""

from __future__ import annotations

import anyio
import psycopg
import pytest

from tasker_worker.db import migrations


def _options(conn: psycopg.Connection[tuple[object, ...]], table: str) -> dict[str, str]:
    row = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (table,)).fetchone()
    assert row is not None
    return dict(o.split("=", 1) for o in (row[0] or []))  # type: ignore[union-attr]


def _wanted(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, str]:
    row = conn.execute("SELECT tasker.queue_table_storage()").fetchone()
    assert row is not None
    return dict(o.split("=", 1) for o in row[0])  # type: ignore[union-attr]


def test_a_new_queue_gets_the_storage_settings(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute("SELECT tasker.create_namespace_queue('lean')")
    wanted = _wanted(conn)
    assert wanted["autovacuum_vacuum_scale_factor"] == "0.01"
    assert _options(conn, "pgmq.q_worker_lean_queue") == wanted
    # The dead-letter queue keeps PostgreSQL's defaults (written once, read by people).
    assert _options(conn, "pgmq.q_worker_lean_queue_dlq") == {}


def test_an_operators_value_stays_and_a_tuned_table_is_left_alone(
    conn: psycopg.Connection[tuple[object, ...]],
) -> None:
    conn.execute("SELECT tasker.create_namespace_queue('lean')")
    conn.execute("ALTER TABLE pgmq.q_worker_lean_queue SET (autovacuum_vacuum_scale_factor = 0.05)")
    conn.execute("ALTER TABLE pgmq.q_worker_lean_queue RESET (autovacuum_vacuum_cost_delay)")
    conn.execute("SELECT tasker.create_namespace_queue('lean')")  # what every worker start does
    options = _options(conn, "pgmq.q_worker_lean_queue")
    assert options["autovacuum_vacuum_scale_factor"] == "0.05"
    assert options["autovacuum_vacuum_cost_delay"] == "0"
    # Nothing missing: no ALTER TABLE (no lock, no catalog write) on the next start.
    assert conn.execute("SELECT tasker.tune_queue_table('pgmq.q_worker_lean_queue')").fetchone() == (False,)


def test_queues_that_exist_get_them_when_the_migration_applies(
    blank_db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = migrations.discover()
    before = [m for m in every if m.version < "0017"]
    monkeypatch.setattr(migrations, "discover", lambda: before)
    anyio.run(migrations.migrate, blank_db_url)
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('old')")
        conn.execute("SELECT pgmq.create('worker_raw_queue')")  # made with pgmq's own call
        conn.execute("SELECT pgmq.create('somebody_elses')")
        assert _options(conn, "pgmq.q_worker_old_queue") == {}
    monkeypatch.setattr(migrations, "discover", lambda: every)
    assert "0017_queue_table_storage" in anyio.run(migrations.migrate, blank_db_url)
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        wanted = _wanted(conn)
        assert _options(conn, "pgmq.q_worker_old_queue") == wanted
        assert _options(conn, "pgmq.q_worker_raw_queue") == wanted
        assert _options(conn, "pgmq.q_worker_old_queue_dlq") == {}
        assert _options(conn, "pgmq.q_somebody_elses") == {}
