"""The worker runtime against a real PostgreSQL: every mode, dedup, vt, retries, DLQ, listener loss."""

from __future__ import annotations

import types
from typing import Any

import anyio
import psycopg
import pytest
from ledger_handlers import LEDGER_DDL, ledger
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import NonRetryableError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import (
    fetch,
    fetch_value,
    make_config,
    outcome_counter,
    outcomes_at_least,
    running_worker,
    send_steps,
    wait_until,
)

MODES = ["PollingOnly", "Hybrid", "EventDrivenOnly"]
NS = "rt"
QUEUE = f"worker_{NS}_queue"


@pytest.fixture
def url(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return db_url


def registry_with_ledger() -> HandlerRegistry:
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    return reg


def state_for(url: str) -> Any:
    return types.SimpleNamespace(ledger_url=url)


async def assert_exactly_once(url: str, bodies: list[dict[str, Any]], *, archived: int = 0) -> None:
    """Every step has one outcome row saying when it was enqueued, claimed, started and finished,
    one ledger run, and its message is gone from the queue (kept in the archive only when
    ``[queues] archive`` asks for it)."""
    uuids = sorted(b["step_uuid"] for b in bodies)
    outcomes = await fetch(url, "SELECT step_uuid::text, status FROM tasker.step_results ORDER BY 1")
    assert [o[0] for o in outcomes] == uuids
    assert {o[1] for o in outcomes} == {"succeeded"}
    untimed = await fetch_value(
        url,
        "SELECT count(*) FROM tasker.step_results WHERE NOT (enqueued_at <= claimed_at AND claimed_at <= started_at"
        " AND started_at <= finished_at AND attempts >= 1 AND worker_id <> '' AND source IN ('event', 'poll'))",
    )
    assert untimed == 0
    runs = await fetch(url, "SELECT step_uuid::text, count(*) FROM public.ledger GROUP BY 1 HAVING count(*) > 1")
    assert runs == [], f"steps run more than once: {runs[:5]}"
    assert await fetch_value(url, "SELECT count(DISTINCT step_uuid) FROM public.ledger") == len(bodies)
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.a_{QUEUE}") == archived


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_every_message_handled_exactly_once(url: str, mode: str) -> None:
    config = make_config(mode=mode, namespaces=[NS], concurrency=8)
    early = await send_steps(url, NS, "ledger", [{"i": i} for i in range(20)])  # before the worker
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        single = await send_steps(url, NS, "ledger", [{"i": i} for i in range(20)])
        batch = await send_steps(url, NS, "ledger", [{"i": i} for i in range(50)], batch=True)
        delayed = await send_steps(url, NS, "ledger", [{"i": i} for i in range(5)], delay=1)
        in_tx = await send_steps(url, NS, "ledger", [{"in_tx": True} for _ in range(5)])
        bodies = early + single + batch + delayed + in_tx
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=30)
    # Read after shutdown: an outcome row commits a moment before the worker counts it.
    counters = worker.status()["counters"]
    await assert_exactly_once(url, bodies)
    assert counters["succeeded"] == len(bodies)
    if mode == "PollingOnly":
        assert counters["notifications_received"] == 0 and counters["claimed_event"] == 0
    else:
        assert counters["notifications_received"] > 0 and counters["claimed_event"] > 0
    if mode == "EventDrivenOnly":
        # Nothing polls: the early steps came through the startup catch-up claim, the delayed
        # ones through the wakeup scheduled from their notification's ready_at.
        assert counters["claimed_poll"] > 0
    sources = {r[0] for r in await fetch(url, "SELECT DISTINCT source FROM tasker.step_results")}
    assert sources <= {"event", "poll"}


NOT_DRAINING = (
    "SELECT NOT EXISTS (SELECT 1 FROM tasker.queue_listeners WHERE worker_id = %s AND draining_until IS NOT NULL)"
)


