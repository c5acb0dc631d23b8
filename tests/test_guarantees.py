"""Each guarantee of the step path, through real workers and the database, in a test that fails
when that guarantee is broken (``tests/mutations.py`` breaks them one by one to prove it).

- vt extension: a step slower than its vt is never claimed by anyone else while it runs.
- fences: a holder whose claim was taken over cannot extend, retry, dead-letter or settle it.
- backoff: a failed attempt's message stays invisible for the computed delay, attempt by attempt.
- dedup: a re-sent step_uuid is not run again, through every claim variant.
"""

from __future__ import annotations

import time
import types
from typing import Any

import anyio
import psycopg
import pytest
from ledger_handlers import LEDGER_DDL, ledger
from proxy import DatabaseProxy
from psycopg.types.json import Jsonb

from tasker_worker.domain.steps import StepMessage
from tasker_worker.errors import DependencyUnavailable, NonRetryableError
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime.worker import Worker
from tasker_worker.testing import (
    fetch,
    fetch_value,
    make_config,
    outcomes_at_least,
    running_worker,
    send_steps,
    wait_until,
)

NS = "proof"
QUEUE = f"worker_{NS}_queue"
#: Polling so slow that, within a test, only what the test arranges wakes a worker.
NEVER = "10m"


@pytest.fixture
def url(db_url: str) -> str:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    return db_url


def counter(worker: Worker, name: str) -> int:
    return int(worker.status()["counters"].get(name, 0))


def in_flight(worker: Worker) -> int:
    return 0 if worker.processor is None else len(worker.processor.steps.in_flight)


# --- vt extension -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_step_slower_than_its_vt_is_never_claimed_by_anyone_else(url: str) -> None:
    """Two workers polling every 100 ms, a 1 s vt, a 3 s handler: the holder keeps extending the
    vt, so neither the other worker nor the holder's own poll ever claims the message again
    (read_ct stays 1 to the end, one run in the ledger)."""
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    config = make_config(
        mode="PollingOnly",
        namespaces=[NS],
        overrides={
            "event_system.fallback_poller.visibility_timeout": "1s",
            "event_system.fallback_poller.polling_interval": "100ms",
            "worker.handler_timeout": "20s",
        },
    )
    state = types.SimpleNamespace(ledger_url=url)
    async with running_worker(url, config, registry=reg, state=state) as first:
        async with running_worker(url, config, registry=reg, state=state) as second:
            [body] = await send_steps(url, NS, "ledger", [{"sleep": 3.0}])
            await wait_until(outcomes_at_least(url, 1), timeout=20)
    [(attempts, worker_id)] = await fetch(url, "SELECT attempts, worker_id FROM tasker.step_results")
    assert attempts == 1, "the message was claimed again while its step ran"
    assert await fetch(url, "SELECT step_uuid::text, attempt FROM public.ledger") == [(body["step_uuid"], 1)]
    holder, other = (first, second) if worker_id == first.worker_id else (second, first)
    assert counter(holder, "vt_extensions") >= 2
    assert counter(holder, "dedup_hits") == 0 and counter(other, "dedup_hits") == 0
    assert counter(other, "claimed_poll") == 0


@pytest.mark.anyio
async def test_a_claims_vt_is_counted_from_when_it_was_sent_not_from_its_late_reply(url: str) -> None:
    """The server sets a claim's vt while the claim runs; its reply may come back much later
    (the proxy holds it here for a second). The worker counts the vt from before it sent the
    claim, never from the reply: counted from the reply, a worker would believe it holds the
    message for longer than the server does, extend it too late and start a prefetched step on
    a claim that may already be someone else's."""
    from tasker_worker.config.models import DatabaseConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.db.queue_client import QueueClient
    from tasker_worker.domain.steps import Source

    vt = 30
    await send_steps(url, NS, "noop", [{}])
    async with DatabaseProxy(url) as proxy:
        pool = await open_pool(proxy.url_through, DatabaseConfig(), max_size=1)
        try:
            client = QueueClient(pool)
            await client.queue_exists(QUEUE)  # the connection is up before the replies are held
            proxy.reply_delay_s = 1.0
            before = time.monotonic()
            [msg] = await client.claim(QUEUE, vt, 1, Source.POLL, worker_id="w")
            assert time.monotonic() - before >= 1.0  # the reply was held
        finally:
            proxy.reply_delay_s = 0.0
            await pool.close()
    assert msg.received_mono - before >= 1.0
    # From the send (microseconds after ``before``), not from the reply (a second later).
    assert msg.vt_deadline(vt) - vt < before + 0.5


