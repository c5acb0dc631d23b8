"""Hostile input that once stopped a worker or kept a step running forever: a body nested
deeper than Python's decoders go, headers that are not a JSON object, a NaN in an error's
detail, a naive ``ready_at`` in a wakeup, a backoff longer than a put-back can say, a namespace
cache fed any name. Each is handled as a bad message (dead-lettered with a reason, or read as
an unreadable wakeup) and the worker goes on."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from tasker_worker.db.clusters import ClusterPools
from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.notifications import decode_wakeup, message_ready_channel
from tasker_worker.domain.settlement import MAX_PUT_BACK_S, DeadLetter, put_back_ms
from tasker_worker.domain.steps import ClaimedMessage, OutcomeStatus, Source, StepMessage, is_tasker_core_step
from tasker_worker.domain.verdicts import RetryPolicy, error_json, jsonb_safe, judge_failure
from tasker_worker.errors import NonRetryableError, RetryableError, StepValidationError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.inflight import InFlight
from tasker_worker.runtime.ports import NoWakeups
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.runtime.writer import OutcomeWriter
from tasker_worker.testing import (
    fetch,
    fetch_value,
    make_config,
    outcomes_at_least,
    running_worker,
    send_steps,
    wait_until,
)

NS = "hostile"
QUEUE = f"worker_{NS}_queue"
DEPTH = 1000  # PostgreSQL's jsonb takes 5000; Python's decoders stop near 1000


def deep(depth: int = DEPTH) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def claimed(body: str, headers: Any = None) -> ClaimedMessage:
    now = datetime.now(UTC)
    return ClaimedMessage(QUEUE, 1, 1, now, now, body, headers, False, Source.POLL)


# --- pure logic --------------------------------------------------------------------------------


def test_a_body_nested_too_deep_is_a_malformed_message_not_a_recursion_error() -> None:
    for text in (deep(), "[" * DEPTH + "]" * DEPTH, '{"step_uuid": "x", "inputs": ' + "[" * DEPTH + "]" * DEPTH + "}"):
        with pytest.raises(StepValidationError) as caught:
            StepMessage.decode(text)
        assert caught.value.reason == "malformed_message"
        assert claimed(text).step_uuid is None
        assert is_tasker_core_step(text) is False
    with pytest.raises(StepValidationError, match="nested too deeply"):
        StepMessage.decode(deep())


def test_odd_counter_headers_count_as_zero() -> None:
    assert claimed("{}", {"tasker_releases": 3}).header_count("tasker_releases") == 3
    assert claimed("{}", {"tasker_releases": 2.0}).header_count("tasker_releases") == 2
    for odd in ("x", [1], {"a": 1}, None, True, -4, 1.5):
        assert claimed("{}", {"tasker_releases": odd}).header_count("tasker_releases") == 0
    assert claimed("{}", None).header_count("tasker_snoozes") == 0


def test_claimed_headers_are_an_object_or_none() -> None:
    now = datetime.now(UTC)
    rows = [
        (1, 1, now, now, "{}", [1], False, None),
        (2, 1, now, now, "{}", "x", False, None),
        (3, 1, now, now, "{}", 7, False, None),
        (4, 2, now, now, "{}", {"tasker_claim": [1], "k": 1}, False, now),
        (5, 1, now, now, "{}", {"k": 1}, False, None),
    ]
    msgs = QueueClient._claimed(QUEUE, rows, Source.POLL, 0.0)
    raw = "tasker_raw_headers"  # as the claim stores headers that are no object (migration 0025)
    assert [m.headers for m in msgs] == [{raw: [1]}, {raw: "x"}, {raw: 7}, {"k": 1}, {"k": 1}]
    assert msgs[3].lapsed_claim == {"worker_id": None, "read_ct": 1, "at": now.isoformat()}


def test_non_finite_floats_in_errors_are_stored_as_null() -> None:
    error = error_json(RetryableError("costly", cost=math.nan, limits=[math.inf, 1.5]))
    assert error["detail"] == {"cost": None, "limits": [None, 1.5]}
    assert jsonb_safe({"a": [-math.inf, {"b": math.nan}], "c": 2.5}) == {"a": [None, {"b": None}], "c": 2.5}


def test_a_backoff_longer_than_a_put_back_can_say_is_capped() -> None:
    policy = RetryPolicy(
        max_attempts=5, base_delay=timedelta(days=30), max_delay=timedelta(days=60), jitter=0.2, max_releases=5
    )
    for unavailable in (False, True):
        verdict = judge_failure(
            RuntimeError("x"), attempt=1, attempt_limit=None, releases=0, policy=policy, unavailable=unavailable
        )
        assert 0 < verdict.delay_s <= MAX_PUT_BACK_S
    assert put_back_ms(1e12) == 2**31 - 1
    assert put_back_ms(math.inf) == 2**31 - 1
    assert put_back_ms(math.nan) == 0 and put_back_ms(-1.0) == 0 and put_back_ms(1.5) == 1500


def test_a_wakeup_with_a_naive_ready_at_is_taken_as_utc() -> None:
    base = '{"event_type": "message_ready", "queue_name": "q", "msg_id": 1'
    event = decode_wakeup(base + ', "ready_at": "2026-12-06T14:00:00", "delay_seconds": 5}')
    assert event is not None and event.ready_at == datetime(2026, 12, 6, 14, tzinfo=UTC)
    assert event.due_from(datetime.now(UTC)).ready_at is not None  # compares with aware times
    assert decode_wakeup(base + ', "delay_seconds": 100000000000000}') is None  # would overflow
    assert decode_wakeup(base + ', "x": ' + "[" * 5000 + "]" * 5000 + "}") is None


def test_the_cluster_routes_remember_only_configured_namespaces() -> None:
    config = make_config(namespaces=[NS])
    pools = ClusterPools(config)
    for i in range(5000):
        assert pools.cluster_of(f"any_{i}") == "primary"
    assert pools.cluster_of(NS) == "primary"
    assert len(pools._routes) <= len(config.queues.namespaces)


# --- against PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def url(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return db_url


async def _insert(url: str, body: str, headers: Any = None) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            f"INSERT INTO pgmq.q_{QUEUE} (vt, message, headers) VALUES (now(), %s::jsonb, %s::jsonb)",
            (body, None if headers is None else Jsonb(headers)),
        )


def _queue_empty(url: str) -> Any:
    async def check() -> bool:
        return await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0

    return check


async def _dlq_reasons(url: str) -> list[str]:
    rows = await fetch(url, f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{QUEUE}_dlq ORDER BY msg_id")
    return [r[0] for r in rows]


@pytest.mark.anyio
async def test_a_body_nested_1000_deep_is_dead_lettered_and_the_worker_goes_on(url: str) -> None:
    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config) as worker:
        await _insert(url, deep())
        # The same body whose previous claim lapsed: the reclaim records the lapse by its
        # step_uuid, which reading the body must not raise for.
        await _insert(url, deep(), {"tasker_claim": {"worker_id": "gone"}})
        await wait_until(_queue_empty(url), timeout=15)
        good = await send_steps(url, NS, "noop", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=15)
        assert worker.status()["counters"]["dead_lettered"] == 2
    assert await _dlq_reasons(url) == ["malformed_message", "malformed_message"]
    status = await fetch_value(
        url, "SELECT status FROM tasker.step_results WHERE step_uuid = %s", (good[0]["step_uuid"],)
    )
    assert status == "succeeded"


@pytest.mark.anyio
async def test_nan_in_an_error_or_a_result_reaches_its_end(url: str) -> None:
    """A NaN in a retried step's error (headers), in its dead letter, and in a result: each
    step ends (dead-lettered after its attempts; succeeded), and the steps written with them
    too."""
    reg = HandlerRegistry()

    @reg.handler("nan")
    async def nan(ctx: Any, step: Any) -> Any:
        if ctx.inputs.get("mode") == "retry":
            raise RetryableError("too costly", cost=math.nan)
        if ctx.inputs.get("mode") == "dead":
            raise NonRetryableError("never", limit=math.inf)
        return {"score": math.nan}

    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 2, "retry.base_delay": "50ms"}
    )
    async with running_worker(url, config, registry=reg):
        bodies = await send_steps(url, NS, "nan", [{"mode": "retry"}, {"mode": "dead"}, {}], batch=True)
        bodies += await send_steps(url, NS, "noop", [{"i": i} for i in range(3)], batch=True)
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=20)
    rows = {
        r[0]: r[1:]
        for r in await fetch(
            url, "SELECT step_uuid::text, status, attempts, coalesce(result, error) FROM tasker.step_results"
        )
    }
    retried, dead, result = (rows[b["step_uuid"]] for b in bodies[:3])
    assert retried[0] == "failed" and retried[2]["reason"] == "retries_exhausted" and retried[2]["attempts"] == 2
    assert retried[2]["detail"] == {"cost": None}
    assert dead[0] == "dead_lettered" and dead[2]["detail"] == {"limit": None}
    assert result[0] == "succeeded" and result[2] == {"score": None}
    assert len(rows) == len(bodies)
    assert sorted(await _dlq_reasons(url)) == ["non_retryable_error", "retries_exhausted"]


@pytest.mark.anyio
async def test_a_wakeup_with_a_naive_ready_at_does_not_stop_the_worker(url: str) -> None:
    config = make_config(mode="EventDrivenOnly", namespaces=[NS])
    async with running_worker(url, config) as worker:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            for payload in (
                '{"event_type": "message_ready", "queue_name": "%s", "msg_id": 1, "ready_at": "2026-12-06T14:00:00"}',
                '{"event_type": "message_ready", "queue_name": "%s", "msg_id": 1, "delay_seconds": 5,'
                ' "ready_at": "2020-01-01T00:00:00"}',
            ):
                await conn.execute("SELECT pg_notify(%s, %s)", (message_ready_channel(NS), payload % QUEUE))
        # The step's own notification reaches the listener after those two (one connection
        # delivers in commit order), and the processor handles them in turn: no wait needed.
        bodies = await send_steps(url, NS, "noop", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=15)
        assert worker.status()["counters"]["succeeded"] == 1
    assert await fetch_value(url, "SELECT status FROM tasker.step_results") == "succeeded", bodies


@pytest.mark.anyio
async def test_headers_that_are_no_object_do_not_keep_a_step_from_its_end(url: str) -> None:
    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 2, "retry.base_delay": "50ms"}
    )
    bodies = [
        StepMessage.build(NS, "fail", {"mode": "retryable"}),
        StepMessage.build(NS, "fail", {"mode": "non_retryable"}),
        StepMessage.build(NS, "fail", {"mode": "retryable"}),
    ]
    async with running_worker(url, config) as worker:
        for body, headers in zip(bodies, ([1], "x", {"tasker_releases": "many", "tasker_notify": [1]}), strict=True):
            await _insert(url, json.dumps(body), headers)
        await wait_until(_queue_empty(url), timeout=20)
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=15)
        assert worker.status()["counters"]["dead_lettered"] == 3
    # The reasons are in the outcome rows; the DLQ rows keep the producer's headers, with
    # tasker_dlq merged in only where they were an object (pgmq's || appends to an array).
    reasons = dict(await fetch(url, "SELECT step_uuid::text, error->>'reason' FROM tasker.step_results"))
    assert [reasons[b["step_uuid"]] for b in bodies] == [
        "retries_exhausted",
        "non_retryable_error",
        "retries_exhausted",
    ]
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq") == 3
    third = await fetch_value(
        url,
        f"SELECT headers->'tasker_dlq'->>'reason' FROM pgmq.q_{QUEUE}_dlq WHERE message->>'step_uuid' = %s",
        (bodies[2]["step_uuid"],),
    )
    assert third == "retries_exhausted"


@pytest.mark.anyio
@pytest.mark.parametrize("flow", [False, True], ids=["plain", "flow_controlled"])
async def test_headers_that_are_no_object_still_bound_the_snoozes_and_are_kept(url: str, flow: bool) -> None:
    """A step's snoozes and releases are counted in its headers. Headers a raw producer wrote as
    `[1]` or `"x"` used to take our counters as array elements (jsonb's || appends to an
    array), where the worker never read them back: a step that always snoozed did so without
    end. The claim now moves such headers under ``tasker_raw_headers`` of an object, kept, and
    the counters bound the step as any other; also the claim of a namespace under flow control
    (``tasker.claim_flow``)."""
    if flow:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SELECT tasker.set_queue_limits(%s, 10)", (NS,))
    reg = HandlerRegistry()
    seen: dict[str, list[Any]] = {}

    @reg.handler("never_ready", max_snoozes=2)
    async def never_ready(ctx: Any, step: Any) -> Any:
        seen.setdefault(str(ctx.step.step_uuid), []).append((ctx.headers or {}).get("tasker_raw_headers"))
        return ctx.snooze("10ms")

    bodies = [StepMessage.build(NS, "never_ready") for _ in range(2)]
    async with running_worker(url, make_config(mode="Hybrid", namespaces=[NS]), registry=reg):
        for body, headers in zip(bodies, ([1], "x"), strict=True):
            await _insert(url, json.dumps(body), headers)
        await wait_until(outcomes_at_least(url, len(bodies)), timeout=20)
    rows = await fetch(url, "SELECT status, error->>'reason', attempts FROM tasker.step_results")
    assert rows == [("failed", "too_many_snoozes", 1)] * 2
    # The handler saw the producer's headers at every run (the first claim moved them).
    assert [seen[b["step_uuid"]] for b in bodies] == [[[1]] * 3, ["x"] * 3]


@pytest.mark.anyio
async def test_a_backoff_past_24_days_puts_the_step_back(url: str) -> None:
    reg = HandlerRegistry()

    @reg.handler("slow_retry", max_attempts=3, backoff=("30d", "60d"))
    async def slow_retry(ctx: Any, step: Any) -> None:
        raise RetryableError("later")

    config = make_config(mode="Hybrid", namespaces=[NS])
    async with running_worker(url, config, registry=reg) as worker:
        await send_steps(url, NS, "slow_retry", [{}])

        async def put_back() -> bool:
            return worker.status()["counters"]["retried"] >= 1

        await wait_until(put_back, timeout=15)
    days = await fetch_value(url, f"SELECT extract(epoch FROM vt - now()) / 86400 FROM pgmq.q_{QUEUE}")
    assert 24 < float(days) <= 24.9
    assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results") == 0


@pytest.mark.anyio
async def test_a_group_the_database_refuses_is_written_one_by_one(url: str) -> None:
    """One dead letter whose error PostgreSQL refuses (a NaN that got past ``jsonb_safe``)
    fails the statement of its whole group: the others are written alone, and it is
    dead-lettered with reason ``outcome_not_storable``, never left to run again at its vt."""
    bodies = await send_steps(url, NS, "noop", [{"i": i} for i in range(3)])
    pool = await open_pool(url, make_config().database, max_size=2)
    try:
        client = QueueClient(pool)
        msgs = await client.claim(QUEUE, 30, 10, Source.POLL, worker_id="w")
        assert len(msgs) == 3
        held = InFlight(10, 30)
        stats = WorkerStats()
        writer = OutcomeWriter(client, "w", stats, held, NoWakeups())
        for i, msg in enumerate(sorted(msgs, key=lambda m: m.msg_id)):
            error = {"reason": "bad" if i == 1 else "fine", "cost": math.nan if i == 1 else 1.0}
            writer.end(held.hold(msg), DeadLetter(OutcomeStatus.DEAD_LETTERED, error))
        await writer.flush()
    finally:
        await pool.close()
    assert not held.entries
    assert stats.counters["dead_lettered"] == 3
    assert await _dlq_reasons(url) == ["fine", "outcome_not_storable", "fine"]
    error = await fetch_value(
        url, "SELECT error FROM tasker.step_results WHERE step_uuid = %s", (bodies[1]["step_uuid"],)
    )
    assert error["reason"] == "outcome_not_storable" and error["last_reason"] == "bad"
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


@pytest.mark.anyio
async def test_progress_with_nan_is_written_with_the_others(url: str) -> None:
    """One step's progress with a NaN (json.dumps writes it, jsonb refuses it) no longer
    loses every step's report of the round."""
    a, b = (StepMessage.build(NS, "noop", {}) for _ in range(2))
    rows = [
        {"step_uuid": a["step_uuid"], "namespace": NS, "fraction": 0.5, "note": "ok", "data": {"n": 1}},
        {"step_uuid": b["step_uuid"], "namespace": NS, "fraction": math.nan, "note": "x", "data": {"v": math.inf}},
    ]
    pool = await open_pool(url, make_config().database, max_size=1)
    try:
        await QueueClient(pool).write_progress(rows, "w")
    finally:
        await pool.close()
    stored = dict(await fetch(url, "SELECT step_uuid::text, data FROM tasker.step_progress"))
    assert stored == {a["step_uuid"]: {"n": 1}, b["step_uuid"]: {"v": None}}
