"""Fewer notifications at many producers (migration 0020), against a real PostgreSQL: a send is
not announced while every listening worker drains its namespace, or when the namespace's
notifications are off; and nothing is stranded for it in any mode. A producer that skipped holds
back a worker's end of drain until it commits, then that worker claims its step; a quiet
namespace is polled even by an EventDrivenOnly worker."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import types
from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest
from listening import notifications_so_far
from psycopg.types.json import Jsonb

from tasker_worker.db.connection import open_pool
from tasker_worker.db.queue_client import QueueClient
from tasker_worker.domain.names import queue_name
from tasker_worker.domain.steps import StepMessage
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.runtime import drains
from tasker_worker.runtime.stats import WorkerStats
from tasker_worker.testing import make_config
from tasker_worker.testing.db import fetch, fetch_value, outcomes_at_least, running_worker, send_steps, wait_until

NS = "quietly"
QUEUE = queue_name(NS)
CHANNEL = f"pgmq_message_ready.{NS}"
Conn = psycopg.Connection[Any]


def listen(url: str) -> Conn:
    conn = psycopg.connect(url, autocommit=True)
    conn.execute(f'LISTEN "{CHANNEL}"')
    conn.execute('LISTEN "pgmq_message_ready"')
    return conn


def announced(conn: Conn) -> list[dict[str, Any]]:
    """The step wakeups of NS committed so far (both channels)."""
    return [
        json.loads(n.payload)
        for n in notifications_so_far(conn)
        if n.channel in (CHANNEL, "pgmq_message_ready") and json.loads(n.payload).get("namespace") == NS
    ]


def send(conn: Conn, delay: int = 0) -> int:
    return int(conn.execute("SELECT pgmq.send(%s, '{}', %s)", (QUEUE, delay)).fetchone()[0])  # type: ignore[index]


def drain_by(conn: Conn, *workers: str) -> None:
    """``workers`` listen for NS and drain it (as their claim loops do after a full claim)."""
    for worker in workers:
        conn.execute("SELECT * FROM tasker.keep_listening(%s, %s, 60)", (worker, [NS]))
        conn.execute("SELECT tasker.take_drain(%s, %s, 60, 60)", (NS, worker))


# --- the trigger's rule -----------------------------------------------------------------------


def test_no_notification_while_every_listening_worker_drains(url: str, conn: Conn) -> None:
    drain_by(conn, "w1", "w2")
    with listen(url) as lc:
        send(conn)
        conn.execute("SELECT pgmq.send_batch(%s, ARRAY['{}', '{}']::jsonb[])", (QUEUE,))
        conn.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) VALUES (now(), '{{}}')")
        assert announced(lc) == []
        # One of them stops draining: from that commit on, every send is announced again.
        conn.execute("SELECT tasker.end_drain(%s, 'w2')", (NS,))
        msg_id = send(conn)
        assert [(p["msg_id"], p["namespace"]) for p in announced(lc)] == [(msg_id, NS), (msg_id, NS)]


@pytest.mark.parametrize(
    "other",
    [
        "an idle listener",  # it must hear of new steps: its pickup latency is unchanged
        "a lapsed lease",  # a worker that died while draining
        "nobody listening",  # only a dead worker's row (a tasker-core or psql listener is unknown)
    ],
)
def test_a_send_is_announced_unless_every_live_listener_drains(url: str, conn: Conn, other: str) -> None:
    if other == "an idle listener":
        drain_by(conn, "w1")
        conn.execute("SELECT * FROM tasker.keep_listening('w2', %s, 60)", ([NS],))
    elif other == "a lapsed lease":
        drain_by(conn, "w1")
        conn.execute("UPDATE tasker.queue_listeners SET draining_until = clock_timestamp() - interval '1 ms'")
    else:
        drain_by(conn, "w1")
        conn.execute("UPDATE tasker.queue_listeners SET alive_until = clock_timestamp() - interval '1 ms'")
    with listen(url) as lc:
        msg_id = send(conn)
        assert [p["msg_id"] for p in announced(lc)] == [msg_id, msg_id]


def test_a_dead_listener_does_not_keep_the_others_from_skipping(url: str, conn: Conn) -> None:
    drain_by(conn, "w1")
    conn.execute("SELECT * FROM tasker.keep_listening('dead', %s, 60)", ([NS],))
    conn.execute(
        "UPDATE tasker.queue_listeners SET alive_until = clock_timestamp() - interval '1 ms' WHERE worker_id = 'dead'"
    )
    with listen(url) as lc:
        send(conn)
        assert announced(lc) == []


def test_a_delayed_send_and_a_repeatable_read_producer_are_announced(url: str, conn: Conn) -> None:
    """A delayed message's notification says when to come back, which no drain knows; a producer
    whose snapshot is older than its lock cannot see a lease released meanwhile."""
    drain_by(conn, "w1")
    with listen(url) as lc, psycopg.connect(url) as rr:
        delayed = send(conn, delay=30)
        rr.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        repeatable = send(rr)
        rr.commit()
        assert sorted(p["msg_id"] for p in announced(lc)) == sorted([delayed, delayed, repeatable, repeatable])


def test_a_producer_that_skipped_holds_back_the_end_of_the_drain_until_it_commits(url: str, conn: Conn) -> None:
    """The handshake: a worker ending its drain releases its lease, then waits for every
    producer that skipped while the lease was visible (tasker.await_skipped_sends), so that its
    last claim sees their steps."""
    drain_by(conn, "w1")
    with listen(url) as lc, psycopg.connect(url) as producer:
        skipped = send(producer)  # its transaction stays open
        conn.execute("SELECT tasker.end_drain(%s, 'w1')", (NS,))
        after = send(conn)  # the lease is gone: announced
        assert conn.execute("SELECT tasker.await_skipped_sends(%s, 50)", (NS,)).fetchone() == (False,)
        producer.commit()
        assert conn.execute("SELECT tasker.await_skipped_sends(%s, 50)", (NS,)).fetchone() == (True,)
        # What a claim now sees: the skipped step too.
        ready = {r[0] for r in conn.execute(f"SELECT msg_id FROM pgmq.q_{QUEUE} WHERE vt <= clock_timestamp()")}
        assert {skipped, after} <= ready
        assert [p["msg_id"] for p in announced(lc)] == [after, after]


def test_a_producer_never_waits_for_a_worker_at_the_handshake(url: str, conn: Conn) -> None:
    """While a worker holds (or waits for) the namespace's lock, producers notify instead of
    skipping: they never wait for it."""
    drain_by(conn, "w1")
    holder = psycopg.connect(url)
    try:
        holder.execute("SELECT pg_advisory_xact_lock(tasker.skip_lock_class(), hashtext(%s))", (NS,))
        done = threading.Event()
        got: list[int] = []

        def produce() -> None:
            with psycopg.connect(url, autocommit=True) as p:
                p.execute("SET lock_timeout = '3s'")
                got.append(send(p))
            done.set()

        with listen(url) as lc:
            t = threading.Thread(target=produce)
            t.start()
            assert done.wait(10), "the producer waited for the worker's lock"
            t.join()
            assert [p["msg_id"] for p in announced(lc)] == [got[0], got[0]]
    finally:
        holder.close()


def test_notify_false_silences_a_namespace_and_says_who_did_it(url: str, conn: Conn) -> None:
    with listen(url) as lc:
        assert conn.execute("SELECT tasker.set_queue_notify(%s, false, 'ops')", (NS,)).fetchone() == (True,)
        assert conn.execute("SELECT tasker.set_queue_notify(%s, false, 'ops')", (NS,)).fetchone() == (False,)
        send(conn)
        conn.execute("SELECT pgmq.send_batch(%s, ARRAY['{}', '{}']::jsonb[])", (QUEUE,))
        # Only the announcement of the change (listening workers re-read the switch at once).
        assert [(p["message_count"], p.get("msg_id")) for p in announced(lc)] == [(0, None)]
        assert conn.execute("SELECT tasker.set_queue_notify(%s, true, 'ops')", (NS,)).fetchone() == (True,)
        assert conn.execute("SELECT count(*) FROM tasker.queue_notify").fetchone() == (0,)
        msg_id = send(conn)
        assert [p.get("msg_id") for p in announced(lc)] == [None, msg_id, msg_id]
    events = conn.execute(
        "SELECT data ->> 'notify', data ->> 'by' FROM tasker.events WHERE event_type = 'QueueNotifyChanged' ORDER BY event_id"
    ).fetchall()
    assert events == [("false", "ops"), ("true", "ops")]


def test_keep_listening_reports_the_switches_and_keeps_only_its_namespaces(conn: Conn) -> None:
    conn.execute("SELECT tasker.set_queue_notify('beta', false)")
    rows = conn.execute("SELECT namespace, notify FROM tasker.keep_listening('w1', ARRAY['alpha', 'beta'], 60)")
    assert sorted(rows) == [("alpha", True), ("beta", False)]
    conn.execute("SELECT * FROM tasker.keep_listening('w1', ARRAY['alpha'], 60)")
    assert conn.execute("SELECT namespace FROM tasker.queue_listeners").fetchall() == [("alpha",)]
    conn.execute("SELECT tasker.stop_listening('w1')")
    assert conn.execute("SELECT count(*) FROM tasker.queue_listeners").fetchone() == (0,)


# --- the decision row and the trigger's shape (0024) -------------------------------------------


def decision(conn: Conn) -> tuple[bool, bool] | None:
    """NS's row of tasker.notify_decisions: ``(quiet, skipping now)``; None: no row (announce)."""
    row = conn.execute(
        "SELECT quiet, coalesce(skip_until > clock_timestamp(), false) FROM tasker.notify_decisions WHERE namespace = %s",
        (NS,),
    ).fetchone()
    return None if row is None else (bool(row[0]), bool(row[1]))