@pytest.mark.anyio
async def test_missed_wakeups_count_only_messages_sent_while_listening(url: str) -> None:
    """Steps waiting before the worker started are not missed wakeups; a step sent while LISTEN
    was up but without a notification is, once the poller finds it."""
    # A slow safety poll: it finds the silent step well after the missed-wakeup grace.
    config = make_config(
        mode="Hybrid", namespaces=[NS], concurrency=8, overrides={"event_system.fallback_poller.polling_interval": "3s"}
    )
    early = await send_steps(url, NS, "ledger", [{"i": i} for i in range(30)])
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        await wait_until(outcomes_at_least(url, len(early)), timeout=20)
        assert worker.status()["counters"]["missed_wakeups"] == 0
        # Once it stopped draining (a step sent while it drains may go unannounced on purpose,
        # migration 0020): from then on every send is announced, or missed.
        await wait_until(lambda: fetch_value(url, NOT_DRAINING, (worker.worker_id,)), timeout=10)
        [silent] = [StepMessage.build(NS, "ledger", {})]
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            # With triggers off (replica role) the insert sends no notification: a lost wakeup.
            await conn.execute("SET session_replication_role = replica")
            await conn.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) VALUES (now(), %s)", (Jsonb(silent),))
        await wait_until(outcomes_at_least(url, len(early) + 1), timeout=20)
    counters = worker.status()["counters"]
    assert counters["missed_wakeups"] == 1
    await assert_exactly_once(url, [*early, silent])


@pytest.mark.anyio
async def test_archive_is_kept_only_where_configured(url: str) -> None:
    """By default a settled message is deleted (its outcome row is its record); a namespace with
    ``[queues.namespaces.<ns>] archive = true`` keeps each settled message in pgmq's archive."""
    config = make_config(
        mode="Hybrid", namespaces=["plain", "kept"], overrides={"queues.namespaces": {"kept": {"archive": True}}}
    )
    assert not config.queues.archive_for("plain") and config.queues.archive_for("kept")
    async with running_worker(url, config):
        plain = await send_steps(url, "plain", "noop", [{"i": i} for i in range(5)])
        kept = await send_steps(url, "kept", "noop", [{"i": i} for i in range(5)], batch=True)
        await wait_until(outcomes_at_least(url, 10), timeout=20)
    assert await fetch_value(url, "SELECT count(*) FROM pgmq.q_worker_plain_queue") == 0
    assert await fetch_value(url, "SELECT count(*) FROM pgmq.a_worker_plain_queue") == 0
    assert await fetch_value(url, "SELECT count(*) FROM pgmq.q_worker_kept_queue") == 0
    archived = await fetch(
        url,
        "SELECT a.message ->> 'step_uuid', a.read_ct, r.msg_id = a.msg_id FROM pgmq.a_worker_kept_queue AS a"
        " JOIN tasker.step_results AS r ON r.step_uuid = (a.message ->> 'step_uuid')::uuid ORDER BY a.msg_id",
    )
    assert [r[0] for r in archived] == [b["step_uuid"] for b in kept]
    assert all(r[1] == 1 and r[2] for r in archived)
    recorded = await fetch(url, "SELECT namespace, count(*) FROM tasker.step_results GROUP BY 1 ORDER BY 1")
    assert recorded == [("kept", 5), ("plain", len(plain))]


@pytest.mark.anyio
async def test_same_step_uuid_sent_twice_runs_once(url: str) -> None:
    # With the archive on, both settled messages are kept there: the second one settled unrun.
    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"queues.archive": True})
    bodies = await send_steps(url, NS, "ledger", [{"sleep": 0.3}])
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, psycopg.types.json.Jsonb(bodies[0])))
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        await wait_until(_queue_empty(url), timeout=15)
        hits = worker.status()["counters"]["dedup_hits"]
    assert hits >= 1
    assert await fetch_value(url, "SELECT count(*) FROM public.ledger") == 1
    assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results") == 1
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.a_{QUEUE}") == 2


def _queue_empty(url: str) -> Any:
    async def check() -> bool:
        return bool(await fetch_value(url, f"SELECT count(*) = 0 FROM pgmq.q_{QUEUE}"))

    return check


@pytest.mark.anyio
async def test_handler_slower_than_vt_is_not_run_twice(url: str) -> None:
    config = make_config(
        mode="PollingOnly",
        namespaces=[NS],
        overrides={"event_system.fallback_poller.visibility_timeout": "1s", "worker.handler_timeout": "10s"},
    )
    bodies = await send_steps(url, NS, "ledger", [{"sleep": 2.5}, {"sleep": 2.5}])
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        await wait_until(outcomes_at_least(url, 2), timeout=20)
    counters = worker.status()["counters"]
    assert counters["vt_extensions"] >= 2
    await assert_exactly_once(url, bodies)