@pytest.mark.anyio
async def test_a_vt_extension_is_counted_from_when_it_was_sent_not_from_its_late_reply(url: str) -> None:
    """The same for the vt keeper: with every reply held for a second, the deadline a running
    step's extension gives it is counted from before the extension went out."""
    reg = HandlerRegistry()

    async def held(ctx: Any, step: Any) -> None:
        ctx.state.running.set()
        await ctx.state.gate.wait()

    reg.register("held", held)
    vt = 4.0
    config = make_config(
        mode="Hybrid",
        namespaces=[NS],
        concurrency=1,
        overrides={
            "event_system.fallback_poller.visibility_timeout": f"{vt:g}s",
            "event_system.fallback_poller.polling_interval": NEVER,
            "worker.handler_timeout": "60s",
        },
    )
    state = types.SimpleNamespace(running=anyio.Event(), gate=anyio.Event())
    async with DatabaseProxy(url) as proxy:
        async with running_worker(proxy.url_through, config, registry=reg, state=state) as worker:
            await send_steps(url, NS, "held", [{}])
            with anyio.fail_after(20):
                await state.running.wait()
            assert worker.processor is not None
            [entry] = worker.processor.held.entries.values()
            extended = counter(worker, "vt_extensions")
            proxy.reply_delay_s = 1.0
            await wait_until(lambda: counter(worker, "vt_extensions") > extended, timeout=20)
            seen = time.monotonic()  # at most a poll (20 ms) after the late reply came in
            proxy.reply_delay_s = 0.0
            # Sent at least a second before its reply came back: the vt runs from there.
            assert entry.vt_deadline - vt < seen - 0.5
            state.gate.set()
            await wait_until(outcomes_at_least(url, 1), timeout=20)
    assert await fetch(url, "SELECT attempts FROM tasker.step_results") == [(1,)]


# --- fences ---------------------------------------------------------------------------------


def contested_registry() -> HandlerRegistry:
    """``contested`` waits for its worker's gate, then does what its worker's state says."""
    reg = HandlerRegistry()

    async def contested(ctx: Any, step: Any) -> str:
        await ctx.state.gate.wait()
        if ctx.state.action == "retry":
            raise RuntimeError("the stale holder failed")
        if ctx.state.action == "dead_letter":
            raise NonRetryableError("the stale holder gives up")
        return str(ctx.state.name)

    reg.register("contested", contested)
    return reg


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("action", "mode"),
    [("succeed", "Hybrid"), ("succeed", "PollingOnly"), ("retry", "Hybrid"), ("dead_letter", "Hybrid")],
)
async def test_a_stale_holder_cannot_write_anything_about_a_step_taken_over(url: str, action: str, mode: str) -> None:
    """Worker A claims a step; its claim lapses (as when A is paused past its vt) and worker B
    claims it again. While B holds it, A's vt extension and then A's outcome (success, retry or
    dead letter) are refused by the read_ct fence and counted; the message is as B left it, and
    B's outcome is the one recorded."""
    reg = contested_registry()
    overrides = {
        # A first tries to extend 2-3 s after its claim: B has that long to start and take over.
        "event_system.fallback_poller.visibility_timeout": "4s",
        "event_system.fallback_poller.polling_interval": NEVER,
        "event_system.fallback_poller.degraded_interval": NEVER,
        "worker.handler_timeout": "30s",
        "retry.max_attempts": 5,
    }
    a_state = types.SimpleNamespace(name="A", action=action, gate=anyio.Event())
    b_state = types.SimpleNamespace(name="B", action="succeed", gate=anyio.Event())
    # A takes the step at startup: the step is there before it starts.
    await send_steps(url, NS, "contested", [{}])
    async with running_worker(
        url, make_config(mode=mode, namespaces=[NS], overrides=overrides), registry=reg, state=a_state
    ) as a:
        await wait_until(lambda: in_flight(a) == 1, timeout=10)
        await fetch(url, f"UPDATE pgmq.q_{QUEUE} SET vt = clock_timestamp() - interval '1 second'")
        b_config = make_config(mode="PollingOnly", namespaces=[NS], overrides=overrides)
        async with running_worker(url, b_config, registry=reg, state=b_state) as b:
            await wait_until(lambda: in_flight(b) == 1, timeout=10)
            assert await fetch_value(url, f"SELECT read_ct FROM pgmq.q_{QUEUE}") == 2
            # A's keeper tries to extend its (lapsed) claim within a second or so: refused.
            await wait_until(lambda: counter(a, "vt_extensions_refused") >= 1, timeout=10)
            headers_before = await fetch_value(url, f"SELECT headers FROM pgmq.q_{QUEUE}")
            a_state.gate.set()
            await wait_until(lambda: counter(a, "stale_acks") == 1, timeout=10)
            # Nothing A wrote went through: the message is B's, untouched, with no outcome.
            [(read_ct, headers)] = await fetch(url, f"SELECT read_ct, headers FROM pgmq.q_{QUEUE}")
            assert (read_ct, headers) == (2, headers_before)
            assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results") == 0
            assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}_dlq") == 0
            for name in ("succeeded", "retried", "dead_lettered", "failed"):
                assert counter(a, name) == 0, name
            b_state.gate.set()
            await wait_until(outcomes_at_least(url, 1), timeout=10)
    [(status, result, attempts, worker_id)] = await fetch(
        url, "SELECT status, result, attempts, worker_id FROM tasker.step_results"
    )
    assert (status, result, attempts, worker_id) == ("succeeded", "B", 2, b.worker_id)
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


