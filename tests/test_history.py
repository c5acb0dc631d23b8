"""Partitioned outcome history (migration 0021), against a real PostgreSQL: every row of a
step_uuid goes to one partition chosen by the step_uuid alone, so a step is recorded once
across partitions; a missing partition fails no settle; retention drops whole day partitions,
never one whose rows may still deduplicate a queued step; a populated table of before 0021 is
converted without a scan under lock, its rows still deduplicating."""

from __future__ import annotations

import contextlib
import threading
import time
import types
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import psycopg
import pytest
from ledger_handlers import LEDGER_DDL, ledger
from psycopg.types.json import Jsonb

from tasker_worker.config.models import DatabaseConfig, RetentionConfig
from tasker_worker.db import migrations, queries
from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.steps import ClaimedMessage, Outcome, OutcomeStatus, Source, StepMessage, uuid7
from tasker_worker.fleet import retention
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, fetch_value, make_config, running_worker, wait_until

NS = "hist"
# Each test starts with no day partition, and creates, fills and drops its own.
pytestmark = pytest.mark.usefixtures("no_day_partitions")
QUEUE = f"worker_{NS}_queue"
DAY = timedelta(days=1)


def stamped(at: datetime) -> str:
    """A step_uuid made at ``at`` (a UUIDv7 of that time)."""
    return str(uuid7(at.timestamp()))


def body(step_uuid: str | None = None, **inputs: Any) -> dict[str, Any]:
    message = StepMessage.build(NS, "noop", inputs)
    if step_uuid is not None:
        message["step_uuid"] = step_uuid
    return message


@contextlib.asynccontextmanager
async def store(url: str) -> AsyncIterator[QueueClient]:
    """The worker's own claim and settle statements, on a pool of the test database."""
    pool = await open_pool(url, DatabaseConfig(), max_size=2)
    try:
        yield QueueClient(pool)
    finally:
        await pool.close()


async def send(url: str, *bodies: dict[str, Any]) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for b in bodies:
            await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(b)))


async def claim(client: QueueClient) -> list[ClaimedMessage]:
    claimed = list(await client.claim(QUEUE, 30, 100, Source.POLL, worker_id="t"))
    for m in claimed:
        m.step = StepMessage.decode(m.body)
    return claimed


async def finish(client: QueueClient, claimed: list[ClaimedMessage]) -> set[int]:
    """Settle each claimed message as the runner does: a step already done without a row, the
    others with a success."""
    now = time.time()
    outcomes = [
        Outcome(m, None if m.already_done else OutcomeStatus.SUCCEEDED, {"msg": m.msg_id}, None, now, now)
        for m in claimed
    ]
    return await client.settle(QUEUE, "t", outcomes)


def partitions(url: str) -> dict[str, tuple[str, int]]:
    """Partition name: (kind, rows counted)."""
    with psycopg.connect(url, autocommit=True) as conn:
        names = conn.execute("SELECT name, kind FROM tasker.history_partitions()").fetchall()
        return {
            name: (kind, conn.execute(f"SELECT count(*) FROM tasker.{name}").fetchone()[0])  # type: ignore[index]
            for name, kind in names
        }


async def partition_names(url: str) -> set[str]:
    return {r[0] for r in await fetch(url, "SELECT name FROM tasker.history_partitions()")}