def test_the_decision_row_follows_every_change_of_the_listeners_and_the_switch(conn: Conn) -> None:
    """What the trigger reads is kept by the writes of tasker.queue_listeners and
    tasker.queue_notify themselves, in their transactions, however they are made."""
    assert decision(conn) is None  # nobody listens: announce
    conn.execute("SELECT * FROM tasker.keep_listening('w1', %s, 60)", ([NS],))
    assert decision(conn) is None  # an idle listener: announce
    conn.execute("SELECT tasker.take_drain(%s, 'w1', 60, 60)", (NS,))
    assert decision(conn) == (False, True)
    conn.execute("SELECT * FROM tasker.keep_listening('w2', %s, 60)", ([NS],))
    assert decision(conn) is None  # a new idle listener must hear of new steps
    conn.execute("SELECT tasker.take_drain(%s, 'w2', 60, 60)", (NS,))
    assert decision(conn) == (False, True)
    conn.execute("SELECT tasker.end_drain(%s, 'w2')", (NS,))
    assert decision(conn) is None
    # w2 dies (its row made dead by hand): only w1, draining, counts.
    conn.execute(
        "UPDATE tasker.queue_listeners SET alive_until = clock_timestamp() - interval '1 ms' WHERE worker_id = 'w2'"
    )
    assert decision(conn) == (False, True)
    conn.execute("SELECT tasker.set_queue_notify(%s, false, 'ops')", (NS,))
    assert decision(conn) == (True, True)
    conn.execute("SELECT tasker.set_queue_notify(%s, true, 'ops')", (NS,))
    assert decision(conn) == (False, True)
    conn.execute("DELETE FROM tasker.queue_listeners WHERE worker_id = 'w1'")
    assert decision(conn) is None
    conn.execute("SELECT tasker.take_drain(%s, 'w3', 60, 60)", (NS,))
    assert decision(conn) == (False, True)
    conn.execute("TRUNCATE tasker.queue_listeners")
    assert decision(conn) is None


