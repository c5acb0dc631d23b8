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