@pytest.mark.anyio
async def test_dependency_unavailable_is_released_without_attempts_but_bounded(url: str) -> None:
    from tasker_worker.errors import DependencyUnavailable

    state = types.SimpleNamespace(runs=0)
    reg = HandlerRegistry()

    async def waits_for_a_service(ctx: Any, step: Any) -> None:
        ctx.state.runs += 1
        raise DependencyUnavailable("the map service is down")

    reg.register("needs_service", waits_for_a_service)
    config = make_config(
        mode="Hybrid",
        namespaces=[NS],
        overrides={
            "retry.max_attempts": 2,
            "retry.max_releases": 3,
            "retry.base_delay": "10ms",
            "retry.max_delay": "50ms",
            "retry.jitter": 0.0,
        },
    )
    async with running_worker(url, config, registry=reg, state=state):
        await send_steps(url, NS, "needs_service", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=20)
    # Three releases use no attempt; after them each failure counts: 3 + max_attempts runs.
    assert state.runs == 3 + 2
    [(status, reason, releases)] = await fetch(
        url,
        f"SELECT r.status, r.error->>'reason', d.headers->>'tasker_releases'"
        f" FROM tasker.step_results AS r, pgmq.q_{QUEUE}_dlq AS d",
    )
    assert (status, reason, releases) == ("failed", "retries_exhausted", "3")


@pytest.mark.anyio
async def test_retries_then_dead_letter_then_requeue(url: str) -> None:
    state = types.SimpleNamespace(broken=True, runs=0)
    reg = HandlerRegistry()

    async def flaky(ctx: Any, step: Any) -> str:
        ctx.state.runs += 1
        if ctx.state.broken:
            raise RuntimeError("downstream says no")
        return "fixed"

    reg.register("flaky", flaky)
    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 3, "retry.base_delay": "50ms"}
    )
    from tasker_worker.db.queue_client import QueueClient

    async with running_worker(url, config, registry=reg, state=state) as worker:
        await send_steps(url, NS, "flaky", [{}])
        await wait_until(outcome_counter(url, "failed"), timeout=15)
        assert state.runs == 3
        dlq = await fetch(url, f"SELECT message, headers FROM pgmq.q_{QUEUE}_dlq")
        assert len(dlq) == 1
        info = dlq[0][1]["tasker_dlq"]
        assert info["reason"] == "retries_exhausted" and info["attempts"] == 3
        assert "downstream says no" in info["error"]["message"]
        error = await fetch_value(url, "SELECT error FROM tasker.step_results")
        assert error["last_reason"] == "handler_error"

        state.broken = False
        assert worker.client is not None
        moved = await QueueClient(worker.client.pool).requeue_dead_letters(QUEUE)
        assert len(moved) == 1
        await wait_until(outcome_counter(url, "succeeded"), timeout=15)
    counters = worker.status()["counters"]
    assert state.runs == 4
    assert counters["retried"] == 2 and counters["dead_lettered"] == 1
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq") == 0
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.a_{QUEUE}_dlq") == 1  # the record stays