def where(url: str, step_uuid: str) -> list[str]:
    """The partitions holding a row of ``step_uuid``."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tableoid::regclass::text FROM tasker.step_results WHERE step_uuid = %s", (step_uuid,)
        ).fetchall()
    return [r[0].removeprefix("tasker.") for r in rows]


def create_day(url: str, day: date, lock_timeout_ms: int = 5000) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT tasker.create_history_partition(%s, %s)", (day, lock_timeout_ms)).fetchone()
    return bool(row and row[0])


def day_name(day: date) -> str:
    return f"step_results_{day:%Y%m%d}"


def test_the_time_of_a_step_uuid(db_url: str) -> None:
    """tasker.uuid_time reads a UUIDv7's milliseconds, as uuid7 wrote them; any other uuid (v4, v5,
    v1, a v7 of the first day of 1970) is 'epoch', the unstamped partition. tasker.uuid_v7 and
    the steps sent from SQL make UUIDv7s."""
    at = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    with psycopg.connect(db_url, autocommit=True) as conn:
        read = conn.execute("SELECT tasker.uuid_time(%s)", (uuid7(at.timestamp()),)).fetchone()
        assert read == (at,)
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        for other in (uuid.uuid4(), uuid.uuid5(uuid.NAMESPACE_URL, "x"), uuid.uuid1(), uuid7(3600.0)):
            assert conn.execute("SELECT tasker.uuid_time(%s)", (other,)).fetchone() == (epoch,), other
        # Exact to the millisecond however far ahead, on a server with uuid_extract_timestamp
        # (0023): 0021's float8 seconds read this one as 00:50:00.009008.
        if conn.info.server_version >= 170000:
            far = uuid.UUID(int=(95_617_587_000_009 << 80) | (7 << 76) | (2 << 62))
            expected = datetime(5000, 1, 1, 0, 50, 0, 9000, tzinfo=UTC)
            assert conn.execute("SELECT tasker.uuid_time(%s)", (far,)).fetchone() == (expected,)
        [(made,)] = conn.execute("SELECT tasker.uuid_v7(%s)", (at,)).fetchall()
        assert made.version == 7 and made.int >> 80 == int(at.timestamp() * 1000)
        sent = conn.execute("SELECT tasker.step_message('hist', 'noop', '{}', NULL, NULL, NULL, NULL, NULL, NULL)")
        assert uuid.UUID(sent.fetchone()[0]["step_uuid"]).version == 7  # type: ignore[index]


def test_a_new_database_has_its_day_partitions_from_the_migration(blank_db_url: str) -> None:
    """`db migrate` creates today's partition and the days the supervisor keeps ahead of it, so a
    new database's first outcomes go to their own day: without them they went to the default
    partition and the first worker's supervisor moved them out under the outcome table's
    exclusive lock while that worker's steps settled."""
    before = datetime.now(UTC).date()
    anyio.run(migrations.migrate, blank_db_url)
    after = datetime.now(UTC).date()
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        days = {r[0] for r in conn.execute("SELECT name FROM tasker.history_partitions() WHERE kind = 'day'")}
    ahead = RetentionConfig().partitions_ahead
    expected = [{day_name(start + timedelta(days=d)) for d in range(ahead + 1)} for start in {before, after}]
    assert days in expected, days


@pytest.mark.anyio
async def test_every_row_of_a_step_goes_to_the_partition_of_its_step_uuid(url: str) -> None:
    """Settled by the worker's statement: a UUIDv7 of today to today's partition, one of a day
    without a partition to the default one (the settle does not fail), any other uuid to the
    unstamped one. A row filed under another time than its step_uuid's is refused."""
    now = datetime.now(UTC)
    assert create_day(url, now.date())
    today, far, random = stamped(now), stamped(now + 40 * DAY), str(uuid.uuid4())
    await send(url, body(today), body(far), body(random))
    async with store(url) as client:
        claimed = await claim(client)
        assert len(await finish(client, claimed)) == 3
    assert where(url, today) == [day_name(now.date())]
    assert where(url, far) == ["step_results_default"]
    assert where(url, random) == ["step_results_unstamped"]
    insert = (
        "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts, worker_id,"
        " finished_at, uuid_time) VALUES (%s, 'hist', 'worker_hist_queue', 1, 'succeeded', 1, 'x', now(), %s)"
    )
    with psycopg.connect(url, autocommit=True) as conn:
        for step, filed in (
            (stamped(now), now.replace(microsecond=0)),  # the right day, the wrong time
            (stamped(now), datetime(1970, 1, 1, tzinfo=UTC)),  # a UUIDv7 filed as unstamped
            (stamped(now + 40 * DAY), now + 41 * DAY),  # the default partition, the wrong time
        ):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute(insert, (step, filed))


