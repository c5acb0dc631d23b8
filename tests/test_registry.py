"""The worker registry against a real PostgreSQL: lifecycle under a controllable clock,
conflicts, heartbeat history, the event log and its replay, and the running worker's presence."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from tasker_worker.config.models import DatabaseConfig, EventsConfig, RegistryConfig
from tasker_worker.db.connection import open_pool
from tasker_worker.domain.clock import ManualClock
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerStatus
from tasker_worker.errors import HeartbeatFailed, InvalidTransition, WorkerConflict, WorkerNotFound
from tasker_worker.fleet import eventlog
from tasker_worker.fleet.lifecycle import WorkerLifecycle
from tasker_worker.fleet.supervision import SupervisionJobs
from tasker_worker.fleet.views import FleetViews

pytestmark = pytest.mark.anyio

STALE = timedelta(minutes=2)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[AsyncConnectionPool]:
    p = await open_pool(db_url, DatabaseConfig(), max_size=4)
    try:
        yield p
    finally:
        await p.close()


def registration(worker_id: str | None = "w1", **extra: Any) -> WorkerRegistration:
    data: dict[str, Any] = {
        "worker_id": worker_id,
        "name": "planner",
        "hostname": "host-a",
        "pid": 4242,
        "namespaces": ["planning"],
        "capabilities": ["handler:path_plan", "planning:astar"],
        "version": "0.1.0",
        "deployment_mode": "Hybrid",
        "cpu_cores": 8,
        "memory_total": 16 * 2**30,
    }
    data.update(extra)
    return WorkerRegistration(**data)


def setup(pool: AsyncConnectionPool, clock: ManualClock, **registry: Any) -> tuple[WorkerLifecycle, SupervisionJobs]:
    config = RegistryConfig(stale_timeout=STALE, **registry)
    commands = WorkerLifecycle(pool, clock, heartbeat_history=config.heartbeat_history)
    return commands, SupervisionJobs(commands, config, EventsConfig())


async def status_of(pool: AsyncConnectionPool, worker_id: str) -> WorkerStatus:
    return (await FleetViews(pool).get(worker_id)).status


async def event_types(pool: AsyncConnectionPool, worker_id: str) -> list[str]:
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_type FROM tasker.events WHERE worker_id = %s AND step_uuid IS NULL ORDER BY event_id",
            (worker_id,),
        )
        return [r[0] for r in await cur.fetchall()]


async def test_lifecycle_driven_by_a_manual_clock(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, jobs = setup(pool, clock)
    worker_id = await commands.register(registration())
    assert worker_id == "w1" and await status_of(pool, "w1") is WorkerStatus.PENDING

    assert await jobs.activate_pending() == 0  # no heartbeat yet: stays pending
    clock.advance(5)
    await commands.heartbeat("w1", Heartbeat(cpu_percent=12.5, memory_used=100, active_steps=2, processed=7))
    assert await jobs.activate_pending() == 1
    assert await status_of(pool, "w1") is WorkerStatus.ACTIVE

    clock.advance(STALE - timedelta(seconds=1))
    assert await jobs.mark_stale_offline() == 0  # one second short of stale
    clock.advance(2)
    assert await jobs.mark_stale_offline() == 1
    assert await status_of(pool, "w1") is WorkerStatus.OFFLINE
    assert await jobs.reactivate_offline() == 0  # no heartbeat since going offline

    clock.advance(1)
    await commands.heartbeat("w1", Heartbeat(active_steps=0, processed=9))
    assert await jobs.reactivate_offline() == 1
    view = await FleetViews(pool).get("w1")
    assert view.status is WorkerStatus.ACTIVE and view.processed == 9

    await commands.deregister("w1", "SIGTERM")
    view = await FleetViews(pool).get("w1")
    assert view.status is WorkerStatus.DEREGISTERED and view.deregister_reason == "SIGTERM"
    assert await event_types(pool, "w1") == [
        "WorkerRegistered",
        "WorkerReady",
        "WorkerOffline",
        "WorkerReady",
        "WorkerDeregistered",
    ]


async def test_pending_worker_that_never_heartbeats_goes_offline(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, jobs = setup(pool, clock)
    await commands.register(registration())
    clock.advance(STALE + timedelta(seconds=1))
    assert await jobs.mark_stale_offline() == 1
    assert await status_of(pool, "w1") is WorkerStatus.OFFLINE


async def test_invalid_transitions_are_refused_with_a_typed_error(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, _ = setup(pool, clock)
    await commands.register(registration())
    await commands.transition("w1", WorkerStatus.ACTIVE)
    with pytest.raises(InvalidTransition) as info:
        await commands.transition("w1", WorkerStatus.ACTIVE)  # active -> active
    assert "cannot go from active to active" in str(info.value)
    await commands.deregister("w1", "done")
    for target in (WorkerStatus.ACTIVE, WorkerStatus.OFFLINE, WorkerStatus.DEREGISTERED):
        with pytest.raises(InvalidTransition, match="none \\(final\\)"):
            await commands.transition("w1", target)
    with pytest.raises(HeartbeatFailed, match="refused: the worker is deregistered"):
        await commands.heartbeat("w1", Heartbeat())
    with pytest.raises(WorkerNotFound):
        await commands.heartbeat("nobody", Heartbeat())
    with pytest.raises(WorkerNotFound):
        await commands.deregister("nobody", "x")
    # Nothing of the refused moves reached the log.
    assert await event_types(pool, "w1") == ["WorkerRegistered", "WorkerReady", "WorkerDeregistered"]


async def test_id_held_by_a_live_worker_is_renamed_or_refused(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, jobs = setup(pool, clock)
    assert await commands.register(registration("dup")) == "dup"
    renamed = await commands.register(registration("dup", pid=5))
    assert renamed != "dup" and renamed.startswith("dup-")
    with pytest.raises(WorkerConflict, match="held by a live worker"):
        await commands.register(registration("dup"), on_conflict="error")
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT data->>'requested_id' FROM tasker.events WHERE worker_id = %s AND event_type = 'WorkerRegistered'",
            (renamed,),
        )
        assert (await cur.fetchone()) == ("dup",)
    # Once its holder is gone (offline), the id can be taken over; it starts again as pending.
    clock.advance(STALE + timedelta(seconds=1))
    await jobs.mark_stale_offline()
    assert await commands.register(registration("dup", pid=6), on_conflict="error") == "dup"
    view = await FleetViews(pool).get("dup")
    assert view.status is WorkerStatus.PENDING and view.pid == 6


async def test_concurrent_registrations_of_one_id_get_distinct_ids(pool: AsyncConnectionPool) -> None:
    commands, _ = setup(pool, ManualClock())
    ids: list[str] = []

    async def one(i: int) -> None:
        ids.append(await commands.register(registration("same", pid=i)))

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(one, i)
    assert len(set(ids)) == 4 and "same" in ids


async def test_heartbeat_history_is_bounded(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, _ = setup(pool, clock, heartbeat_history=3)
    await commands.register(registration())
    for i in range(10):
        clock.advance(1)
        await commands.heartbeat("w1", Heartbeat(processed=i))
    beats = await FleetViews(pool).heartbeats("w1", limit=100)
    assert [b["processed"] for b in beats] == [9, 8, 7]


async def test_busy_changes_are_logged_once_per_change(pool: AsyncConnectionPool) -> None:
    commands, _ = setup(pool, ManualClock())
    await commands.register(registration())
    for busy in (False, True, True, False, False, True):
        await commands.heartbeat("w1", Heartbeat(busy=busy))
    assert (await event_types(pool, "w1")).count("WorkerBusy") == 3
    assert (await FleetViews(pool).get("w1")).busy is True


async def random_operations(pool: AsyncConnectionPool, clock: ManualClock, rng: random.Random, steps: int) -> list[str]:
    """A random mix of registry commands and supervision sweeps (failures allowed)."""
    commands, jobs = setup(pool, clock)
    ids: list[str] = []
    for _ in range(steps):
        op = rng.choice(["register", "register_dup", "heartbeat", "heartbeat", "deregister", "sweep", "advance"])
        try:
            if op == "register" or (op == "register_dup" and not ids):
                ids.append(await commands.register(registration(f"w{len(ids)}", pid=rng.randrange(1000))))
            elif op == "register_dup":
                ids.append(await commands.register(registration(rng.choice(ids), endpoint="http://x")))
            elif op == "heartbeat" and ids:
                await commands.heartbeat(
                    rng.choice(ids), Heartbeat(busy=rng.random() < 0.3, processed=rng.randrange(99))
                )
            elif op == "deregister" and ids:
                await commands.deregister(rng.choice(ids), rng.choice(["SIGTERM", "SIGINT", "requested"]))
            elif op == "sweep":
                await jobs.activate_pending()
                await jobs.mark_stale_offline()
                await jobs.reactivate_offline()
            elif op == "advance":
                clock.advance(rng.choice([1, 30, 90, 200]))
        except (InvalidTransition, HeartbeatFailed, WorkerNotFound):
            pass  # refused moves are part of the test: they must leave no event behind
    return ids


async def test_replay_equals_live_state_after_random_operations(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    seen: set[str] = set()
    for seed in range(3):  # three rounds on the same tables: ids are reused and taken over
        ids = await random_operations(pool, clock, random.Random(seed), 150)
        assert ids
        seen.update(ids)
        report = await eventlog.replay_and_compare(pool)
        assert report.consistent, report.differences[:5]
        assert set(report.workers) == seen
        again = await eventlog.replay_and_compare(pool)
        assert again.workers == report.workers  # replaying twice gives the same state


async def test_compaction_keeps_replay_exact_and_bounds_the_log(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    rng = random.Random(7)
    await random_operations(pool, clock, rng, 120)
    async with pool.connection() as conn:
        # Events carry the manual clock's time; compact everything up to now.
        cur = await conn.execute("SELECT count(*) FROM tasker.events")
        before = (await cur.fetchone())[0]
    before_report = await eventlog.replay_and_compare(pool)
    deleted = await eventlog.compact(pool, clock.now() + timedelta(seconds=1))
    assert deleted == before > 0
    after = await eventlog.replay_and_compare(pool)
    assert after.consistent and after.workers == before_report.workers and after.events_applied == 0
    # More activity on top of the snapshot, then a second compaction, still exact.
    clock.advance(10)
    await random_operations(pool, clock, rng, 80)
    assert (await eventlog.replay_and_compare(pool)).consistent
    await eventlog.compact(pool, clock.now() + timedelta(seconds=1))
    final = await eventlog.replay_and_compare(pool)
    assert final.consistent, final.differences[:5]
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM tasker.event_snapshots")
        assert (await cur.fetchone())[0] == 1  # older snapshots are dropped


async def test_replay_reports_a_live_table_edited_behind_the_log(pool: AsyncConnectionPool) -> None:
    commands, _ = setup(pool, ManualClock())
    await commands.register(registration())
    async with pool.connection() as conn:
        await conn.execute("UPDATE tasker.workers SET status = 'active' WHERE worker_id = 'w1'")
    report = await eventlog.replay_and_compare(pool)
    assert not report.consistent
    assert report.differences == [{"worker_id": "w1", "field": "status", "replayed": "pending", "live": "active"}]


async def test_fleet_stats(pool: AsyncConnectionPool) -> None:
    clock = ManualClock()
    commands, jobs = setup(pool, clock)
    for i in range(3):
        await commands.register(registration(f"w{i}"))
    await commands.heartbeat("w0", Heartbeat(active_steps=4))
    await jobs.activate_pending()
    await commands.deregister("w2", "done")
    stats = await FleetViews(pool).stats()
    assert stats["by_status"] == {"pending": 1, "active": 1, "offline": 0, "deregistered": 1}
    assert stats["live_cpu_cores"] == 16 and stats["active_steps"] == 4
    healthy = await FleetViews(pool).healthy(clock.now(), STALE)
    assert [w.worker_id for w in healthy] == ["w0"]


@pytest.mark.parametrize("step_events", ["derived", "stored"])
async def test_step_events_follow_the_step(db_url: str, pool: AsyncConnectionPool, step_events: str) -> None:
    """A claim, a failed attempt and the final outcome each leave their event in tasker.event_log,
    whether the events are rows (stored) or read from the outcome row (derived: then the only
    row is the failed attempt's, which has no outcome row)."""
    from tasker_worker.handlers.registry import HandlerRegistry
    from tasker_worker.testing import make_config, running_worker, send_steps, wait_until

    calls = {"n": 0}

    def flaky(ctx: Any, step: Any) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("first attempt fails")
        return {"ok": 1}

    reg = HandlerRegistry()
    reg.register("flaky", flaky)
    overrides = {"retry.base_delay": "10ms", "retry.jitter": 0.0, "events.step_events": step_events}
    config = make_config(namespaces=["ev"], overrides=overrides)
    async with running_worker(db_url, config, registry=reg) as worker:
        [body] = await send_steps(db_url, "ev", "flaky", [{}])

        async def done() -> bool:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT count(*) FROM tasker.step_results")
                return (await cur.fetchone())[0] == 1

        await wait_until(done, timeout=20)
        worker_id = worker.worker_id
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT event_type, worker_id, data, derived FROM tasker.event_log WHERE step_uuid = %s"
            " ORDER BY occurred_at, event_id",
            (body["step_uuid"],),
        )
        rows = await cur.fetchall()
        cur = await conn.execute("SELECT event_type FROM tasker.events WHERE step_uuid = %s", (body["step_uuid"],))
        stored = sorted(r[0] for r in await cur.fetchall())
    assert [r[0] for r in rows] == [
        "StepAssigned",
        "StepFailed",
        "StepAssigned",
        "StepAssignmentAccepted",
        "StepCompleted",
    ]
    assert {r[1] for r in rows} == {worker_id}
    assert rows[1][2]["final"] is False and rows[1][2]["attempt"] == 1
    assert [r[2]["read_ct"] for r in rows if r[0] == "StepAssigned"] == [1, 2]
    assert rows[4][2] == {"attempts": 2, "final": True, "source": "poll"}
    if step_events == "stored":
        assert not any(r[3] for r in rows)
        assert stored == sorted(r[0] for r in rows)
    else:
        assert [r[3] for r in rows] == [True, False, True, True, True]
        assert stored == ["StepFailed"]
    lifecycle = await event_types(pool, worker_id)
    assert lifecycle[0] == "WorkerRegistered" and lifecycle[-1] == "WorkerDeregistered"


