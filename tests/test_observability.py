"""What the worker reports is what happened: claim sources, lapsed claims, statistics at exit,
listener health, the mode on every log line, the metrics — against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import yaml
from logcapture import json_logs, lines
from prometheus_client.parser import text_string_to_metric_families
from proxy import Cut, DatabaseProxy

from tasker_worker.api.app import ApiContext, create_app
from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.modes import DeploymentMode
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.steps import Source
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

    # No prefetch: each step is claimed when the slot frees, so the later ones after the switch.
    config = make_config(
        mode="Hybrid",
        namespaces=[NS],
        concurrency=1,
        overrides={"retry.base_delay": "10ms", "retry.max_attempts": 2, "worker.prefetch": 0},
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


MONITORING = Path(__file__).resolve().parent.parent / "docs" / "monitoring"


def monitoring_metric_names() -> set[str]:
    """Every metric the shipped dashboard and alert rules query."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {name for expr in exprs for name in re.findall(r"\btasker_[a-z0-9_]+", expr)}


@pytest.mark.anyio
async def test_metrics_follow_prometheus_conventions_and_back_the_dashboard_and_alerts(url: str) -> None:
    reg = HandlerRegistry()

    @reg.handler("ok")
    async def ok(ctx: Any, step: Any) -> str:
        return "fine"

    @reg.handler("explodes")
    async def explodes(ctx: Any, step: Any) -> None:
        raise KeyError("boom")

    overrides = {"retry.max_attempts": 1, "registry.heartbeat_interval": "60s"}
    config = make_config(mode="Hybrid", namespaces=[NS], overrides=overrides)
    async with running_worker(url, config, registry=reg) as worker:
        await send_steps(url, NS, "ok", [{} for _ in range(3)])
        await send_steps(url, NS, "explodes", [{}])
        await wait_until(outcomes_at_least(url, 4), timeout=30)
        await wait_until(lambda: worker.presence is not None and worker.presence.heartbeats_sent >= 1, timeout=20)
        pool = await open_pool(url, config.database, max_size=2)
        try:
            transport = httpx.ASGITransport(app=create_app(ApiContext.for_worker(pool, config, worker)))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as api:
                text = (await api.get("/metrics")).text
                shown = (await api.get(f"/api/workers/{worker.worker_id}")).json()
        finally:
            await pool.close()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {s.name: s for f in families.values() for s in f.samples}
    wid = worker.worker_id

    def value(name: str, **labels: str) -> float:
        [found] = [
            s.value
            for f in families.values()
            for s in f.samples
            if s.name == name and s.labels == {"worker_id": wid, **labels}
        ]
        return found

    # Outcomes and claims are families of their own, told apart by bounded labels.
    assert value("tasker_worker_step_outcomes_total", outcome="succeeded") == 3
    assert value("tasker_worker_step_outcomes_total", outcome="dead_lettered") == 1
    assert (
        value("tasker_worker_claimed_steps_total", source="event")
        + value("tasker_worker_claimed_steps_total", source="poll")
        == 4
    )
    assert value("tasker_worker_listener_up") == 1.0
    assert value("tasker_worker_heartbeats_total", result="ok") >= 1
    assert "tasker_worker_steps_total" not in samples  # the old family that mixed everything
    # Histograms: per handler and outcome, cumulative buckets ending in +Inf, no step ids.
    handler = families["tasker_handler_duration_seconds"]
    assert handler.type == "histogram"
    counts = {(s.labels["handler"], s.labels["outcome"]): s.value for s in handler.samples if s.name.endswith("_count")}
    assert counts == {("ok", "succeeded"): 3, ("explodes", "error"): 1}
    assert families["tasker_claim_batch_size"].type == "histogram"
    assert sum(s.value for s in families["tasker_settle_duration_seconds"].samples if s.name.endswith("_count")) >= 1
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert not labels & {"step_uuid", "msg_id", "correlation_id"}
    # Every metric the dashboard and the alert rules query exists in a real scrape.
    missing = sorted(name for name in monitoring_metric_names() if name not in samples and name not in families)
    assert missing == []
    # The worker of this process is shown with its figures of now, not of its last heartbeat.
    assert shown["live"] is True and shown["processed"] == 4


