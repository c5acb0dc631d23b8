"""What the worker reports is what happened: claim sources, lapsed claims, statistics at exit,
listener health, the mode on every log line, the metrics — against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from logcapture import json_logs, lines
from proxy import Cut, DatabaseProxy

from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import (
    fetch,
    fetch_value,
    make_config,
    outcomes_at_least,
    running_worker,
    send_steps,
    wait_until,
)

NS = "obs"


@pytest.fixture
def url(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return db_url


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    with json_logs() as buffer:
        yield buffer


@pytest.mark.anyio
async def test_claims_after_a_switch_to_polling_only_are_polls_and_lines_say_the_new_mode(
    url: str, captured: io.StringIO
) -> None:
    """A backlog loop woken by a notification used to label every later claim ``event``, and
    the processor's lines kept the mode of the start."""
    gate = asyncio.Event()
    started = asyncio.Event()
    reg = HandlerRegistry()

    @reg.handler("gated", timeout="60s")
    async def gated(ctx: Any, step: Any) -> None:
        started.set()
        await gate.wait()

    @reg.handler("explodes")
    async def explodes(ctx: Any, step: Any) -> None:
        raise KeyError("boom")

    config = make_config(
        mode="Hybrid", namespaces=[NS], concurrency=1, overrides={"retry.base_delay": "10ms", "retry.max_attempts": 2}
    )
    async with running_worker(url, config, registry=reg) as worker:
        # The claim at start has looked (and found nothing): the steps are woken by NOTIFY.
        await wait_until(lambda: worker.stats.counters["claims_poll"] >= 1, timeout=20)
        await send_steps(url, NS, "gated", [{} for _ in range(6)], batch=True)  # one notification
        await asyncio.wait_for(started.wait(), 20)
        assert await worker.set_mode("PollingOnly")
        assert worker.event_system is not None and worker.event_system.mode is DeploymentMode.POLLING_ONLY
        switched_at = await fetch_value(url, "SELECT clock_timestamp()")
        gate.set()
        await wait_until(outcomes_at_least(url, 6), timeout=30)
        [explode] = await send_steps(url, NS, "explodes", [{}])
        await wait_until(outcomes_at_least(url, 7), timeout=30)
    after = await fetch(
        url, "SELECT source, count(*) FROM tasker.step_results WHERE claimed_at > %s GROUP BY source", (switched_at,)
    )
    assert dict(after) == {"poll": 6}  # five gated steps and the failing one
    assert (
        await fetch_value(url, "SELECT source FROM tasker.step_results WHERE claimed_at < %s", (switched_at,))
        == "event"
    )
    retry = next(
        r for r in lines(captured) if "retrying" in r["message"] and r.get("step_uuid") == explode["step_uuid"]
    )
    assert retry["deployment_mode"] == "PollingOnly"
    assert retry["worker_id"] == worker.worker_id and retry["system_id"] == config.event_system.system_id


@pytest.mark.anyio
async def test_the_first_heartbeat_reports_a_listening_worker_as_listening(url: str) -> None:
    overrides = {"registry.heartbeat_interval": "60s", "event_system.system_id": "orders-events"}
    config = make_config(mode="Hybrid", namespaces=[NS], overrides=overrides)
    async with running_worker(url, config) as worker:
        await wait_until(lambda: worker.presence is not None and worker.presence.heartbeats_sent >= 1, timeout=20)
        stored = await fetch_value(
            url, "SELECT stats -> 'event_system' FROM tasker.workers WHERE worker_id = %s", (worker.worker_id,)
        )
    assert stored["listener"]["healthy"] is True, stored
    assert stored["system_id"] == "orders-events"  # the registry names the event system


@pytest.mark.anyio
async def test_processing_timeout_bounds_a_claim_not_a_handler(url: str) -> None:
    """tasker-core's ``processing_timeout = "100ms"`` once became the handler timeout here and
    killed every handler slower than that. It bounds the processing of one command: a claim."""
    reg = HandlerRegistry()

    @reg.handler("slowish")
    async def slowish(ctx: Any, step: Any) -> str:
        await asyncio.sleep(0.3)
        return "done"

    overrides = {
        "event_system.processing_timeout": "100ms",
        "event_system.fallback_poller.polling_interval": "100ms",
        "event_system.fallback_poller.visibility_timeout": "1s",
    }
    async with DatabaseProxy(url) as proxy:
        config = make_config(mode="PollingOnly", namespaces=[NS], overrides=overrides)
        async with running_worker(proxy.url_through, config, registry=reg) as worker:
            [body] = await send_steps(url, NS, "slowish", [{}])
            await wait_until(outcomes_at_least(url, 1), timeout=20)
            # Behind a dead network path a claim gets no answer: it is given up after 100 ms,
            # counted, and claiming goes on once the path is back.
            proxy.cut(Cut.UNREACHABLE)
            await send_steps(url, NS, "slowish", [{}])
            await wait_until(lambda: worker.stats.counters["claims_timed_out"] >= 1, timeout=20)
            proxy.cut(Cut.PASS)
            await wait_until(outcomes_at_least(url, 2), timeout=30)
    rows = await fetch(url, "SELECT status, result FROM tasker.step_results ORDER BY finished_at")
    assert rows == [("succeeded", "done"), ("succeeded", "done")]
    assert (
        await fetch_value(url, "SELECT count(*) FROM tasker.step_results WHERE step_uuid = %s", (body["step_uuid"],))
        == 1
    )