@pytest.mark.anyio
async def test_malformed_and_unknown_messages_are_dead_lettered_worker_keeps_going(url: str) -> None:
    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for bad in ("[1, 2]", '"just a string"', '{"handler": "ledger"}', "42", "null"):
                await conn.execute("SELECT pgmq.send(%s, %s::jsonb)", (QUEUE, bad))
        await send_steps(url, NS, "no_such_handler", [{}])
        await send_steps(url, NS, "fail", [{"mode": "non_retryable"}])
        await send_steps(url, NS, "fail", [{"mode": "failed", "reason": "no_path"}])
        good = await send_steps(url, NS, "ledger", [{"i": i} for i in range(10)])
        await wait_until(_queue_empty(url), timeout=15)
        await wait_until(outcomes_at_least(url, 13), timeout=15)
    assert worker.status()["counters"]["dead_lettered"] == 7
    rows = await fetch(url, f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{QUEUE}_dlq ORDER BY msg_id")
    assert [r[0] for r in rows] == ["malformed_message"] * 5 + ["unknown_handler", "non_retryable_error"]
    statuses = dict(await fetch(url, "SELECT status, count(*) FROM tasker.step_results GROUP BY 1"))
    assert statuses == {"succeeded": 10, "dead_lettered": 2, "failed": 1}
    failed = await fetch_value(url, "SELECT error->>'reason' FROM tasker.step_results WHERE status = 'failed'")
    assert failed == "no_path"
    assert await fetch_value(url, "SELECT count(*) FROM public.ledger") == len(good)


async def _terminate(url: str, pid: int) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["Hybrid", "EventDrivenOnly"])
async def test_listener_killed_reconnects_and_catches_up(url: str, mode: str) -> None:
    """With every poll ten minutes away, only the listener can find steps: steps that got no
    notification while it was away are found by the catch-up claim after it reconnects, and
    steps sent afterwards by the notifications of its new LISTEN."""
    config = make_config(
        mode=mode,
        namespaces=[NS],
        overrides={
            "event_system.listener.max_reconnect_delay": "500ms",
            "event_system.fallback_poller.polling_interval": "10m",
            "event_system.fallback_poller.degraded_interval": "10m",
        },
    )
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)) as worker:
        listener = worker.event_system.listener  # type: ignore[union-attr]
        assert listener is not None
        first = await send_steps(url, NS, "ledger", [{"i": i} for i in range(5)])
        await wait_until(outcomes_at_least(url, 5), timeout=10)
        old_pid = listener.backend_pid
        assert old_pid is not None
        # Sent with no notification (triggers off), as if while the listener was deaf.
        deaf = [StepMessage.build(NS, "ledger", {"i": i}) for i in range(5)]
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SET session_replication_role = replica")
            for body in deaf:
                await conn.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) VALUES (now(), %s)", (Jsonb(body),))
        await _terminate(url, old_pid)
        await wait_until(outcomes_at_least(url, 10), timeout=10)
        await wait_until(lambda: listener.backend_pid not in (None, old_pid), timeout=10)
        third = await send_steps(url, NS, "ledger", [{"i": i} for i in range(5)])
        await wait_until(outcomes_at_least(url, 15), timeout=10)
    counters = worker.status()["counters"]
    assert counters["listener_reconnects"] >= 1
    await assert_exactly_once(url, first + deaf + third)


@pytest.mark.anyio
async def test_steps_released_at_shutdown_are_announced_to_an_event_driven_fleet(url: str) -> None:
    """A step released at shutdown is visible at once, but no INSERT announces it: the leaving
    worker announces it itself, or a fleet without pollers would leave it in its queue until
    some other step's notification came."""

    def config(worker_id: str) -> Any:
        overrides = {"worker.shutdown_timeout": "300ms", "worker.id": worker_id}
        return make_config(mode="EventDrivenOnly", namespaces=[NS], overrides=overrides)

    leaving = Worker(config("leaving"), database_url=url, registry=registry_with_ledger(), state=state_for(url))
    async with anyio.create_task_group() as tg:
        tg.start_soon(leaving.run)
        with anyio.fail_after(30):
            await leaving.ready.wait()
        bodies = await send_steps(url, NS, "ledger", [{"sleep": 2}])
        await wait_until(lambda: _claimed(url), timeout=10)
        async with running_worker(
            url, config("staying"), registry=registry_with_ledger(), state=state_for(url)
        ) as staying:
            leaving.request_shutdown("test")  # releases the step it is running
            with anyio.fail_after(30):
                await leaving.stopped.wait()
            await wait_until(outcomes_at_least(url, 1), timeout=15)
            assert staying.status()["counters"]["succeeded"] == 1
    await assert_exactly_once(url, bodies)
    released = await fetch_value(url, "SELECT count(*) FROM tasker.events WHERE data->>'reason' = 'shutdown'")
    assert released == 1


async def _claimed(url: str) -> bool:
    return bool(await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 1"))


@pytest.mark.anyio
async def test_pooled_connections_killed_worker_recovers(url: str) -> None:
    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config, registry=registry_with_ledger(), state=state_for(url)):
        first = await send_steps(url, NS, "ledger", [{} for _ in range(5)])
        await wait_until(outcomes_at_least(url, 5), timeout=10)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
        second = await send_steps(url, NS, "ledger", [{} for _ in range(5)])
        await wait_until(outcomes_at_least(url, 10), timeout=20)
    await assert_exactly_once(url, first + second)