@pytest.mark.parametrize("enabled", [True, False])
@pytest.mark.anyio
async def test_the_health_monitor_runs_at_its_interval_and_says_when_health_changes(
    url: str, captured: io.StringIO, enabled: bool
) -> None:
    reg = HandlerRegistry()

    @reg.handler("explodes")
    async def explodes(ctx: Any, step: Any) -> None:
        raise KeyError("boom")

    overrides = {
        "retry.max_attempts": 1,
        "event_system.health_monitoring_enabled": enabled,
        "event_system.health_check_interval": "50ms",
        "registry.heartbeat_interval": "60s",
    }
    async with running_worker(
        url, make_config(mode="Hybrid", namespaces=[NS], overrides=overrides), registry=reg
    ) as worker:
        await send_steps(url, NS, "explodes", [{} for _ in range(12)])
        await wait_until(outcomes_at_least(url, 12), timeout=30)
        if enabled:
            await wait_until(lambda: worker.status()["health"]["status"] == "degraded", timeout=10)
            health = worker.status()["health"]
            assert any("error_rate" in reason for reason in health["reasons"])
        else:
            # The steps have settled: whatever a monitor would have judged, it had the figures.
            assert worker.health is None and worker.status()["health"] == {"status": "not monitored"}
    changes = [r for r in lines(captured) if r["message"].startswith("health healthy -> degraded")]
    assert len(changes) == (1 if enabled else 0)


@pytest.mark.anyio
async def test_a_lapsed_claim_is_recorded_with_its_previous_holder(url: str) -> None:
    reg = HandlerRegistry()
    runs: dict[str, int] = {}

    @reg.handler("flaky")
    async def flaky(ctx: Any, step: Any) -> str:
        key = str(step.step_uuid)
        runs[key] = runs.get(key, 0) + 1
        if runs[key] == 1 and step.inputs.get("fail_first"):
            raise KeyError("once")  # a put-back (retry): not a lapse
        return "ok"

    [lapsing] = await send_steps(url, NS, "flaky", [{}])
    # A worker that claimed it and then went silent past its vt: the claim statement is the
    # worker's own; the lapse is the vt reaching now.
    pool = await open_pool(url, make_config().database, max_size=1)
    try:
        [held] = await QueueClient(pool).claim(queue_name(NS), 30, 1, Source.POLL, worker_id="ghost-worker")
    finally:
        await pool.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"UPDATE pgmq.q_{queue_name(NS)} SET vt = clock_timestamp() WHERE msg_id = %s", (held.msg_id,))
    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"retry.base_delay": "10ms"})
    async with running_worker(url, config, registry=reg) as worker:
        [retried] = await send_steps(url, NS, "flaky", [{"fail_first": True}])
        await wait_until(outcomes_at_least(url, 2, "succeeded"), timeout=30)
    events = await fetch(
        url,
        "SELECT step_uuid::text, worker_id, data FROM tasker.events WHERE event_type = 'StepAssignmentTimedOut'",
    )
    assert [(e[0], e[1]) for e in events] == [(lapsing["step_uuid"], "ghost-worker")]  # not the retried one
    data = events[0][2]
    assert (data["reason"], data["attempt"], data["reclaimed_by"]) == ("vt_lapsed", 1, worker.worker_id)
    assigned = await fetch(
        url,
        "SELECT worker_id, data ->> 'read_ct' FROM tasker.event_log WHERE step_uuid = %s AND event_type = 'StepAssigned'"
        " ORDER BY occurred_at",
        (lapsing["step_uuid"],),
    )
    assert assigned == [("ghost-worker", "1"), (worker.worker_id, "2")]
    assert worker.stats.counters["lapsed_claims"] == 1
    assert retried["step_uuid"] != lapsing["step_uuid"]