# --- backoff --------------------------------------------------------------------------------

#: The documented rule (base * 2**(attempt-1), capped), written out: a test computing it with the
#: code's own function would agree with any rule the code had.
EXPECTED_BACKOFF = {1: 0.5, 2: 1.0}


@pytest.mark.anyio
async def test_a_failed_attempt_stays_invisible_for_its_backoff_attempt_by_attempt(url: str) -> None:
    """With base 0.5 s, no jitter and three attempts, the message of a failing step is put back
    invisible for 0.5 s, then 1 s (its vt in pgmq, read while it waits), and no attempt starts
    before that delay is over, although the worker polls every 50 ms."""
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    config = make_config(
        mode="PollingOnly",
        namespaces=[NS],
        overrides={
            "event_system.fallback_poller.polling_interval": "50ms",
            "retry.max_attempts": 3,
            "retry.base_delay": "500ms",
            "retry.max_delay": "10s",
            "retry.jitter": 0.0,
        },
    )
    waits: list[float] = []
    async with running_worker(url, config, registry=reg, state=types.SimpleNamespace(ledger_url=url)):
        # Fails on attempts 1 and 2 (each failure leaves a ledger-free retry), succeeds on 3.
        [body] = await send_steps(url, NS, "ledger", [{"fail_until": 3}])
        for attempt in (1, 2):
            # Between the retry's write and the next claim: read_ct is the failed attempt's and
            # the error is in the headers; vt minus the failed claim's time is the delay given.
            row = await wait_until(
                lambda a=attempt: fetch(
                    url,
                    f"SELECT extract(epoch FROM vt - clock_timestamp()), extract(epoch FROM vt - last_read_at)"
                    f" FROM pgmq.q_{QUEUE} WHERE read_ct = %s AND headers ? 'tasker_last_error'",
                    (a,),
                ),
                timeout=10,
                interval=0.01,
            )
            waits.append(float(row[0][1]))
        await wait_until(outcomes_at_least(url, 1), timeout=10)
    for attempt, waited in enumerate(waits, start=1):
        assert waited >= EXPECTED_BACKOFF[attempt], (attempt, waits)
    # The claims themselves, on the server's clock: no attempt began before its delay was over.
    claims = await fetch(url, "SELECT attempts, claimed_at, finished_at FROM tasker.step_results")
    assert claims[0][0] == 3
    events = await fetch(
        url,
        "SELECT event_type, (data ->> 'read_ct')::int, occurred_at FROM tasker.event_log"
        " WHERE step_uuid = %s ORDER BY occurred_at",
        (body["step_uuid"],),
    )
    retried = [e for e in events if e[0] == "StepFailed"]  # attempts 1 and 2; the third succeeded
    assert len(retried) == 2, events
    assigned = {e[1]: e[2] for e in events if e[0] == "StepAssigned"}
    for attempt, retry in enumerate(retried, start=1):
        gap = (assigned[attempt + 1] - retry[2]).total_seconds()
        assert gap >= EXPECTED_BACKOFF[attempt] - 0.02, (attempt, gap, events)


# --- dedup ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_every_claim_variant_flags_a_step_already_done(url: str) -> None:
    """The plain claim, the claim leaving handlers alone, the claim leaving messages alone (from
    Python and through ``tasker.claim_steps`` from SQL): each flags a message whose step_uuid
    already has an outcome, so it is settled without running."""
    from tasker_worker.config.models import DatabaseConfig
    from tasker_worker.db.connection import open_pool
    from tasker_worker.db.queue_client import QueueClient
    from tasker_worker.domain.steps import Source

    done = StepMessage.build(NS, "noop")
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO tasker.step_results (step_uuid, namespace, queue_name, msg_id, handler, status,"
            " attempts, worker_id, finished_at, uuid_time) VALUES (%s, %s, %s, 0, 'noop', 'succeeded', 1, 'x', now(),"
            " tasker.uuid_time(%s))",
            (done["step_uuid"], NS, QUEUE, done["step_uuid"]),
        )

        async def resend() -> int:
            cur = await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(done)))
            row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        pool = await open_pool(url, DatabaseConfig(), max_size=1)
        try:
            client = QueueClient(pool)
            variants: dict[str, dict[str, Any]] = {
                "plain": {},
                "skip_handlers": {"skip_handlers": ("charge",)},
                "skip_msgs": {"skip_msgs": (10**9,)},
            }
            for name, kwargs in variants.items():
                msg_id = await resend()
                [claimed] = await client.claim(QUEUE, 30, 10, Source.POLL, worker_id="w", **kwargs)
                assert (claimed.msg_id, claimed.already_done) == (msg_id, True), name
        finally:
            await pool.close()
        for name, args in {"sql": "", "sql_skipping": ", ARRAY['charge']::text[], ARRAY[0]::bigint[]"}.items():
            await resend()
            cur = await conn.execute(f"SELECT already_done FROM tasker.claim_steps(%s, 30, 10, 'w'{args})", (QUEUE,))
            assert await cur.fetchall() == [(True,)], name