@pytest.mark.anyio
async def test_event_driven_only_refuses_to_start_when_listen_does_not_deliver(url: str) -> None:
    from tasker_worker.errors import WorkerStartupError
    from tasker_worker.runtime.worker import Worker

    async def swallow(channel: str, payload: str) -> None:  # like a transaction-pooling proxy
        return None

    config = make_config(
        mode="EventDrivenOnly", namespaces=[NS], overrides={"event_system.listener.connection_timeout": "500ms"}
    )
    refused = Worker(config, database_url=url, probe_sender=swallow)
    with pytest.raises(WorkerStartupError, match="transaction-pooling"):
        await refused.run()
    # It had registered; it leaves the registry saying why.
    [(status, reason)] = await fetch(
        url, "SELECT status, deregister_reason FROM tasker.workers WHERE worker_id = %s", (refused.worker_id,)
    )
    assert status == "deregistered" and reason.startswith("failed:") and "transaction-pooling" in reason

    hybrid = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"event_system.listener.connection_timeout": "500ms"}
    )
    async with running_worker(url, hybrid, probe_sender=swallow) as worker:
        assert worker.event_system is not None and worker.event_system.listener is None
        assert "transaction-pooling" in (worker.event_system.listener_disabled_reason or "")
        await send_steps(url, NS, "noop", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=10)


@pytest.mark.anyio
async def test_graceful_shutdown_releases_unfinished_steps(url: str) -> None:
    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"worker.shutdown_timeout": "500ms"})
    async with running_worker(url, config) as worker:
        await send_steps(url, NS, "sleep", [{"seconds": 0.05}] * 3 + [{"seconds": 30}] * 2, timeout=60)
        await wait_until(outcomes_at_least(url, 3), timeout=10)
        await wait_until(
            lambda: worker.processor is not None and len(worker.processor.steps.in_flight) == 2, timeout=10
        )
    assert worker.status()["counters"]["released"] == 2
    rows = await fetch(url, f"SELECT read_ct, vt <= clock_timestamp() FROM pgmq.q_{QUEUE}")
    assert rows == [(0, True), (0, True)]  # back at once, attempt given back


@pytest.mark.anyio
async def test_stale_ack_is_rejected_and_counted(url: str) -> None:
    """A claim that was taken over elsewhere (read_ct moved on) cannot archive the message."""
    gate = anyio.Event()
    reg = HandlerRegistry()

    async def wait_for_gate(ctx: Any, step: Any) -> None:
        await gate.wait()

    reg.register("gated", wait_for_gate)
    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"worker.handler_timeout": "20s"})
    async with running_worker(url, config, registry=reg) as worker:
        await send_steps(url, NS, "gated", [{}])
        await wait_until(
            lambda: worker.processor is not None and len(worker.processor.steps.in_flight) == 1, timeout=10
        )
        # Another consumer re-claims it (as after a vt expiry): read_ct moves to 2.
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(f"UPDATE pgmq.q_{QUEUE} SET vt = now() - interval '1s'")
            took = await (await conn.execute("SELECT msg_id FROM pgmq.read(%s, 60, 1)", (QUEUE,))).fetchall()
        assert len(took) == 1
        gate.set()
        await wait_until(lambda: worker.status()["counters"]["stale_acks"] == 1, timeout=10)
    assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results") == 0
    assert await fetch_value(url, f"SELECT read_ct FROM pgmq.q_{QUEUE}") == 2


@pytest.mark.anyio
async def test_timeouts_per_message_and_periodic_work(url: str) -> None:
    state = types.SimpleNamespace(ticks=0)
    reg = HandlerRegistry()

    @reg.periodic(every="50ms", timeout="1s")
    async def tick(ctx: Any) -> None:
        ctx.state.ticks += 1

    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 2, "retry.base_delay": "50ms"}
    )
    async with running_worker(url, config, registry=reg, state=state):
        await send_steps(url, NS, "sleep", [{"seconds": 5}], timeout=0.2)
        await wait_until(outcome_counter(url, "failed"), timeout=15)
        await wait_until(lambda: state.ticks >= 3, timeout=5)
    error = await fetch_value(url, "SELECT error FROM tasker.step_results")
    assert error["reason"] == "retries_exhausted" and error["last_reason"] == "timeout"
    assert "0.2s" in error["message"]


@pytest.mark.anyio
async def test_handler_transaction_rolls_back_with_a_failure(url: str) -> None:
    reg = HandlerRegistry()

    async def writes_then_fails(ctx: Any, step: Any) -> None:
        conn = await ctx.transaction()
        await conn.execute(
            "INSERT INTO public.ledger (step_uuid, run_id, attempt, pid) VALUES (%s, 'x', %s, 0)",
            (str(step.step_uuid), ctx.attempt),
        )
        raise RuntimeError("after writing")

    reg.register("wtf", writes_then_fails)
    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 2, "retry.base_delay": "50ms"}
    )
    async with running_worker(url, config, registry=reg):
        await send_steps(url, NS, "wtf", [{}])
        await wait_until(outcome_counter(url, "failed"), timeout=15)
    assert await fetch_value(url, "SELECT count(*) FROM public.ledger") == 0


