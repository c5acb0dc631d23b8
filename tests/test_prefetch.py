"""Prefetch (issue 32), against a real PostgreSQL: steps claimed ahead of the free slots never
run twice, never start after a shutdown was asked for or once their namespace is paused, and do
not let one worker hoard a backlog that the fleet shares."""

from __future__ import annotations

import types
from collections import Counter
from typing import Any

import anyio
import pytest
from proxy import Cut, DatabaseProxy

from tasker_worker.domain.names import queue_name
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import make_config
from tasker_worker.testing.db import fetch, fetch_value, outcomes_at_least, running_worker, send_steps, wait_until

NS = "pref"
QUEUE = queue_name(NS)


def gated_registry() -> HandlerRegistry:
    """``gated``: the first step of a worker waits for its state's gate; every run is noted in
    ``state.ran`` (msg_ids), in memory, so that a run shows even while the database is away.
    ``quick``: returns at once (a worker prefetches once it has seen that its steps are short)."""
    reg = HandlerRegistry()

    async def gated(ctx: Any, step: Any) -> None:
        ctx.state.ran.append(ctx.msg_id)
        if len(ctx.state.ran) == 1:
            await ctx.state.gate.wait()

    async def quick(ctx: Any, step: Any) -> None:
        return None

    reg.register("gated", gated)
    reg.register("quick", quick)
    return reg


async def warm_up(url: str, n: int = 3) -> None:
    """A few quick steps, run to their outcome: the worker now knows its steps are short."""
    before = int(await fetch_value(url, "SELECT count(*) FROM tasker.step_results"))
    await send_steps(url, NS, "quick", [{} for _ in range(n)])
    await wait_until(outcomes_at_least(url, before + n), timeout=20)


def gated_state() -> Any:
    return types.SimpleNamespace(ran=[], gate=anyio.Event())


def config(**overrides: Any) -> Any:
    return make_config(mode="Hybrid", namespaces=[NS], concurrency=1, overrides=overrides)


async def claimed_ids(url: str) -> set[int]:
    rows = await fetch(url, f"SELECT msg_id FROM pgmq.q_{QUEUE} WHERE read_ct > 0 AND vt > now()")
    return {r[0] for r in rows}


@pytest.mark.anyio
async def test_a_prefetched_step_whose_vt_lapsed_in_the_buffer_is_not_started(url: str) -> None:
    """A worker cut off from the database cannot keep the vt of what it prefetched; another
    worker claims those steps once their vt lapsed and runs them. When the first worker's slot
    frees, it must not start the step it still has in its buffer: it would run twice."""
    vt = {"event_system.fallback_poller.visibility_timeout": "2s", "worker.prefetch": 1}
    a_state = gated_state()
    async with DatabaseProxy(url) as proxy:
        async with running_worker(proxy.url_through, config(**vt), registry=gated_registry(), state=a_state) as a:
            await warm_up(url)
            await send_steps(url, NS, "gated", [{}, {}], batch=True)
            await wait_until(lambda: a.status()["prefetched"] == 1 and len(a_state.ran) == 1, timeout=10)
            [first] = a_state.ran
            proxy.cut(Cut.UNREACHABLE)  # A can neither extend nor settle now
            b_state = gated_state()
            b_state.gate.set()
            async with running_worker(url, config(**vt), registry=gated_registry(), state=b_state):
                await wait_until(lambda: len(b_state.ran) == 2, timeout=20)  # B ran both, after their vt
                a_state.gate.set()  # A's first step ends: a slot frees with the other one in its buffer
                await wait_until(lambda: a.status()["prefetched"] == 0, timeout=10)
                assert a_state.ran == [first]  # the buffered step was not started again
                assert a.status()["counters"]["prefetch_expired"] == 1
                proxy.cut(Cut.PASS)
                await wait_until(outcomes_at_least(url, 5), timeout=20)
    done = await fetch(url, "SELECT count(*), count(DISTINCT step_uuid) FROM tasker.step_results")
    assert done == [(5, 5)]  # the three quick ones and the two


