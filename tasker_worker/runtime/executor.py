"""Running handlers: async ones on the event loop, sync (CPU-bound) ones off it.

Sync handlers run in a thread pool or a process pool (``[worker] executor``), so the listener,
heartbeats and other steps stay responsive while numpy computes. Timeouts are enforced here:
an async handler is cancelled; a sync one is abandoned (its thread or process finishes the
call in the background and its result is ignored).

The steps' async handlers share one timer (``Deadlines``): a per-step ``asyncio.timeout`` (an
object, a timer handle and a current-task lookup per step) was about a tenth of a worker's CPU
on no-op steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import heapq
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread

from tasker_worker.errors import StepTimeout
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerFunc


class _Watch:
    """One watched run: cancelled through its task when its deadline passes while it runs."""

    __slots__ = ("deadline", "done", "fired", "task")

    def __init__(self, task: asyncio.Task[Any], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.done = False
        self.fired = False

    def __lt__(self, other: _Watch) -> bool:
        return self.deadline < other.deadline


class Deadlines:
    """Cancels the runs that outlive their deadline, with one timer handle for all of them.

    Finished runs stay in the heap until their deadline comes up or until they outnumber the
    running ones four to one, when the heap is rebuilt from the running ones: its size stays
    within a few times the runs in progress whatever the timeouts.
    """

    def __init__(self) -> None:
        self._heap: list[_Watch] = []
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = float("inf")

    def watch(self, task: asyncio.Task[Any], seconds: float) -> _Watch:
        """Cancel ``task`` if it is still in this run ``seconds`` from now (see ``done``)."""
        loop = asyncio.get_running_loop()
        entry = _Watch(task, loop.time() + seconds)
        heapq.heappush(self._heap, entry)
        self._running += 1
        if entry.deadline < self._armed_for:
            self._arm(loop, entry.deadline)
        return entry

    def done(self, entry: _Watch) -> None:
        """The run is over (however it ended): never cancel it."""
        if not entry.done:
            entry.done = True
            self._running -= 1
            heap = self._heap
            if len(heap) > 64 and len(heap) > 4 * self._running:
                self._heap = [e for e in heap if not e.done]
                heapq.heapify(self._heap)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = when
        self._timer = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer, self._armed_for = None, float("inf")
        now = loop.time()
        heap = self._heap
        while heap and heap[0].deadline <= now:
            entry = heapq.heappop(heap)
            if not entry.done:
                entry.fired = True
                entry.task.cancel()
        while heap and heap[0].done:
            heapq.heappop(heap)
        if heap:
            self._arm(loop, heap[0].deadline)


class HandlerExecutor:
    """Runs handler callables with a timeout, in the configured pool."""

    def __init__(self, kind: str = "thread", workers: int = 4) -> None:
        self.kind = kind
        self.workers = workers
        self._limiter = anyio.CapacityLimiter(workers)
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None
        self.deadlines = Deadlines()

    def start(self) -> None:
        """Create the process pool when configured (threads need nothing)."""
        if self.kind == "process" and self._processes is None:
            import multiprocessing

            self._processes = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
            )

    def close(self) -> None:
        """Stop the process pool without waiting for abandoned calls."""
        if self._processes is not None:
            self._processes.shutdown(wait=False, cancel_futures=True)
            self._processes = None

    async def run(
        self,
        func: HandlerFunc,
        is_async: bool,
        args: tuple[Any, ...],
        timeout: timedelta | None,
        *,
        task: asyncio.Task[Any] | None = None,
    ) -> Any:
        """``func(*args)`` under ``timeout``; raises ``StepTimeout`` when it runs out.

        ``task`` is the task running this call (a step's): an async ``func`` is then timed by
        the shared ``deadlines`` instead of an ``asyncio.timeout`` of its own.
        """
        seconds = timeout.total_seconds() if timeout else None
        if is_async and task is not None and seconds is not None:
            watch = self.deadlines.watch(task, seconds)
            try:
                result = await func(*args)
            except asyncio.CancelledError:
                if not watch.fired:
                    raise
                # Our cancellation, not the worker's: the run timed out (as asyncio.timeout).
                task.uncancel()
                raise StepTimeout(f"handler ran longer than its timeout of {seconds:g}s") from None
            finally:
                self.deadlines.done(watch)
            if watch.fired:
                task.uncancel()  # the handler swallowed our cancellation and finished: its result stands
            return result
        try:
            if is_async:
                # asyncio.timeout rather than anyio.fail_after: on a no-op step the cancel
                # scope's bookkeeping cost more than the step (steps run as asyncio tasks).
                async with asyncio.timeout(seconds):
                    return await func(*args)
            with anyio.fail_after(seconds):
                return await self._run_sync(func, args)
        except TimeoutError:
            raise StepTimeout(f"handler ran longer than its timeout of {seconds:g}s") from None

    async def _run_sync(self, func: HandlerFunc, args: tuple[Any, ...]) -> Any:
        if self._processes is not None:
            # Contexts cross the process boundary without database access or shared state.
            args = tuple(a.detached() if isinstance(a, StepContext) else a for a in args)
            future = self._processes.submit(func, *args)
            try:
                return await asyncio.wrap_future(future)
            except asyncio.CancelledError:
                future.cancel()
                raise
        return await anyio.to_thread.run_sync(
            functools.partial(func, *args), limiter=self._limiter, abandon_on_cancel=True
        )
