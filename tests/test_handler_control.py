"""Handlers in control (issue 34), against a real PostgreSQL: snooze, cancelling a running step
from another process, progress seen from another process, middleware, unique windows. Each test
fails without the mechanism it names (``tests/mutations.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest

from tasker_worker.domain.names import queue_name
from tasker_worker.errors import Snooze
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.producer.client import AsyncClient
from tasker_worker.testing import make_config
from tasker_worker.testing.db import fetch, fetch_value, outcomes_at_least, running_worker, send_steps, wait_until

NS = "ctl"
QUEUE = queue_name(NS)
REPO = Path(__file__).resolve().parent.parent


def config(**overrides: Any) -> Any:
    return make_config(mode="Hybrid", namespaces=[NS], overrides=overrides)


def cli_env(url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER")}
    env.update(TASKER_DATABASE_URL=url, TASKER_CONFIG_DIR=str(REPO / "config"), TASKER_ENV="test", HOME=str(tmp_path))
    return env


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """A ``tasker-worker`` command in a process of its own."""
    return await anyio.run_process([sys.executable, "-m", "tasker_worker.cli.main", *args], env=env, check=False)


@pytest.mark.anyio
async def test_a_snoozed_step_reruns_after_its_delay_with_its_attempt_unchanged(url: str) -> None:
    runs: list[tuple[int, float]] = []
    reg = HandlerRegistry()

    @reg.handler("poll_service")
    async def poll_service(ctx: Any, step: Any) -> str:
        runs.append((ctx.attempt, anyio.current_time()))
        if len(runs) == 1:
            raise Snooze("1s")  # the service is not ready yet
        if len(runs) == 2:
            return ctx.snooze(0.5)  # the other spelling
        return "ready"

    async with running_worker(url, config(), registry=reg):
        await send_steps(url, NS, "poll_service", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=20)
    assert [attempt for attempt, _ in runs] == [1, 1, 1]
    assert runs[1][1] - runs[0][1] >= 1.0 and runs[2][1] - runs[1][1] >= 0.5
    row = await fetch(url, "SELECT status, result, attempts FROM tasker.step_results")
    assert row == [("succeeded", "ready", 1)]
    failures = await fetch_value(url, "SELECT count(*) FROM tasker.events WHERE event_type LIKE 'StepFailed%%'")
    assert failures == 0


@pytest.mark.anyio
async def test_max_snoozes_bounds_a_step_that_always_snoozes(url: str) -> None:
    reg = HandlerRegistry()

    @reg.handler("never_ready", max_snoozes=2)
    async def never_ready(ctx: Any, step: Any) -> Any:
        return ctx.snooze("10ms")

    async with running_worker(url, config(), registry=reg):
        await send_steps(url, NS, "never_ready", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=20)
    row = await fetch(url, "SELECT status, error->>'reason', attempts FROM tasker.step_results")
    assert row == [("failed", "too_many_snoozes", 1)]


@pytest.mark.anyio
async def test_a_running_async_step_cancelled_from_another_process_stops_within_its_grace(
    url: str, tmp_path: Path
) -> None:
    """Cancelled with `tasker-worker steps cancel` while its handler ignores ``ctx.cancelled``:
    the handler is cancelled after the grace, its transaction rolls back, and the outcome says
    cancelled and who asked."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.writes (step text)")
    started = anyio.Event()
    reg = HandlerRegistry()

    @reg.handler("stubborn", timeout="60s")
    async def stubborn(ctx: Any, step: Any) -> None:
        tx = await ctx.transaction()
        await tx.execute("INSERT INTO public.writes VALUES (%s)", (str(step.step_uuid),))
        started.set()
        await anyio.sleep(60)  # does not look at ctx.cancelled

    async with running_worker(url, config(**{"worker.cancel_grace": "500ms"}), registry=reg):
        async with AsyncClient(url) as client:
            ref = await client.send_step(NS, "stubborn", {}, step_uuid="6b2f0c2e-0000-4000-8000-000000000001")
        with anyio.fail_after(20):
            await started.wait()
        asked = await cli(cli_env(url, tmp_path), "steps", "cancel", str(ref.step_uuid), "--by", "ops:alice")
        assert asked.returncode == 0, asked.stderr
        assert b"asked to stop" in asked.stdout
        began = anyio.current_time()
        await wait_until(outcomes_at_least(url, 1), timeout=20)
        assert anyio.current_time() - began < 10  # within the grace, not the handler's 60 s
    row = await fetch(url, "SELECT status, error->>'by', error->>'reason' FROM tasker.step_results")
    assert row == [("cancelled", "ops:alice", "cancelled")]
    assert await fetch_value(url, "SELECT count(*) FROM public.writes") == 0  # rolled back
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 0