def test_a_heartbeat_of_a_draining_worker_writes_no_decision(conn: Conn) -> None:
    """Renewing a listener's alive_until changes no decision, so its heartbeat (every few
    seconds, every namespace) leaves the row alone: idle cost stays flat."""
    drain_by(conn, "w1")
    before = conn.execute("SELECT xmin::text FROM tasker.notify_decisions WHERE namespace = %s", (NS,)).fetchone()
    conn.execute("SELECT * FROM tasker.keep_listening('w1', %s, 60)", ([NS],))
    after = conn.execute("SELECT xmin::text FROM tasker.notify_decisions WHERE namespace = %s", (NS,)).fetchone()
    assert before is not None and after == before
    conn.execute("SELECT tasker.take_drain(%s, 'w1', 60, 60)", (NS,))  # a renewed lease moves skip_until
    moved = conn.execute("SELECT xmin::text FROM tasker.notify_decisions WHERE namespace = %s", (NS,)).fetchone()
    assert moved != before


def test_a_skipped_send_runs_no_trigger_function(url: str, conn: Conn) -> None:
    """The decision is the trigger's WHEN: a send that is not announced never enters PL/pgSQL
    (whose per-transaction set-up was most of the rule's price)."""
    conn.execute("SET track_functions = 'all'")
    calls_sql = (
        "SELECT coalesce(sum(calls), 0) FROM pg_stat_user_functions"
        " WHERE schemaname = 'tasker' AND funcname = 'notify_message_ready'"
    )

    def calls() -> int:
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(conn.execute(calls_sql).fetchone()[0])  # type: ignore[index]

    drain_by(conn, "w1")
    start = calls()
    for _ in range(5):
        send(conn)
    assert calls() == start
    conn.execute("SELECT tasker.end_drain(%s, 'w1')", (NS,))
    send(conn)
    assert calls() == start + 1