async def test_derived_step_events_write_no_row(db_url: str, pool: AsyncConnectionPool) -> None:
    """With step events derived (the default; the booleans of earlier versions read so too), a
    step that succeeds writes its outcome row and no event row, and the view still shows its
    three events."""
    from tasker_worker.testing import make_config, outcome_counter, running_worker, send_steps, wait_until

    config = make_config(namespaces=["quiet"], overrides={"events.step_events": False})
    assert config.events.step_events == "derived"
    async with running_worker(db_url, config):
        await send_steps(db_url, "quiet", "noop", [{} for _ in range(5)])
        count = outcome_counter(db_url, "succeeded")

        async def all_done() -> bool:
            return await count() == 5

        await wait_until(all_done, timeout=20)
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM tasker.events WHERE step_uuid IS NOT NULL")
        assert (await cur.fetchone())[0] == 0
        cur = await conn.execute(
            "SELECT event_type, count(*) FROM tasker.event_log WHERE step_uuid IS NOT NULL GROUP BY 1 ORDER BY 1"
        )
        assert await cur.fetchall() == [("StepAssigned", 5), ("StepAssignmentAccepted", 5), ("StepCompleted", 5)]
        cur = await conn.execute("SELECT count(*) FROM tasker.events WHERE event_type = 'WorkerRegistered'")
        assert (await cur.fetchone())[0] == 1  # worker events are always rows