@pytest.mark.anyio
async def test_duplicate_delivery_after_a_partition_roll_is_deduplicated(url: str) -> None:
    """A step made yesterday, recorded in yesterday's partition; today's partition is created
    (the roll) and the step is delivered again: the claim finds its outcome (run it not). Two
    copies of another step of yesterday claimed before either is recorded both settle with an
    outcome: one row, in its partition."""
    now = datetime.now(UTC)
    yesterday = now - DAY
    assert create_day(url, yesterday.date())
    step = stamped(yesterday)
    await send(url, body(step))
    async with store(url) as client:
        first = await claim(client)
        assert [m.already_done for m in first] == [False]
        await finish(client, first)
        assert where(url, step) == [day_name(yesterday.date())]
        assert create_day(url, now.date()) and create_day(url, (now + DAY).date())
        await send(url, body(step))
        again = await claim(client)
        assert [m.already_done for m in again] == [True]
        await finish(client, again)
        twin = stamped(yesterday)
        await send(url, body(twin), body(twin))
        both = await claim(client)
        assert [m.already_done for m in both] == [False, False]  # neither recorded yet
        assert len(await finish(client, both)) == 2  # both messages settled...
    assert where(url, step) == [day_name(yesterday.date())]
    assert where(url, twin) == [day_name(yesterday.date())]  # ...one outcome row
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