@pytest.mark.anyio
async def test_a_sync_step_sees_ctx_cancelled_and_is_recorded_cancelled_when_it_returns(url: str) -> None:
    proceed = threading.Event()
    seen: list[bool] = []
    reg = HandlerRegistry()

    @reg.handler("crunch", timeout="60s")
    def crunch(ctx: Any, step: Any) -> str:
        proceed.wait(30)
        seen.append(ctx.cancelled)
        return "done anyway"

    async with running_worker(url, config(**{"worker.cancel_grace": "100ms"}), registry=reg) as worker:
        [body] = await send_steps(url, NS, "crunch", [{}])
        await wait_until(lambda: worker.status()["in_flight"] == 1, timeout=20)
        async with AsyncClient(url) as client:
            assert await client.cancel(NS, body["step_uuid"], by="test") == "cancelling"
        await wait_until(lambda: worker.status()["counters"]["cancel_requests"] == 1, timeout=20)
        proceed.set()
        await wait_until(outcomes_at_least(url, 1), timeout=20)
    assert seen == [True]
    row = await fetch(url, "SELECT status, result, error->>'by' FROM tasker.step_results")
    assert row == [("cancelled", None, "test")]


@pytest.mark.anyio
async def test_progress_is_visible_from_another_process_while_the_step_runs(url: str, tmp_path: Path) -> None:
    reported = anyio.Event()
    finish = anyio.Event()
    reg = HandlerRegistry()

    @reg.handler("import_pages", timeout="60s")
    async def import_pages(ctx: Any, step: Any) -> str:
        await ctx.progress(0.4, note="page 4 of 10", data={"page": 4})
        reported.set()
        await finish.wait()
        return "imported"

    async with running_worker(url, config(), registry=reg):
        async with AsyncClient(url) as client:
            ref = await client.send_step(NS, "import_pages", {}, step_uuid="6b2f0c2e-0000-4000-8000-000000000002")
            with anyio.fail_after(20):
                await reported.wait()
            await wait_until(lambda: client.get_progress(ref.step_uuid), timeout=10)
            shown = await cli(cli_env(url, tmp_path), "steps", "show", str(ref.step_uuid))
            assert shown.returncode == 0
            assert b"progress 40% page 4 of 10" in shown.stdout, shown.stdout
            seen: list[Any] = []
            finish.set()
            result = await client.wait_for(ref.step_uuid, timeout=20, on_progress=seen.append)
    assert result.result == "imported"
    assert [(p.fraction, p.note, p.data) for p in seen][:1] == [(0.4, "page 4 of 10", {"page": 4})]


@pytest.mark.anyio
async def test_a_middleware_wraps_every_handler_and_can_end_a_step_itself(url: str) -> None:
    calls: list[tuple[str, str]] = []
    reg = HandlerRegistry()

    @reg.middleware
    async def audit(ctx: Any, step: Any, call_next: Any) -> Any:
        calls.append(("before", step.handler))
        if ctx.inputs.get("hold"):
            return ctx.snooze("20ms") if ctx.attempt == 1 and not ctx.inputs.get("forever") else "held"
        result = await call_next()
        calls.append(("after", step.handler))
        return result

    @reg.middleware
    async def inner(ctx: Any, step: Any, call_next: Any) -> Any:
        calls.append(("inner", step.handler))
        return await call_next()

    @reg.handler("a")
    async def a(ctx: Any, step: Any) -> str:
        return "a"

    @reg.handler("b")
    def b(ctx: Any, step: Any) -> str:
        return "b"

    async with running_worker(url, config(**{"event_system.max_concurrent_processors": 1}), registry=reg):
        await send_steps(url, NS, "a", [{}])
        await wait_until(outcomes_at_least(url, 1), timeout=20)
        await send_steps(url, NS, "b", [{}])
        await wait_until(outcomes_at_least(url, 2), timeout=20)
        await send_steps(url, NS, "a", [{"hold": True, "forever": True}])
        await wait_until(outcomes_at_least(url, 3), timeout=20)
    assert calls[:6] == [
        ("before", "a"),
        ("inner", "a"),
        ("after", "a"),
        ("before", "b"),
        ("inner", "b"),
        ("after", "b"),
    ]
    results = await fetch(url, "SELECT handler, result FROM tasker.step_results ORDER BY finished_at")
    assert results == [("a", "a"), ("b", "b"), ("a", "held")]  # the last never reached its handler


