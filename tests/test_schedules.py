"""Periodic work: interval and cron ticks, and schedules run once per fleet — against a real
PostgreSQL with two workers, one of them leaving mid-way."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tasker_worker.domain.schedules import Cadence, tick_handler, tick_step_uuid
from tasker_worker.errors import UsageError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, make_config, running_worker, wait_until

NS = "sched"


def test_ticks_are_the_same_instants_for_every_worker() -> None:
    at = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
    every = Cadence(every=timedelta(minutes=5))
    assert every.next_tick(at) == datetime(2026, 3, 4, 5, 10, tzinfo=UTC)
    assert every.last_tick(at) == datetime(2026, 3, 4, 5, 5, tzinfo=UTC)
    assert every.next_tick(datetime(2026, 3, 4, 5, 10, tzinfo=UTC)) == datetime(2026, 3, 4, 5, 15, tzinfo=UTC)
    cron = Cadence(cron="30 2 * * 1")  # Mondays 02:30 UTC
    assert cron.next_tick(at) == datetime(2026, 3, 9, 2, 30, tzinfo=UTC)
    assert cron.last_tick(at) == datetime(2026, 3, 2, 2, 30, tzinfo=UTC)
    assert cron.last_tick(datetime(2026, 3, 2, 2, 30, tzinfo=UTC)) == datetime(2026, 3, 2, 2, 30, tzinfo=UTC)
    assert tick_step_uuid("report", at) == tick_step_uuid("report", at.astimezone())
    assert tick_step_uuid("report", at) != tick_step_uuid("other", at)
    for bad in ({}, {"every": timedelta(seconds=1), "cron": "* * * * *"}, {"cron": "61 * * * *"}):
        with pytest.raises(UsageError):
            Cadence(**bad)


def fleet_registry(runs: list[tuple[str, str]], worker: list[str]) -> HandlerRegistry:
    reg = HandlerRegistry()

    @reg.periodic(every="1s", name="tally", fleet_once=True, catch_up=False)
    async def tally(ctx: Any) -> str:
        runs.append((ctx.tick, ctx.worker_id))
        worker.append(ctx.worker_id)
        return ctx.tick

    return reg


@pytest.mark.anyio
async def test_a_fleet_once_schedule_runs_each_tick_once_while_workers_come_and_go(url: str) -> None:
    runs: list[tuple[str, str]] = []
    seen: list[str] = []
    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config, registry=fleet_registry(runs, seen)):
        async with running_worker(url, config, registry=fleet_registry(runs, seen)):
            await wait_until(lambda: len(runs) >= 3, timeout=30)
        # One of the two left: the other keeps every tick going, none twice.
        after = len(runs)
        await wait_until(lambda: len(runs) >= after + 2, timeout=30)
    ticks = [tick for tick, _ in runs]
    assert len(ticks) == len(set(ticks)), ticks
    rows = await fetch(
        url, "SELECT step_uuid, result FROM tasker.step_results WHERE handler = %s", (tick_handler("tally"),)
    )
    assert sorted(str(r[1]) for r in rows) == sorted(ticks)
    assert all(r[0] == tick_step_uuid("tally", datetime.fromisoformat(str(r[1]))) for r in rows)


@pytest.mark.parametrize("catch_up", [True, False])
@pytest.mark.anyio
async def test_a_tick_missed_while_the_fleet_was_down_runs_once_on_return(url: str, catch_up: bool) -> None:
    runs: list[str] = []

    def yearly() -> HandlerRegistry:
        reg = HandlerRegistry()

        @reg.periodic(cron="0 0 1 1 *", name="new_year", fleet_once=True, catch_up=catch_up)
        def new_year(ctx: Any) -> None:
            runs.append(ctx.tick)

        return reg

    config = make_config(mode="Hybrid", namespaces=[NS])
    for _ in range(2):  # the fleet comes back twice: the missed tick still runs once
        async with running_worker(url, config, registry=yearly()) as worker:
            if catch_up:
                await wait_until(lambda: runs, timeout=30)
            assert worker.processor is not None
    last = Cadence(cron="0 0 1 1 *").last_tick(datetime.now(UTC))
    assert runs == ([last.isoformat()] if catch_up else [])
    keys = await fetch(
        url, "SELECT count(*) FROM tasker.step_keys WHERE step_uuid = %s", (tick_step_uuid("new_year", last),)
    )
    assert keys == [(1 if catch_up else 0,)]
    assert uuid.UUID(str(tick_step_uuid("new_year", last)))  # a real UUID