@pytest.mark.anyio
async def test_a_worker_does_not_run_again_a_step_recorded_before_the_roll(url: str) -> None:
    """End to end: a running worker (its supervisor creating today's partitions) runs a step
    made yesterday once; sent again after the roll, it is settled without running."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(LEDGER_DDL)
    now = datetime.now(UTC)
    assert create_day(url, (now - DAY).date())
    step = body(stamped(now - DAY))
    step["handler"] = "ledger"
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    config = make_config(
        mode="Hybrid",
        namespaces=[NS],
        overrides={"registry.supervision_enabled": True, "retention.interval": "100ms"},
    )
    async with running_worker(url, config, registry=reg, state=types.SimpleNamespace(ledger_url=url)) as worker:
        await send(url, step)
        await wait_until(lambda: fetch_value(url, "SELECT count(*) FROM tasker.step_results"), timeout=20)
        await wait_until(lambda: _has(url, day_name(now.date())), timeout=20)
        await send(url, step)
        await wait_until(lambda: int(worker.status()["counters"].get("dedup_hits", 0)) >= 1, timeout=20)
    assert await fetch(url, "SELECT count(*) FROM public.ledger") == [(1,)]
    assert where(url, step["step_uuid"]) == [day_name((now - DAY).date())]


async def _has(url: str, name: str) -> bool:
    return name in await partition_names(url)


@pytest.mark.anyio
async def test_a_missing_partition_never_fails_a_settle(url: str) -> None:
    """A step stamped 30 days ahead (no partition): its outcome goes to the default partition;
    when its day is created the row moves there, and the step is still recognised."""
    ahead = datetime.now(UTC) + 30 * DAY
    step = stamped(ahead)
    await send(url, body(step))
    async with store(url) as client:
        claimed = await claim(client)
        assert await finish(client, claimed) == {claimed[0].msg_id}
        assert where(url, step) == ["step_results_default"]
        assert create_day(url, ahead.date())
        assert where(url, step) == [day_name(ahead.date())]
        assert not create_day(url, ahead.date())  # there already
        await send(url, body(step))
        assert [m.already_done for m in await claim(client)] == [True]


def _waiting(url: str, application_name: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
            (application_name,),
        ).fetchone()
    return bool(row and row[0])


def test_the_dedup_probe_looks_each_step_up_by_key_in_a_day_that_filled_since_it_was_planned(url: str) -> None:
    """A worker's session keeps the probe's plan (a generic one, covering every partition). It
    must look each step up by its key even in a day that was empty when that plan was made, as
    today's is when created ahead: a plan that reads such a partition whole, kept while the day
    fills, made a claim of 100 cost 35 ms instead of 3 ms over 10,000,000 rows."""
    today = datetime.now(UTC).date()
    create_day(url, today)
    name = day_name(today)
    midnight = datetime.combine(today, datetime.min.time(), UTC)
    with psycopg.connect(url, autocommit=True) as conn:
        # No autoanalyze in between: a fresh plan after it would hide a bad kept one.
        conn.execute(f"ALTER TABLE tasker.{name} SET (autovacuum_enabled = false)")
        conn.execute(f"ANALYZE tasker.{name}")  # its statistics say empty
        probe = "SELECT count(*) FROM tasker.recorded_step_uuids(%s::uuid[])"
        assert conn.execute(probe, ([stamped(midnight)],)).fetchone() == (0,)  # planned now, kept
        conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, attempts,"
            " worker_id, finished_at, uuid_time) SELECT u, %s, %s, g, 'noop', 'succeeded', 1, 't', now(),"
            " tasker.uuid_time(u) FROM (SELECT g, tasker.uuid_v7(%s::timestamptz + g * interval '1 ms') AS u"
            " FROM generate_series(1, 5000) AS g) AS s",
            (NS, QUEUE, midnight),
        )
        wanted = [r[0] for r in conn.execute(f"SELECT step_uuid FROM tasker.{name} LIMIT 10").fetchall()]
        # The session's scan counts not yet reported, read before and after the probe in one
        # transaction (they are reported only between transactions).
        counts = "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables WHERE relid = %s::regclass"
        with conn.transaction():
            before = conn.execute(counts, (f"tasker.{name}",)).fetchone()
            assert conn.execute(probe, ([*wanted, uuid7(midnight.timestamp())],)).fetchone() == (10,)
            after = conn.execute(counts, (f"tasker.{name}",)).fetchone()
    assert before is not None and after is not None
    assert (after[0] - before[0], after[1] - before[1] > 0) == (0, True), (before, after)


def test_creating_a_day_while_outcomes_are_read_and_written(url: str) -> None:
    """The partition of a day is created (a row of that day moving in from the default
    partition) while a claim probes for that row and a settle writes another row of the day.
    Each was planned, or is about to be, with the partitions of before: run after the change,
    the probe would look in the default partition for a row gone from it (the step would run
    again) and the INSERT would be refused by the default partition's new bounds. The creation
    holds the table until it is done: both go after it, planned anew, and go right."""
    day = (datetime.now(UTC) + 20 * DAY).date()
    noon = datetime.combine(day, datetime.min.time(), UTC) + timedelta(hours=12)
    recorded, written = stamped(noon), stamped(noon)
    anyio.run(_record, url, recorded)
    assert where(url, recorded) == ["step_results_default"]
    anyio.run(send, url, body(recorded))
    claim_text = queries.QueueStatements.build(QUEUE, NS, archive=False, store_events=False).claim
    insert = (
        "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts, worker_id,"
        " finished_at, uuid_time) VALUES (%s, 'hist', 'worker_hist_queue', 1, 'succeeded', 1, 'x', now(),"
        " tasker.uuid_time(%s)) ON CONFLICT DO NOTHING"
    )
    errors: list[BaseException] = []
    found: list[Any] = []

    def run(name: str, work: Any) -> threading.Thread:
        def target() -> None:
            try:
                with psycopg.connect(url, autocommit=True, application_name=name) as conn:
                    work(conn)
            except BaseException as exc:  # reported below
                errors.append(exc)

        thread = threading.Thread(target=target, name=name)
        thread.start()
        return thread

    def probe(conn: psycopg.Connection[Any]) -> None:
        found.extend(conn.execute(claim_text, {"qty": 10, "vt": 30, "stamp": "{}", "worker_id": "t"}).fetchall())

    with psycopg.connect(url) as holder:
        # A reader of the default partition: holds the change back at its attach (which locks
        # that partition), after the creation has taken whatever it takes before.
        holder.execute("SELECT count(*) FROM tasker.step_results_default")
        threads = [run("t-create", lambda c: c.execute("SELECT tasker.create_history_partition(%s, 30000)", (day,)))]
        assert anyio.run(wait_until, lambda: _waiting(url, "t-create"), 20)
        threads.append(run("t-probe", probe))
        threads.append(run("t-write", lambda c: c.execute(insert, (written, written))))
        assert anyio.run(wait_until, lambda: _waiting(url, "t-probe") and _waiting(url, "t-write"), 20)
        holder.rollback()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert [row[6] for row in found] == [True]  # the claim found the step recorded
    assert where(url, recorded) == [day_name(day)]
    assert where(url, written) == [day_name(day)]


async def _record(url: str, step_uuid: str) -> None:
    await send(url, body(step_uuid))
    async with store(url) as client:
        await finish(client, await claim(client))


def _fill(conn: psycopg.Connection[Any], rows: int, stamp: str, finished: str, namespace: str = NS) -> None:
    """``rows`` outcome rows, step_uuids made at ``stamp`` (a SQL timestamptz expression, or
    'random' for version 4 uuids), finished at ``finished``."""
    step = "gen_random_uuid()" if stamp == "random" else f"tasker.uuid_v7({stamp})"
    conn.execute(
        "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts, worker_id,"
        " finished_at, uuid_time)"
        f" SELECT u, %s, 'worker_' || %s || '_queue', g, 'succeeded', 1, 'old', {finished}, tasker.uuid_time(u)"
        f" FROM (SELECT g, {step} AS u FROM generate_series(1, %s) AS g) AS s",
        (namespace, namespace, rows),
    )


@pytest.mark.anyio
async def test_retention_drops_whole_days_and_never_one_still_needed(url: str) -> None:
    """With outcomes kept 7 days: a day 12 days old goes whole; one of 11 days whose step waits
    in the queue stays (its outcome row deduplicates it) until the message is gone; one of 10
    days with a row finished an hour ago (a step delayed past its day) stays; the recent days
    and the days ahead stay; rows of random uuids and of the default partition past 7 days are
    deleted one by one, younger ones kept."""
    now = datetime.now(UTC)
    days = {age: (now - age * DAY).date() for age in (12, 11, 10, 3)}
    for d in days.values():
        assert create_day(url, d)
    for ahead in range(1, 4):
        assert create_day(url, (now + ahead * DAY).date())
    with psycopg.connect(url, autocommit=True) as conn:
        for age in (12, 11, 10, 3):
            noon = f"timestamptz '{days[age].isoformat()} 12:00+00'"
            _fill(conn, 500, noon, f"{noon} + interval '1 minute'")
        _fill(conn, 1, f"timestamptz '{days[10].isoformat()} 12:00+00'", "now() - interval '1 hour'")
        _fill(conn, 300, "random", "now() - interval '8 days'")
        _fill(conn, 20, "random", "now() - interval '1 day'")
        _fill(conn, 40, "now() - interval '60 days'", "now() - interval '8 days'")  # no day: default
        conn.execute("ANALYZE tasker.step_results")
    waiting = stamped(datetime.combine(days[11], datetime.min.time(), UTC) + timedelta(hours=13))
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, status, attempts,"
            " worker_id, finished_at, uuid_time) VALUES (%s, 'hist', 'worker_hist_queue', 1, 'succeeded', 1,"
            " 'old', now() - interval '11 days', tasker.uuid_time(%s))",
            (waiting, waiting),
        )
    await send(url, body(waiting))  # a second copy, delayed or retried: still in the queue
    config = RetentionConfig(batch_size=100)
    pool = await open_pool(url, DatabaseConfig(), max_size=2)
    try:
        removed = await retention.prune_outcomes(pool, config, now)
        left = partitions(url)
        assert day_name(days[12]) not in left
        assert left[day_name(days[11])] == ("day", 501)
        assert left[day_name(days[10])] == ("day", 501)
        assert left[day_name(days[3])] == ("day", 500)
        assert all(day_name((now + a * DAY).date()) in left for a in range(1, 4))
        assert left["step_results_unstamped"] == ("unstamped", 20)
        assert left["step_results_default"] == ("default", 0)
        assert removed == 500 + 300 + 40
        async with store(url) as client:
            claimed = await claim(client)
            assert [m.already_done for m in claimed] == [True]  # its row was kept for this
            await finish(client, claimed)
        await retention.prune_outcomes(pool, config, now)
        assert day_name(days[11]) not in partitions(url)
        assert day_name(days[10]) in partitions(url)
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_a_namespace_kept_longer_holds_the_day_and_the_others_rows_go_one_by_one(url: str) -> None:
    """[retention.namespaces.audit] outcomes = 30 days: a day 12 days old stays for audit's
    sake; the rows of the other namespaces in it, past their 7 days, are deleted."""
    now = datetime.now(UTC)
    day = (now - 12 * DAY).date()
    assert create_day(url, day)
    noon = f"timestamptz '{day.isoformat()} 12:00+00'"
    with psycopg.connect(url, autocommit=True) as conn:
        _fill(conn, 200, noon, noon)
        _fill(conn, 30, noon, noon, namespace="audit")
    config = RetentionConfig(namespaces={"audit": {"outcomes": "30d"}})
    pool = await open_pool(url, DatabaseConfig(), max_size=2)
    try:
        assert await retention.prune_outcomes(pool, config, now) == 200
    finally:
        await pool.close()
    assert partitions(url)[day_name(day)] == ("day", 30)
    assert await fetch(url, "SELECT DISTINCT namespace FROM tasker.step_results") == [("audit",)]


def test_migrating_a_populated_table_online(blank_db_url: str) -> None:
    """A database at 0019 with 4,000 outcome rows (version 4 uuids, and UUIDv7s as tasker-core
    makes them) is migrated: the online preparation validates its CHECK while a writer holds
    an INSERT open (not blocked by it), the migration attaches the table without reading it,
    every row is still there and still deduplicates its step, and a settle written for the old
    table fails instead of writing a second row."""
    before = max(m.version for m in migrations.discover() if m.version < "0021")
    anyio.run(migrations.migrate, blank_db_url, before)
    made = datetime.now(UTC) - 2 * DAY
    legacy_v7 = [str(uuid7(made.timestamp() + i)) for i in range(2000)]
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
        conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, attempts,"
            " worker_id, finished_at) SELECT u::uuid, %s, %s, 1, 'noop', 'succeeded', 1, 'old', now()"
            " FROM unnest(%s::text[] || ARRAY(SELECT gen_random_uuid()::text FROM generate_series(1, 2000))) AS u",
            (NS, QUEUE, legacy_v7),
        )
        conn.execute("ALTER TABLE tasker.step_results SET (autovacuum_enabled = false)")
        row = conn.execute(
            "SELECT step_uuid::text FROM tasker.step_results WHERE step_uuid <> ALL(%s::uuid[]) LIMIT 1", (legacy_v7,)
        ).fetchone()
        assert row is not None
        legacy_v4 = row[0]
        # The preparation's catalog changes (a moment of exclusive lock) ...
        for statement in queries.HISTORY_PREPARE[:2]:
            conn.execute(statement)
    with psycopg.connect(blank_db_url) as writer:
        # ... then live traffic: an outcome INSERT of the previous version, left open while the
        # preparation runs again (its catalog changes found made: no lock) and validates the CHECK.
        writer.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status, attempts,"
            " worker_id, finished_at) VALUES (gen_random_uuid(), %s, %s, 2, 'noop', 'succeeded', 1, 'live', now())"
            " ON CONFLICT (step_uuid) DO NOTHING",
            (NS, QUEUE),
        )
        prepare = anyio.run(_prepare, blank_db_url)
        writer.commit()
    assert prepare == "validated"
    scans = _seq_scans(blank_db_url)
    applied = anyio.run(migrations.migrate, blank_db_url)
    assert applied[0] == "0021_partitioned_history"  # and those after it
    assert _seq_scans(blank_db_url) == scans  # the table was attached, not read, under the lock
    assert partitions(blank_db_url)["step_results_unstamped"] == ("unstamped", 4001)

    async def resend_and_claim() -> list[bool]:
        await send(blank_db_url, body(legacy_v4), body(legacy_v7[0]), body(legacy_v7[-1]), body())
        async with store(blank_db_url) as client:
            return [m.already_done for m in await claim(client)]

    assert anyio.run(resend_and_claim) == [True, True, True, False]
    with psycopg.connect(blank_db_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InvalidColumnReference):
            conn.execute(
                "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status,"
                " attempts, worker_id, finished_at) VALUES (%s, %s, %s, 3, 'noop', 'succeeded', 1, 'stale', now())"
                " ON CONFLICT (step_uuid) DO NOTHING",
                (legacy_v7[1], NS, QUEUE),
            )
        assert conn.execute(
            "SELECT count(*) FROM tasker.step_results WHERE step_uuid = %s", (legacy_v7[1],)
        ).fetchone() == (1,)


async def _prepare(url: str) -> str:
    """Run 0021's online preparation as ``migrate`` does (each statement its own transaction)."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await migrations._prepare_online(conn, None)
        cur = await conn.execute(
            "SELECT convalidated FROM pg_constraint WHERE conname = 'step_results_unstamped_epoch'"
        )
        row = await cur.fetchone()
    return "validated" if row and row[0] else "not validated"


def _seq_scans(url: str) -> int:
    """Sequential scans of the outcome table of before 0021 (by its oid: it is renamed), once
    every other session is gone (a backend reports its counts when it exits)."""

    async def alone() -> bool:
        got = await fetch_value(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND backend_type = 'client backend'",
        )
        return int(got) == 0

    anyio.run(wait_until, alone, 20)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = (SELECT oid FROM pg_class"
            " WHERE relname IN ('step_results', 'step_results_unstamped') AND relkind = 'r')"
        ).fetchone()
    return int(row[0]) if row else -1