def test_rejected_messages_are_left_alone_for_a_bounded_time_and_number() -> None:
    """What a worker skips after rejecting steps expires, and never grows past its bound."""
    from tasker_worker.runtime.processor import LEAVE_REJECTED_MAX, _QueueState

    qs = _QueueState("q")
    qs.leave_alone(7, until=10.0)
    qs.leave_alone(8, until=20.0)
    assert qs.left_alone(now=5.0) == [7, 8]
    assert qs.left_alone(now=10.0) == [8]
    assert qs.left_alone(now=20.0) == [] and not qs.rejected
    for msg_id in range(LEAVE_REJECTED_MAX + 10):
        qs.leave_alone(msg_id, until=100.0 + msg_id)
    qs.leave_alone(12, until=500.0)  # left alone again: now the newest
    kept = qs.left_alone(now=0.0)
    assert len(kept) == LEAVE_REJECTED_MAX
    assert kept[:3] == [10, 11, 13] and kept[-1] == 12


@pytest.mark.anyio
async def test_a_finished_handler_frees_its_slot_while_its_outcome_waits_for_the_writer(url: str) -> None:
    """With concurrency 2 and the outcome writes held up (step_results locked), two steps hand
    their outcomes to the writer and two more run; then claiming stops, at twice the
    concurrency in hand, and everything is recorded once when the writes go through."""
    started: list[int] = []
    reg = HandlerRegistry()

    async def note(ctx: Any, step: Any) -> None:
        started.append(ctx.msg_id)

    reg.register("note", note)
    # Without prefetch, which would claim up to worker.prefetch more into its buffer.
    config = make_config(mode="Hybrid", namespaces=[NS], concurrency=2, overrides={"worker.prefetch": 0})
    async with await psycopg.AsyncConnection.connect(url) as locker:
        await locker.execute("LOCK TABLE tasker.step_results IN EXCLUSIVE MODE")  # outcome inserts wait
        async with running_worker(url, config, registry=reg) as worker:
            bodies = await send_steps(url, NS, "note", [{}] * 6)

            def held() -> bool:
                snap = worker.status()
                return len(started) == 4 and snap["in_flight"] == 4 and snap["outcomes_waiting"] == 2

            await wait_until(held, timeout=10)
            assert worker.status()["free_slots"] == 0
            untouched = await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE} WHERE read_ct = 0")
            assert untouched == 2
            await locker.rollback()
            await wait_until(outcomes_at_least(url, 6), timeout=10)
    assert len(set(started)) == len(started) == 6
    outcomes = await fetch(url, "SELECT step_uuid::text, status FROM tasker.step_results ORDER BY 1")
    assert outcomes == [(u, "succeeded") for u in sorted(b["step_uuid"] for b in bodies)]
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


@pytest.mark.anyio
async def test_a_nul_character_in_a_result_or_an_error_is_stored_not_fatal(url: str) -> None:
    """jsonb refuses the NUL character: a handler that returns or raises one gets U+FFFD in its
    outcome row, and the steps written in the same batch are recorded as well."""
    reg = HandlerRegistry()

    @reg.handler("nul")
    async def nul(ctx: Any, step: Any) -> dict[str, str]:
        if ctx.inputs.get("fail"):
            raise NonRetryableError("bad\x00message", reason="nul\x00reason")
        return {"text": "a\x00b", "k\x00": "v"}

    config = make_config(mode="Hybrid", namespaces=[NS], concurrency=8)
    async with running_worker(url, config, registry=reg):
        bodies = await send_steps(url, NS, "nul", [{}, {"fail": True}], batch=True)
        bodies += await send_steps(url, NS, "noop", [{"i": i} for i in range(5)], batch=True)
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=20)
    rows = dict(await fetch(url, "SELECT step_uuid::text, coalesce(result, error) FROM tasker.step_results"))
    assert rows[bodies[0]["step_uuid"]] == {"text": "a\ufffdb", "k\ufffd": "v"}
    assert rows[bodies[1]["step_uuid"]]["message"] == "bad\ufffdmessage"
    assert rows[bodies[1]["step_uuid"]]["reason"] == "nul\ufffdreason"
    assert len(rows) == len(bodies)