def test_a_delayed_send_is_announced_and_a_later_one_in_its_transaction_still_skips(url: str, conn: Conn) -> None:
    drain_by(conn, "w1")
    with listen(url) as lc, psycopg.connect(url) as tx:
        delayed = send(tx, delay=30)
        later = send(tx)
        tx.commit()
        assert [p["msg_id"] for p in announced(lc)] == [delayed, delayed]
        assert later > delayed


def plain_trigger(conn: Conn) -> None:
    """NS's queue with the notify trigger of before 0024 (no WHEN, no delayed-row trigger)."""
    conn.execute(f"DROP TRIGGER tasker_notify_message_ready ON pgmq.q_{QUEUE}")
    conn.execute(f"DROP TRIGGER tasker_mark_delayed_send ON pgmq.q_{QUEUE}")
    conn.execute(
        f"CREATE TRIGGER tasker_notify_message_ready AFTER INSERT ON pgmq.q_{QUEUE} "
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION tasker.notify_message_ready()"
    )


def trigger_shape(conn: Conn) -> list[str]:
    return sorted(
        r[0]
        for r in conn.execute(
            "SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal",
            (f"pgmq.q_{QUEUE}",),
        )
    )


def test_a_trigger_of_the_older_shape_keeps_the_rule_until_it_is_replaced(url: str, conn: Conn) -> None:
    """A queue whose trigger the upgrade could not replace yet decides in the function, with the
    same rule; the next tasker.ensure_notify_triggers() gives it the new shape."""
    current = trigger_shape(conn)
    assert any("WHEN (tasker.notify_wanted('quietly'::text))" in t for t in current)
    plain_trigger(conn)
    drain_by(conn, "w1")
    with listen(url) as lc:
        send(conn)
        delayed = send(conn, delay=30)
        assert [p["msg_id"] for p in announced(lc)] == [delayed, delayed]
        conn.execute("SELECT tasker.set_queue_notify(%s, false)", (NS,))
        announced(lc)  # the switch's own announcement
        conn.execute("SELECT tasker.end_drain(%s, 'w1')", (NS,))
        send(conn, delay=30)
        assert announced(lc) == []
    assert conn.execute("SELECT tasker.ensure_notify_triggers()").fetchone() == (0,)  # replaced, not new
    assert trigger_shape(conn) == current