@pytest.mark.anyio
async def test_two_producers_racing_one_unique_key_in_its_window_create_one_step(url: str) -> None:
    async def send(inputs: dict[str, Any]) -> Any:
        async with AsyncClient(url) as client:
            return await client.send_step(NS, "reindex", inputs, unique_key="reindex:42", unique_for="60s")

    refs: list[Any] = []

    async def racer(i: int) -> None:
        refs.append(await send({"by": i}))

    async with anyio.create_task_group() as tg:
        for i in range(2):
            tg.start_soon(racer, i)
    assert sorted(r.created for r in refs) == [False, True]
    assert refs[0].step_uuid == refs[1].step_uuid
    assert await fetch_value(url, f"SELECT count(*) FROM pgmq.q_{QUEUE}") == 1
    # debounce: the queued step takes the newest inputs instead of a second step
    async with AsyncClient(url) as client:
        again = await client.send_step(
            NS, "reindex", {"by": "latest"}, unique_key="reindex:42", unique_for="60s", debounce=True
        )
    assert not again.created
    inputs = await fetch(url, f"SELECT message->'inputs' FROM pgmq.q_{QUEUE}")
    assert inputs == [({"by": "latest"},)]
    # from SQL, by name; and a new window once the first has passed
    same = await fetch_value(
        url,
        "SELECT tasker.send_step(%s, 'reindex', p_unique_key => 'reindex:42', p_unique_for => 60)",
        (NS,),
    )
    assert same == refs[0].msg_id
    await fetch_value(url, "UPDATE tasker.unique_keys SET expires_at = now() - interval '1s' RETURNING 1")
    newer = await fetch_value(
        url, "SELECT tasker.send_step(%s, 'reindex', p_unique_key => 'reindex:42', p_unique_for => 60)", (NS,)
    )
    assert newer != refs[0].msg_id


def test_the_harness_sees_snooze_cancel_and_progress_as_a_worker_does() -> None:
    from tasker_worker.testing import HandlerHarness

    h = HandlerHarness(make_config(overrides={"retry.jitter": 0.0}), namespace=NS)
    state = types.SimpleNamespace(ready=False)

    @h.handler("wait_for_it")
    async def wait_for_it(ctx: Any, step: Any) -> Any:
        await ctx.progress(0.5, note="halfway")
        if not state.ready:
            return ctx.snooze("30s")
        return "ok"

    @h.handler("long")
    async def long(ctx: Any, step: Any) -> Any:
        h.cancel(step, by="harness-test")  # someone asks while it runs
        return "finished regardless"

    async def scenario() -> None:
        step = h.send("wait_for_it")
        await h.run_ready()
        assert h.progress(step)["note"] == "halfway"
        [m] = h.pending()
        assert m.read_ct == 0 and m.headers["tasker_snoozes"] == 1
        state.ready = True
        await h.run_until_settled(within=60)
        assert (o := h.outcome(step)) is not None and o.status == "succeeded" and o.attempts == 1
        assert [r.verdict for r in h.runs] == ["snoozed", "succeeded"]
        doomed = h.send("long")
        await h.run_ready()
        assert (o := h.outcome(doomed)) is not None and o.status == "cancelled"
        assert o.error is not None and o.error["by"] == "harness-test"

    anyio.run(scenario)


# --- found in review: each fails without its fix -----------------------------------------------


