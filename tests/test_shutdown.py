"""Shutdown keeps its budget when the database is gone, and loses nothing.

A Hybrid worker at concurrency 16 drains slow steps through a proxy; the database is taken
away mid-drain (stopped: connections cut and refused; or unreachable: connections hang), the
shutdown is requested half a second later, and the worker must be gone within its budget plus
one second. Then the database returns and a second worker finishes every step exactly once.
"""

from __future__ import annotations

import types

import anyio
import psycopg
import pytest
from ledger_handlers import LEDGER_DDL, ledger
from proxy import Cut, DatabaseProxy

from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, make_config, outcomes_at_least, running_worker, send_steps, wait_until

NS = "bye"
BUDGET_S = 2.0
STEPS = 96


@pytest.mark.anyio
@pytest.mark.parametrize("how", [Cut.STOPPED, Cut.UNREACHABLE])
async def test_shutdown_keeps_its_budget_with_the_database_gone(db_url: str, how: Cut) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(LEDGER_DDL)
        conn.execute("SELECT tasker.create_namespace_queue(%s)", (NS,))
    reg = HandlerRegistry()
    reg.register("ledger", ledger)
    state = types.SimpleNamespace(ledger_url=db_url)
    overrides = {
        "worker.shutdown_timeout": f"{BUDGET_S}s",
        "event_system.fallback_poller.visibility_timeout": "3s",
        "database.connect_timeout": "10s",
        "event_system.listener.connection_timeout": "10s",
    }
    config = make_config(mode="Hybrid", namespaces=[NS], concurrency=16, overrides=overrides)
    bodies = await send_steps(db_url, NS, "ledger", [{"sleep": 0.3, "i": i} for i in range(STEPS)], batch=True)
    async with DatabaseProxy(db_url) as proxy:
        async with running_worker(proxy.url_through, config, registry=reg, state=state) as worker:
            await wait_until(outcomes_at_least(db_url, 16), timeout=30)
            proxy.cut(how)
            # SIGTERM once the worker holds finished steps whose results it cannot write.
            await wait_until(lambda: worker.processor is not None and worker.processor.steps.handed_off > 0, timeout=10)
            started = anyio.current_time()
            worker.request_shutdown("SIGTERM")
            with anyio.fail_after(BUDGET_S + 10):
                await worker.stopped.wait()
            took = anyio.current_time() - started
        assert took <= BUDGET_S + 1.0, f"shutdown took {took:.2f}s with a {BUDGET_S}s budget ({how.value})"
    # The database is back: what the first worker could not finish returns at its vt.
    direct = make_config(mode="Hybrid", namespaces=[NS], concurrency=16, overrides=overrides)
    async with running_worker(db_url, direct, registry=reg, state=state):
        await wait_until(outcomes_at_least(db_url, STEPS), timeout=60)
    outcomes = await fetch(db_url, "SELECT step_uuid::text, status FROM tasker.step_results ORDER BY 1")
    assert [o[0] for o in outcomes] == sorted(b["step_uuid"] for b in bodies)
    assert {o[1] for o in outcomes} == {"succeeded"}
    doubled = await fetch(
        db_url, "SELECT step_uuid FROM public.ledger GROUP BY 1 HAVING count(DISTINCT run_id) > 1 LIMIT 5"
    )
    # A step whose run finished but whose outcome write was cut by the deadline runs again
    # (its ledger row, written outside the step's transaction, shows both runs); its outcome is
    # still recorded once. Steps cut mid-run leave no ledger row.
    assert len(doubled) <= 16
    assert await fetch(db_url, f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue") == [(0,)]


@pytest.mark.anyio
async def test_a_sync_handler_running_at_shutdown_keeps_its_message_until_its_vt(db_url: str) -> None:
    """A sync handler runs in a thread, which cancelling its task does not stop: at shutdown its
    message is left to return at its vt, not given back at once (a peer would run the step while
    the thread here still did). An async handler's message is given back (test_runtime)."""
    import threading

    started, gate = threading.Event(), threading.Event()

    def blocking(ctx: object, step: object) -> None:
        started.set()
        gate.wait(30)

    reg = HandlerRegistry()
    reg.register("blocking", blocking)
    config = make_config(
        mode="Hybrid", namespaces=[NS], overrides={"worker.shutdown_timeout": "500ms", "worker.prefetch": 0}
    )
    try:
        async with running_worker(db_url, config, registry=reg):
            await send_steps(db_url, NS, "blocking", [{}])
            await wait_until(started.is_set, timeout=15)
        rows = await fetch(db_url, f"SELECT vt > clock_timestamp(), read_ct FROM pgmq.q_worker_{NS}_queue")
        assert rows == [(True, 1)], rows  # still claimed: it returns at its vt, its attempt counted
        released = await fetch(db_url, "SELECT count(*) FROM tasker.events WHERE data->>'reason' = 'shutdown'")
        assert released == [(0,)]
    finally:
        gate.set()