def test_replacing_a_trigger_gives_up_rather_than_hold_up_producers(url: str, conn: Conn) -> None:
    """The replacement needs the queue table's lock; behind a long transaction it waits at most
    tasker.trigger_lock_timeout_ms() (producers queue behind a waiting lock) and tries again at
    the next tasker.ensure_notify_triggers()."""
    plain_trigger(conn)
    old = trigger_shape(conn)
    with psycopg.connect(url) as holder:
        holder.execute(f"INSERT INTO pgmq.q_{QUEUE} (vt, message) VALUES (now(), '{{}}')")  # its lock stays
        conn.execute("SET statement_timeout = '10s'")
        assert conn.execute("SELECT tasker.ensure_notify_triggers()").fetchone() == (0,)
        assert trigger_shape(conn) == old
        holder.rollback()
    conn.execute("SELECT tasker.ensure_notify_triggers()")
    assert any("WHEN (tasker.notify_wanted('quietly'::text))" in t for t in trigger_shape(conn))


def test_a_role_that_may_only_send_evaluates_the_decision(url: str, conn: Conn) -> None:
    """Every role that may insert into a queue runs the trigger's WHEN: it needs no grant of ours."""
    conn.execute("DROP ROLE IF EXISTS plain_sender")
    conn.execute("CREATE ROLE plain_sender LOGIN")
    try:
        conn.execute("GRANT USAGE ON SCHEMA pgmq TO plain_sender")
        conn.execute(f"GRANT SELECT, INSERT ON pgmq.q_{QUEUE} TO plain_sender")
        conn.execute(f"GRANT USAGE ON SEQUENCE pgmq.q_{QUEUE}_msg_id_seq TO plain_sender")
        conn.execute("GRANT EXECUTE ON FUNCTION pgmq.send(text, jsonb, integer) TO plain_sender")
        drain_by(conn, "w1")
        info = psycopg.conninfo.conninfo_to_dict(url)
        info["user"] = "plain_sender"
        with listen(url) as lc, psycopg.connect(**info, autocommit=True) as sender:  # type: ignore[arg-type]
            send(sender)
            assert announced(lc) == []
            conn.execute("SELECT tasker.end_drain(%s, 'w1')", (NS,))
            msg_id = send(sender)
            assert [p["msg_id"] for p in announced(lc)] == [msg_id, msg_id]
    finally:
        conn.execute(f"REVOKE ALL ON pgmq.q_{QUEUE} FROM plain_sender")
        conn.execute(f"REVOKE ALL ON SEQUENCE pgmq.q_{QUEUE}_msg_id_seq FROM plain_sender")
        conn.execute("REVOKE ALL ON FUNCTION pgmq.send(text, jsonb, integer) FROM plain_sender")
        conn.execute("REVOKE ALL ON SCHEMA pgmq FROM plain_sender")
        conn.execute("DROP ROLE plain_sender")


# --- the workers ------------------------------------------------------------------------------


def gated_registry() -> HandlerRegistry:
    """``gated``: waits for ``state.gate``; ``quick``: returns at once."""
    reg = HandlerRegistry()

    async def gated(ctx: Any, step: Any) -> None:
        await ctx.state.gate.wait()

    async def quick(ctx: Any, step: Any) -> None:
        return None

    reg.register("gated", gated)
    reg.register("quick", quick)
    return reg


async def lease_of(url: str, worker_id: str) -> tuple[bool, bool] | None:
    """``(alive, draining)`` of a worker's row for NS (None: it has none)."""
    rows = await fetch(
        url,
        "SELECT alive_until > clock_timestamp(), coalesce(draining_until > clock_timestamp(), false)"
        " FROM tasker.queue_listeners WHERE namespace = %s AND worker_id = %s",
        (NS, worker_id),
    )
    return rows[0] if rows else None