@pytest.mark.anyio
async def test_cancel_in_another_namespace_touches_nothing_of_this_one(url: str) -> None:
    """msg_ids are numbered per queue: a step of namespace ``ctl`` cancelled as if it were in
    ``other`` must not delete the message with the same msg_id there."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('other')")
        mine = conn.execute(
            "SELECT step_uuid, msg_id FROM tasker.enqueue_step(%s, 'noop', p_step_uuid => gen_random_uuid())", (NS,)
        ).fetchone()
        theirs = conn.execute("SELECT tasker.send_step('other', 'noop')").fetchone()
        assert mine is not None and theirs is not None and mine[1] == theirs[0]  # the same msg_id
        state = conn.execute("SELECT state FROM tasker.cancel_step('other', %s, 'test')", (mine[0],)).fetchone()
        assert state == ("not_found",)
        assert conn.execute("SELECT count(*) FROM pgmq.q_worker_other_queue").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM tasker.step_results").fetchone() == (0,)


@pytest.mark.anyio
async def test_a_per_key_cap_drains_every_step_of_the_key_in_an_event_driven_fleet(url: str) -> None:
    """key_max_running 1 and four steps of one key, a worker that only listens: each finished
    step lets the next start (the claim says the cap held them back, the worker comes back)."""
    await fetch_value(url, "SELECT namespace FROM tasker.set_queue_limits(%s, NULL, 1)", (NS,))
    reg = HandlerRegistry()

    @reg.handler("one_at_a_time")
    async def one_at_a_time(ctx: Any, step: Any) -> None:
        await anyio.sleep(0.05)

    async with AsyncClient(url) as client:
        for _ in range(4):
            await client.send_step(NS, "one_at_a_time", {}, concurrency_key="acct-1")
    cfg = make_config(mode="EventDrivenOnly", namespaces=[NS])
    async with running_worker(url, cfg, registry=reg):
        await wait_until(outcomes_at_least(url, 4), timeout=20)


@pytest.mark.anyio
async def test_debounce_works_for_a_producer_and_runs_the_newest_inputs(url: str) -> None:
    """A least-privilege producer may debounce (the replacement runs as the owner); once the
    first step ran, a debounced send is a new step with the newest inputs, not dropped."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT set_config('role', 'tasker_producer', false)")
        sql = "SELECT msg_id, created FROM tasker.enqueue_step(%s, 'reindex', %s::jsonb, p_unique_key => 'doc:7', p_unique_for => 60, p_debounce => true)"
        first = conn.execute(sql, (NS, '{"v": 1}')).fetchone()
        again = conn.execute(sql, (NS, '{"v": 2}')).fetchone()
        assert first is not None and again == (first[0], False)
        conn.execute("RESET role")
        conn.execute(
            f"UPDATE pgmq.q_{QUEUE} SET vt = now() + interval '1h', headers = '{{\"tasker_claim\": {{}}}}'"
        )  # now running
        conn.execute("SELECT set_config('role', 'tasker_producer', false)")
        later = conn.execute(sql, (NS, '{"v": 3}')).fetchone()
        assert later is not None and later[1] is True and later[0] != first[0]
        conn.execute("RESET role")
        inputs = conn.execute(f"SELECT message->'inputs' FROM pgmq.q_{QUEUE} ORDER BY msg_id").fetchall()
    assert inputs == [({"v": 2},), ({"v": 3},)]


