"""The handler executor's shared deadline timer (pure asyncio, no database)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from tasker_worker.errors import StepTimeout
from tasker_worker.runtime.executor import Deadlines, HandlerExecutor


async def _run(executor: HandlerExecutor, func: Any, seconds: float) -> Any:
    task = asyncio.current_task()
    assert task is not None
    return await executor.run(func, True, (), timedelta(seconds=seconds), task=task)


@pytest.mark.anyio
async def test_only_runs_past_their_deadline_time_out() -> None:
    executor = HandlerExecutor()
    release = asyncio.Event()

    async def waits() -> str:
        await release.wait()
        return "done"

    async def quick() -> str:
        return "quick"

    slow = [asyncio.create_task(_run(executor, waits, 0.05)) for _ in range(20)]
    patient = [asyncio.create_task(_run(executor, waits, 30)) for _ in range(20)]
    assert [await _run(executor, quick, 0.01) for _ in range(100)] == ["quick"] * 100
    done, _ = await asyncio.wait(slow, timeout=5)
    assert len(done) == 20 and all(isinstance(t.exception(), StepTimeout) for t in slow)
    assert not any(t.done() for t in patient)
    release.set()
    assert await asyncio.gather(*patient) == ["done"] * 20
    # The timed-out tasks' cancellations were taken back: they could go on awaiting.
    assert all(t.cancelling() == 0 for t in slow)


@pytest.mark.anyio
async def test_a_cancellation_from_elsewhere_is_not_a_timeout() -> None:
    executor = HandlerExecutor()

    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(_run(executor, forever, 30))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.anyio
async def test_a_handler_that_swallows_the_cancellation_keeps_its_result() -> None:
    executor = HandlerExecutor()

    async def stubborn() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            return "kept"
        return "slept"

    task = asyncio.create_task(_run(executor, stubborn, 0.02))
    assert await asyncio.wait_for(task, 5) == "kept"
    assert task.cancelling() == 0


@pytest.mark.anyio
async def test_finished_runs_do_not_pile_up() -> None:
    deadlines = Deadlines()
    task = asyncio.current_task()
    assert task is not None
    for _ in range(10_000):
        deadlines.done(deadlines.watch(task, 3600))
    # Rebuilt whenever finished entries outnumber running ones four to one.
    assert len(deadlines._heap) <= 64
    kept = [deadlines.watch(task, 3600) for _ in range(100)]
    for entry in kept:
        deadlines.done(entry)
    assert len(deadlines._heap) <= 100
