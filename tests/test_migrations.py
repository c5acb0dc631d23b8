"""Migrations: idempotent, concurrent, pgmq installed exactly once."""

from __future__ import annotations

import os
import subprocess
import sys

import anyio
import psycopg

from tasker_worker.db import migrations


def test_migrate_is_idempotent(blank_db_url: str) -> None:
    first = anyio.run(migrations.migrate, blank_db_url)
    assert first[0].startswith("pgmq")
    assert [m for m in first if m[:4].isdigit()] == [f"{m.version}_{m.name}" for m in migrations.discover()]
    assert anyio.run(migrations.migrate, blank_db_url) == []
    status = anyio.run(migrations.status, blank_db_url)
    assert status.pending == [] and status.changed == []
    assert status.pgmq_installed_by in ("bundled sql", "extension")
    assert status.pgmq_version


def test_status_of_an_empty_database_lists_everything_pending(blank_db_url: str) -> None:
    status = anyio.run(migrations.status, blank_db_url)
    assert status.pgmq_installed_by is None
    assert status.pending == [m.path.name for m in migrations.discover()]


def test_four_processes_migrating_at_once(blank_db_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    cmd = [sys.executable, "-m", "tasker_worker.cli.main", "--database-url", blank_db_url, "db", "migrate"]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)
    ]
    results = [(*p.communicate(timeout=120), p.returncode) for p in procs]
    assert [r[2] for r in results] == [0, 0, 0, 0], results
    # Exactly one of them did the work; the others found it done.
    assert sum("applied pgmq" in r[0] for r in results) == 1, results
    assert sum("up to date" in r[0] for r in results) == 3, results
    with psycopg.connect(blank_db_url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM tasker.schema_migrations ORDER BY 1")]
        assert versions == sorted(["pgmq", *[m.version for m in migrations.discover()]])
        # pgmq's own objects exist once (a second bundled install would have failed on types).
        assert conn.execute("SELECT count(*) FROM pg_type WHERE typname = 'message_record'").fetchone() == (1,)


async def _starts_at_once(url: str, count: int) -> list[BaseException | None]:
    """What each start does to the schema, ``count`` at once: half migrate (an up-to-date
    database: the triggers and grants of every queue re-checked), half create their namespace's
    queue (which exists)."""
    results: list[BaseException | None] = []

    async def one(i: int) -> None:
        try:
            if i % 2:
                await migrations.migrate(url)
            else:
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute("SELECT tasker.create_namespace_queue(%s)", (f"race{i}",))
        except Exception as exc:  # collected: every start must succeed
            results.append(exc)
        else:
            results.append(None)

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return results


def test_processes_starting_at_once_on_a_migrated_database_with_queues(db_url: str) -> None:
    """Starts GRANT on the queue tables; two at once on one table failed with "tuple
    concurrently updated" (an API process and a worker started together saw it)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for i in range(20):
            conn.execute("SELECT tasker.create_namespace_queue(%s)", (f"race{i}",))
    for _ in range(5):
        assert anyio.run(_starts_at_once, db_url, 8) == [None] * 8


def test_queues_created_before_migrate_get_the_trigger(blank_db_url: str) -> None:
    from pgmq.install import get_embedded_install_sql

    with psycopg.connect(blank_db_url) as conn:
        conn.execute(get_embedded_install_sql().encode())
        conn.execute("SELECT pgmq.create('early_bird')")
        conn.commit()
    anyio.run(migrations.migrate, blank_db_url)
    with psycopg.connect(blank_db_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'tasker_notify_message_ready' "
            "AND tgrelid = 'pgmq.q_early_bird'::regclass"
        ).fetchone()
        assert row == (1,)


def test_schema_file_is_what_the_migrations_make(db_url: str) -> None:
    """sql/schema.sql shows the current definition of every table, view and function (the
    migrations only show how they came to be): it must equal a freshly migrated database's."""
    from tasker_worker.db import schema

    path = migrations.sql_dir() / "schema.sql"
    text = path.read_text()
    with psycopg.connect(db_url) as conn:
        major = str(conn.execute("SHOW server_version_num").fetchone()[0])[:2]  # type: ignore[index]
    if f"(PostgreSQL {major})" not in text.splitlines()[1]:
        import pytest

        pytest.skip(f"sql/schema.sql was generated on another major version than this server's ({major})")
    fresh = anyio.run(schema.dump, db_url)
    assert fresh == text, "sql/schema.sql is stale: regenerate it with `tasker-worker db schema > sql/schema.sql`"