@pytest.mark.anyio
async def test_a_worker_role_cannot_change_flow_control(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.pause_queue(%s, 'ops')", (NS,))
        conn.execute("SET role tasker_worker")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE tasker.queue_flow SET paused = false")
        # ...but its claim still reads it and answers 'paused'
        stamp = '{"tasker_claim": {"worker_id": "w"}}'
        rows = conn.execute("SELECT hold FROM tasker.claim_flow(%s, 1, 30, %s::jsonb, 'w')", (QUEUE, stamp)).fetchall()
        assert rows == [("paused",)]


@pytest.mark.anyio
async def test_bad_progress_fails_its_step_not_the_worker_and_a_huge_snooze_is_capped(url: str) -> None:
    reg = HandlerRegistry()

    @reg.handler("reports_badly", max_attempts=1)
    async def reports_badly(ctx: Any, step: Any) -> None:
        await ctx.progress(0.5, data={(1, 2): 3})  # not JSON: the handler's own error

    @reg.handler("sleeps_for_ages")
    async def sleeps_for_ages(ctx: Any, step: Any) -> Any:
        return ctx.snooze(float("inf"))

    @reg.handler("fine")
    async def fine(ctx: Any, step: Any) -> str:
        await ctx.progress(1.0, note="done\x00")  # NUL is replaced, not a crash
        return "ok"

    async with running_worker(url, config(), registry=reg) as worker:
        await send_steps(url, NS, "reports_badly", [{}])
        await send_steps(url, NS, "sleeps_for_ages", [{}])
        await wait_until(lambda: worker.status()["counters"]["snoozed"] == 1, timeout=20)
        await send_steps(url, NS, "fine", [{}])
        await wait_until(outcomes_at_least(url, 2), timeout=20)
        assert worker.status()["counters"]["internal_errors"] == 0
    rows = dict(await fetch(url, "SELECT handler, status FROM tasker.step_results"))
    assert rows == {"reports_badly": "failed", "fine": "succeeded"}
    delay = await fetch_value(url, f"SELECT extract(epoch FROM vt - now()) FROM pgmq.q_{QUEUE}")
    assert 6 * 86_400 < delay <= 7 * 86_400  # capped at MAX_SNOOZE_S


@pytest.mark.anyio
async def test_a_rate_limited_worker_comes_back_at_once_when_the_rate_is_raised(url: str) -> None:
    await fetch_value(url, "SELECT namespace FROM tasker.set_queue_limits(%s, NULL, NULL, 1, 3600.0, 1)", (NS,))
    reg = HandlerRegistry()

    @reg.handler("paced")
    async def paced(ctx: Any, step: Any) -> None:
        return None

    async with running_worker(url, make_config(mode="EventDrivenOnly", namespaces=[NS]), registry=reg):
        await send_steps(url, NS, "paced", [{} for _ in range(3)])
        await wait_until(outcomes_at_least(url, 1), timeout=20)  # the burst of one; the next in an hour
        await fetch_value(url, "SELECT namespace FROM tasker.set_queue_limits(%s, NULL, NULL, 100, 1.0, 5)", (NS,))
        await wait_until(outcomes_at_least(url, 3), timeout=10)


@pytest.mark.anyio
async def test_a_backlog_does_not_starve_the_workers_other_namespace(url: str) -> None:
    """Prefetching a backlog of short steps in one namespace, a worker still gives the next free
    slot to steps of its other namespace: they start long before the backlog ends."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT tasker.create_namespace_queue('bulk')")
    reg = HandlerRegistry()

    @reg.handler("short")
    async def short(ctx: Any, step: Any) -> None:
        await anyio.sleep(0.01)

    cfg = make_config(mode="Hybrid", namespaces=["bulk", NS], concurrency=2)
    async with running_worker(url, cfg, registry=reg):
        await send_steps(url, "bulk", "short", [{} for _ in range(400)], batch=True)
        await wait_until(outcomes_at_least(url, 20), timeout=20)  # the backlog is being worked
        await send_steps(url, NS, "short", [{} for _ in range(3)])
        await wait_until(
            lambda: fetch_value(url, "SELECT count(*) = 3 FROM tasker.step_results WHERE namespace = %s", (NS,)),
            timeout=30,
        )
        left = await fetch_value(url, "SELECT count(*) FROM pgmq.q_worker_bulk_queue")
    assert left > 100  # the other namespace's steps did not wait for the end of the backlog


@pytest.mark.anyio
async def test_long_steps_are_not_hoarded_by_prefetch(url: str) -> None:
    """Steps of half a second, two workers of 4 slots, 8 steps: both get work (a worker that
    prefetched them would hold them back from its idle peer)."""
    reg = HandlerRegistry()

    @reg.handler("slow")
    async def slow(ctx: Any, step: Any) -> None:
        await anyio.sleep(0.5)

    cfg = [make_config(mode="Hybrid", namespaces=[NS], concurrency=4, overrides={"worker.id": f"h{i}"}) for i in (1, 2)]
    async with running_worker(url, cfg[0], registry=reg):
        await send_steps(url, NS, "slow", [{} for _ in range(4)])  # what it learns its steps take
        await wait_until(outcomes_at_least(url, 4), timeout=20)
        async with running_worker(url, cfg[1], registry=reg):
            await send_steps(url, NS, "slow", [{} for _ in range(8)], batch=True)
            await wait_until(outcomes_at_least(url, 12), timeout=30)
    shares = dict(await fetch(url, "SELECT worker_id, count(*) FROM tasker.step_results GROUP BY 1"))
    assert shares.get("h2", 0) >= 2, shares