async def test_running_worker_registers_heartbeats_is_supervised_and_deregisters(
    db_url: str, pool: AsyncConnectionPool
) -> None:
    from tasker_worker.testing import make_config, running_worker, wait_until

    config = make_config(namespaces=["reg"], overrides={"worker.id": "fixed-id"})
    queries = FleetViews(pool)
    async with running_worker(db_url, config) as worker:
        assert worker.worker_id == "fixed-id"

        async def active() -> bool:
            view = await queries.get("fixed-id")
            return view.status is WorkerStatus.ACTIVE and view.last_heartbeat_at is not None

        # The worker is its own supervision leader here (test intervals are sub-second).
        await wait_until(active, timeout=15)
        view = await queries.get("fixed-id")
        assert view.namespaces == ["reg"] and "handler:noop" in view.capabilities
        assert view.cpu_cores >= 1 and view.memory_total > 0 and view.memory_used and view.memory_used > 0
        assert "counters" in view.stats
        # A second worker asking for the same id while this one lives gets another one.
        async with running_worker(db_url, make_config(namespaces=["reg"], overrides={"worker.id": "fixed-id"})) as two:
            assert two.worker_id != "fixed-id" and two.worker_id.startswith("fixed-id-")
    view = await queries.get("fixed-id")
    assert view.status is WorkerStatus.DEREGISTERED and view.deregister_reason == "test finished"
    assert (await eventlog.replay_and_compare(pool)).consistent


async def test_capable_worker_lookup_uses_the_registry(db_url: str, pool: AsyncConnectionPool) -> None:
    from tasker_worker.db.queue_client import QueueClient

    clock_commands = WorkerLifecycle(pool)
    await clock_commands.register(registration("other", capabilities=["planning:theta"]))
    client = QueueClient(pool)
    assert await client.capable_worker_exists("planning:theta", 60, "me")
    assert not await client.capable_worker_exists("planning:theta", 60, "other")
    await clock_commands.deregister("other", "gone")
    assert not await client.capable_worker_exists("planning:theta", 60, "me")


def test_registry_tables_reject_a_bad_status(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(psycopg.errors.CheckViolation):
        conn.execute(
            "INSERT INTO tasker.workers (worker_id, name, hostname, pid, version, deployment_mode, cpu_cores,"
            " memory_total, status, registered_at, status_changed_at)"
            " VALUES ('x', 'n', 'h', 1, 'v', 'Hybrid', 1, 1, 'sleeping', now(), now())"
        )