def lease_is(url: str, worker_id: str, expected: tuple[bool, bool]) -> Any:
    """A predicate for ``wait_until``: the worker's row for NS is ``(alive, draining)``."""

    async def check() -> bool:
        return await lease_of(url, worker_id) == expected

    return check


@pytest.mark.anyio
async def test_a_step_enqueued_while_the_lease_is_held_was_unannounced_on_purpose(url: str) -> None:
    """The missed-wakeup check of a step claimed while this worker's drain lease is held (its
    span still open, ending at ``OPEN``): sent within the lease, it was left unannounced on
    purpose; sent long before, it was not. The open span must be answerable: a margin added to
    its end overflowed, and the claim loop that asked died with the worker."""
    config = make_config(namespaces=[NS])
    pool = await open_pool(url, config.database, max_size=2)
    try:
        mine = drains.Drains(
            drains.DrainSettings("w-open-span", renew_s=30.0, poll_s=5.0, timeout_s=10.0),
            client=QueueClient(pool),
            queues=[QUEUE],
            wake=lambda queue, source: None,
            stats=WorkerStats(),
            listens=lambda: True,
        )
        await mine.draining(QUEUE)
        assert await lease_of(url, "w-open-span") == (True, True)
        now = await fetch_value(url, "SELECT clock_timestamp()")
        assert mine.may_be_unannounced(QUEUE, now)
        assert not mine.may_be_unannounced(QUEUE, now - timedelta(hours=1))
    finally:
        await pool.close()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["EventDrivenOnly", "Hybrid"])