@pytest.mark.anyio
async def test_a_shutdown_gives_the_buffer_back_at_once_without_an_attempt(url: str) -> None:
    """Asked to stop while a step runs and four wait in its buffer, a worker gives the four back
    at once (read count restored, visible again), without waiting for the running one."""
    state = gated_state()
    cfg = config(**{"worker.prefetch": 4, "worker.shutdown_timeout": "20s"})
    async with running_worker(url, cfg, registry=gated_registry(), state=state) as worker:
        await warm_up(url)
        await send_steps(url, NS, "gated", [{} for _ in range(5)], batch=True)
        await wait_until(lambda: worker.status()["prefetched"] == 4, timeout=10)
        [running] = state.ran
        worker.request_shutdown("test")

        async def given_back() -> bool:
            rows = await fetch(
                url, f"SELECT msg_id, read_ct, vt <= now() FROM pgmq.q_{QUEUE} WHERE msg_id <> %s", (running,)
            )
            return len(rows) == 4 and all(r[1] == 0 and r[2] for r in rows)

        await wait_until(given_back, timeout=5)  # long before the 20 s budget runs out
        state.gate.set()
        with anyio.fail_after(30):
            await worker.stopped.wait()
    assert state.ran == [running]
    reasons = await fetch(url, "SELECT data->>'reason', count(*) FROM tasker.events GROUP BY 1")
    assert ("shutdown", 4) in reasons


@pytest.mark.anyio
async def test_a_paused_namespace_stops_prefetching_and_gives_the_buffer_back(url: str) -> None:
    state = gated_state()
    async with running_worker(url, config(**{"worker.prefetch": 3}), registry=gated_registry(), state=state) as worker:
        await warm_up(url)
        await send_steps(url, NS, "gated", [{} for _ in range(6)], batch=True)
        await wait_until(lambda: worker.status()["prefetched"] == 3, timeout=10)
        await fetch_value(url, "SELECT tasker.pause_queue(%s, 'test')", (NS,))
        await wait_until(lambda: worker.status()["prefetched"] == 0, timeout=10)
        assert len(await claimed_ids(url)) == 1  # only the running one is still claimed
        state.gate.set()
        await wait_until(outcomes_at_least(url, 3 + 1), timeout=10)
        await wait_until(lambda: worker.status()["counters"]["claims_held"] >= 1, timeout=10)
        assert len(state.ran) == 1  # nothing started while paused
        await fetch_value(url, "SELECT tasker.resume_queue(%s, 'test')", (NS,))
        await wait_until(outcomes_at_least(url, 3 + 6), timeout=20)
    assert sorted(Counter(state.ran).values()) == [1] * 6


@pytest.mark.anyio
async def test_four_workers_share_a_backlog_fairly_with_the_single_claimer(url: str) -> None:
    """2,000 steps sent at once to 4 listening workers (single claimer on, prefetch on): each
    runs its share, within 25%."""
    reg = HandlerRegistry()

    async def work(ctx: Any, step: Any) -> None:
        await anyio.sleep(0.002)

    reg.register("work", work)
    cfg = [make_config(mode="Hybrid", namespaces=[NS], overrides={"worker.id": f"fair{i}"}) for i in range(4)]
    assert cfg[0].event_system.listener.single_claimer
    async with (
        running_worker(url, cfg[0], registry=reg),
        running_worker(url, cfg[1], registry=reg),
        running_worker(url, cfg[2], registry=reg),
        running_worker(url, cfg[3], registry=reg),
    ):
        await send_steps(url, NS, "work", [{} for _ in range(2000)], batch=True)
        await wait_until(outcomes_at_least(url, 2000), timeout=120)
    shares = dict(await fetch(url, "SELECT worker_id, count(*) FROM tasker.step_results GROUP BY 1"))
    assert sorted(shares) == [f"fair{i}" for i in range(4)]
    assert all(375 <= n <= 625 for n in shares.values()), shares