@pytest.mark.anyio
async def test_a_resent_step_is_not_run_again_while_a_circuit_is_open(url: str) -> None:
    """With one handler's circuit open, the worker claims with the variant that leaves that
    handler alone; a step re-sent after its outcome is still recognised and not run again."""
    reg = HandlerRegistry()
    reg.register("ledger", ledger)

    async def down(ctx: Any, step: Any) -> None:
        raise DependencyUnavailable("the map service is down")

    reg.register("down", down)
    config = make_config(
        mode="Hybrid",
        namespaces=[NS],
        overrides={
            "circuit_breaker.failure_threshold": 1,
            "circuit_breaker.cooldown": "10m",
            "circuit_breaker.max_cooldown": "10m",
        },
    )
    async with running_worker(url, config, registry=reg, state=types.SimpleNamespace(ledger_url=url)) as worker:
        [body] = await send_steps(url, NS, "ledger", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=10)
        await send_steps(url, NS, "down", [{}])
        await wait_until(lambda: "down" in worker.status()["circuits"], timeout=10)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(body)))
        await wait_until(lambda: counter(worker, "dedup_hits") >= 1, timeout=10)
        hits = counter(worker, "dedup_hits")
    assert hits == 1
    assert await fetch_value(url, "SELECT count(*) FROM public.ledger") == 1
    # The re-sent message is settled; the "down" step waits behind its open circuit.
    rows = await fetch(url, f"SELECT message ->> 'handler' FROM pgmq.q_{QUEUE}")
    assert rows == [("down",)]


# --- exactly-once outcome key -----------------------------------------------------------------


@pytest.mark.anyio
async def test_one_step_run_by_two_workers_at_once_records_and_commits_once(url: str) -> None:
    """The same step_uuid sent twice, each message claimed by a different worker before either
    has an outcome (so the claim's dedup probe cannot help): both run, but the step's outcome
    row is written once, and the writes its handler made in the step's transaction commit once
    (the second run's are rolled back with its refused outcome)."""
    reg = HandlerRegistry()

    async def once(ctx: Any, step: Any) -> str:
        await ctx.state.gate.wait()
        conn = await ctx.transaction()
        await conn.execute(
            "INSERT INTO public.ledger (step_uuid, run_id, attempt, pid) VALUES (%s, %s, %s, 0)",
            (str(step.step_uuid), ctx.state.name, ctx.attempt),
        )
        return str(ctx.state.name)

    reg.register("once", once)
    [body] = [StepMessage.build(NS, "once", {})]
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        for _ in range(2):
            await conn.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(body)))
    # One slot each, no prefetch and no polling: each worker takes exactly one message, at its start.
    config = make_config(
        mode="PollingOnly",
        namespaces=[NS],
        concurrency=1,
        overrides={"event_system.fallback_poller.polling_interval": NEVER, "worker.prefetch": 0},
    )
    a_state = types.SimpleNamespace(name="A", gate=anyio.Event())
    b_state = types.SimpleNamespace(name="B", gate=anyio.Event())
    async with running_worker(url, config, registry=reg, state=a_state) as a:
        await wait_until(lambda: in_flight(a) == 1, timeout=10)
        async with running_worker(url, config, registry=reg, state=b_state) as b:
            await wait_until(lambda: in_flight(b) == 1, timeout=10)
            a_state.gate.set()
            await wait_until(outcomes_at_least(url, 1), timeout=10)
            b_state.gate.set()
            await wait_until(lambda: in_flight(b) == 0, timeout=10)
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0
    assert await fetch(url, "SELECT result, worker_id FROM tasker.step_results") == [("A", a.worker_id)]
    assert await fetch(url, "SELECT run_id FROM public.ledger") == [("A",)]
    assert counter(b, "dedup_hits") == 1 and counter(b, "succeeded") == 0