async def test_a_step_whose_notification_was_skipped_is_picked_up_when_the_drain_ends(url: str, mode: str) -> None:
    """The race the handshake closes: a step sent while the worker drains (not announced) whose
    transaction commits only after the worker's last claim of that drain came back short. Without
    the handshake nothing would wake the worker for it (EventDrivenOnly has no poll; Hybrid's is a
    minute away here). It is picked up within a moment of its commit, and counts as no missed
    wakeup."""
    state = types.SimpleNamespace(gate=anyio.Event())
    cfg = make_config(
        mode=mode,
        namespaces=[NS],
        concurrency=2,
        overrides={"worker.prefetch": 0, "event_system.fallback_poller.polling_interval": "60s"},
    )
    async with running_worker(url, cfg, registry=gated_registry(), state=state) as worker:
        await wait_until(lambda: lease_of(url, worker.worker_id), timeout=10)
        await send_steps(url, NS, "gated", [{"i": i} for i in range(4)], batch=True)
        # Two run, two wait: its claim came back full, so it drains (and holds a lease).
        await wait_until(lease_is(url, worker.worker_id, (True, True)), timeout=10)
        late = StepMessage.build(NS, "quick", {})
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as lc:
            await lc.execute(f'LISTEN "{CHANNEL}"')
            async with await psycopg.AsyncConnection.connect(url) as producer:
                await producer.execute("SELECT pgmq.send(%s, %s)", (QUEUE, Jsonb(late)))  # not announced
                state.gate.set()
                # The four finish, the queue looks empty (the late step is not committed), the
                # drain ends and the worker waits for the producer that skipped.
                await wait_until(outcomes_at_least(url, 4), timeout=20)
                await wait_until(lambda: worker.status()["counters"]["skipped_sends_awaited"] > 0, timeout=10)
                assert await lease_of(url, worker.worker_id) == (True, False)
                await producer.commit()
            with anyio.fail_after(5):  # Hybrid's poll is 60 s away; EventDrivenOnly has none
                await wait_until(outcomes_at_least(url, 5), timeout=5)
            await lc.execute("SELECT pg_notify('tasker_test_sentinel', '')")
            await lc.execute('LISTEN "tasker_test_sentinel"')
            await lc.execute("SELECT pg_notify('tasker_test_sentinel', '')")
            wakeups = []
            async for n in lc.notifies(timeout=10):
                if n.channel == "tasker_test_sentinel":
                    break
                wakeups.append(json.loads(n.payload))
        assert [w.get("msg_id") for w in wakeups] == []  # the late step was never announced
        counters = worker.status()["counters"]
        assert counters["missed_wakeups"] == 0 and counters["drains"] >= 1
    assert await fetch_value(url, "SELECT count(*) FROM tasker.step_results WHERE status = 'succeeded'") == 5
    # It left: its rows went with it.
    assert await fetch_value(url, "SELECT count(*) FROM tasker.queue_listeners") == 0


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["EventDrivenOnly", "Hybrid"])
async def test_a_busy_worker_finds_unannounced_steps_by_claiming_again(
    url: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps that arrive faster than one claim each make the worker busy: it claims again every
    BUSY_INTERVAL_S holding its lease, so sends are not announced, and each is still picked up at
    once (EventDrivenOnly has no poll; Hybrid's is a minute away here). The linger is stretched
    so that the worker stays busy for the whole test."""
    monkeypatch.setattr(drains, "BUSY_LINGER_S", 60.0)
    monkeypatch.setattr(drains, "BUSY_INTERVAL_S", 0.02)
    cfg = make_config(
        mode=mode,
        namespaces=[NS],
        concurrency=8,
        overrides={"worker.prefetch": 0, "event_system.fallback_poller.polling_interval": "60s"},
    )
    async with running_worker(url, cfg, registry=gated_registry()) as worker:
        await wait_until(lambda: lease_of(url, worker.worker_id), timeout=10)
        await send_steps(url, NS, "quick", [{"i": i} for i in range(3)], batch=True)  # one claim finds three
        await wait_until(lease_is(url, worker.worker_id, (True, True)), timeout=10)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as lc:
            await lc.execute(f'LISTEN "{CHANNEL}"')
            for n in range(3):
                await send_steps(url, NS, "quick", [{"n": n}])
                with anyio.fail_after(5):
                    await wait_until(outcomes_at_least(url, 4 + n), timeout=5)
            await lc.execute('LISTEN "tasker_test_sentinel"')
            await lc.execute("SELECT pg_notify('tasker_test_sentinel', '')")
            wakeups = []
            async for note in lc.notifies(timeout=10):
                if note.channel == "tasker_test_sentinel":
                    break
                wakeups.append(json.loads(note.payload))
        assert wakeups == []  # none of the three was announced
        assert worker.status()["counters"]["missed_wakeups"] == 0
    # The first three by their notification, the next three by the busy worker's own claims.
    assert sorted(await fetch(url, "SELECT source, count(*) FROM tasker.step_results GROUP BY 1")) == [
        ("event", 3),
        ("poll", 3),
    ]


@pytest.mark.anyio
async def test_an_idle_worker_is_woken_while_another_drains(url: str) -> None:
    """Two listening workers: one drains (its steps wait), the other is idle. Sends are announced
    (the idle one must hear of them), and the idle one runs them at once."""
    busy_state = types.SimpleNamespace(gate=anyio.Event())
    base = {"worker.prefetch": 0, "event_system.fallback_poller.polling_interval": "60s"}
    cfg = make_config(mode="EventDrivenOnly", namespaces=[NS], concurrency=1, overrides=base)
    async with running_worker(url, cfg, registry=gated_registry(), state=busy_state) as busy:
        await wait_until(lambda: lease_of(url, busy.worker_id), timeout=10)
        await send_steps(url, NS, "gated", [{"i": i} for i in range(3)], batch=True)
        await wait_until(lease_is(url, busy.worker_id, (True, True)), timeout=10)
        idle_cfg = make_config(mode="EventDrivenOnly", namespaces=[NS], concurrency=4, overrides=base)
        async with running_worker(url, idle_cfg, registry=gated_registry(), state=busy_state) as idle:
            await wait_until(lease_is(url, idle.worker_id, (True, False)), timeout=10)
            before = await fetch_value(url, "SELECT count(*) FROM tasker.step_results")
            await send_steps(url, NS, "quick", [{"n": n} for n in range(3)])
            await wait_until(outcomes_at_least(url, before + 3), timeout=5)
            # The busy one has no free slot: the idle one ran them, woken by their notifications
            # (EventDrivenOnly: nothing polls).
            ran = await fetch(url, "SELECT DISTINCT worker_id FROM tasker.step_results WHERE handler = 'quick'")
            assert ran == [(idle.worker_id,)]
            busy_state.gate.set()
            await wait_until(outcomes_at_least(url, before + 6), timeout=20)


@pytest.mark.anyio
async def test_a_quiet_namespace_is_polled_by_an_event_driven_worker(url: str) -> None:
    """``[queues.namespaces.<ns>] notify = false``: the worker writes the switch at start, its
    sends are not announced, and an EventDrivenOnly worker (no poller) still finds them, by
    polling that namespace every polling_interval. Turned on again from SQL, the worker hears of
    it at once and sends are announced again."""
    cfg = make_config(
        mode="EventDrivenOnly",
        namespaces=[NS],
        overrides={f"queues.namespaces.{NS}.notify": False, "event_system.fallback_poller.polling_interval": "200ms"},
    )
    async with running_worker(url, cfg, registry=gated_registry()) as worker:
        assert await fetch(url, "SELECT notify, changed_by FROM tasker.queue_notify") == [
            (False, f"worker {worker.worker_id}")
        ]
        await wait_until(lambda: worker.processor is not None and worker.processor.drains.quiet == {QUEUE}, timeout=10)
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as lc:
            await lc.execute(f'LISTEN "{CHANNEL}"')
            await send_steps(url, NS, "quick", [{"n": n} for n in range(3)])
            await wait_until(outcomes_at_least(url, 3), timeout=10)
            await lc.execute('LISTEN "tasker_test_sentinel"')
            await lc.execute("SELECT pg_notify('tasker_test_sentinel', '')")
            got = []
            async for n in lc.notifies(timeout=10):
                if n.channel == "tasker_test_sentinel":
                    break
                got.append(n)
            assert got == []
        assert {r[0] for r in await fetch(url, "SELECT source FROM tasker.step_results")} == {"poll"}
        await fetch(url, "SELECT tasker.set_queue_notify(%s, true, 'ops')", (NS,))
        await wait_until(lambda: worker.processor is not None and not worker.processor.drains.quiet, timeout=10)
        await send_steps(url, NS, "quick", [{}])
        await wait_until(outcomes_at_least(url, 4), timeout=10)
        assert worker.status()["counters"]["missed_wakeups"] == 0
    assert await fetch(url, "SELECT source FROM tasker.step_results ORDER BY finished_at DESC LIMIT 1") == [("event",)]


@pytest.mark.anyio
async def test_a_polling_only_worker_keeps_no_listener_row(url: str) -> None:
    """A PollingOnly worker hears no notification: it must not count among the listeners."""
    cfg = make_config(mode="PollingOnly", namespaces=[NS])
    async with running_worker(url, cfg, registry=gated_registry()):
        await send_steps(url, NS, "quick", [{} for _ in range(20)], batch=True)
        await wait_until(outcomes_at_least(url, 20), timeout=20)
        assert await fetch_value(url, "SELECT count(*) FROM tasker.queue_listeners") == 0


def test_the_cli_turns_a_namespace_s_notifications_off_and_on(url: str, cli_env: dict[str, str]) -> None:
    def cli(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tasker_worker.cli.main", "queue", "notify", *args],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert cli(NS) == f"{NS}: notify on"
    assert cli(NS, "off").startswith(f"{NS}: notify off")
    assert "off already" in cli(NS, "off")
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT notify, changed_by LIKE 'cli%%' FROM tasker.queue_notify").fetchall() == [
            (False, True)
        ]
    assert cli(NS, "on") == f"{NS}: notify on"
