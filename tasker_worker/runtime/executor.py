"""Running handlers: async ones on the event loop, sync (CPU-bound) ones off it.

Sync handlers run in a thread pool or a process pool (``[worker] executor``), so the listener,
heartbeats and other steps stay responsive while numpy computes. Timeouts are enforced here:
an async handler is cancelled; a sync one is abandoned (its thread or process finishes the
call in the background and its result is ignored).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from datetime import timedelta
from typing import Any

import anyio
import anyio.to_thread

from tasker_worker.errors import StepTimeout
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerFunc


class HandlerExecutor:
    """Runs handler callables with a timeout, in the configured pool."""

    def __init__(self, kind: str = "thread", workers: int = 4) -> None:
        self.kind = kind
        self.workers = workers
        self._limiter = anyio.CapacityLimiter(workers)
        self._processes: concurrent.futures.ProcessPoolExecutor | None = None

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

    async def run(self, func: HandlerFunc, is_async: bool, args: tuple[Any, ...], timeout: timedelta | None) -> Any:
        """``func(*args)`` under ``timeout``; raises ``StepTimeout`` when it runs out."""
        seconds = timeout.total_seconds() if timeout else None
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
