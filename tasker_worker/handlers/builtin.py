"""Diagnostic handlers available in every namespace: ``noop``, ``sleep`` and ``fail``.

The benchmarks and the fault tests use them; they are also handy to check a deployment.
"""

from __future__ import annotations

import math
from typing import Any

import anyio

from tasker_worker.errors import NonRetryableError, RetryableError, StepFailed, StepValidationError
from tasker_worker.handlers.context import StepContext
from tasker_worker.handlers.registry import HandlerRegistry

MAX_SLEEP_S = 3600.0


async def noop(ctx: StepContext, step: Any) -> dict[str, Any]:
    """Return the inputs unchanged."""
    return ctx.inputs


async def sleep(ctx: StepContext, step: Any) -> dict[str, Any]:
    """Sleep ``inputs.seconds`` (0..3600), then return them."""
    seconds = ctx.inputs.get("seconds", 0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not math.isfinite(seconds):
        raise StepValidationError("inputs.seconds must be a number")
    if not 0 <= seconds <= MAX_SLEEP_S:
        raise StepValidationError(f"inputs.seconds must be between 0 and {MAX_SLEEP_S:g}")
    await anyio.sleep(seconds)
    return {"slept": seconds}


async def fail(ctx: StepContext, step: Any) -> None:
    """Raise: ``inputs.mode`` is ``retryable`` (default), ``non_retryable`` or ``failed``.

    ``inputs.until_attempt``: succeed from that attempt on (to test retries that recover).
    """
    until = ctx.inputs.get("until_attempt")
    if isinstance(until, int) and ctx.attempt >= until:
        return None
    mode = ctx.inputs.get("mode", "retryable")
    message = str(ctx.inputs.get("message", "failure requested by the fail handler"))[:1000]
    if mode == "retryable":
        raise RetryableError(message)
    if mode == "non_retryable":
        raise NonRetryableError(message)
    if mode == "failed":
        raise StepFailed(message, reason=str(ctx.inputs.get("reason", "failed"))[:100])
    raise StepValidationError(f"inputs.mode must be retryable, non_retryable or failed, not {mode!r}")


def register_builtins(registry: HandlerRegistry) -> None:
    """Add the diagnostic handlers (unless the user registered those names already)."""
    for name, func in (("noop", noop), ("sleep", sleep), ("fail", fail)):
        if registry.get(name) is None:
            registry.register(name, func)
