"""Handlers of the dashboard tests (loaded by ``run --handlers dashboard_handlers``).

``gate`` dead-letters its step (NonRetryableError, with ``inputs.message`` as the error text)
while the file ``inputs.gate`` does not exist, and succeeds once it does: a test opens the gate,
then requeues the dead letter from the page and sees it succeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasker_worker.errors import NonRetryableError


def gate(ctx: Any, step: Any) -> dict[str, Any]:
    if not Path(str(ctx.inputs["gate"])).exists():
        raise NonRetryableError(str(ctx.inputs.get("message", "the gate is closed")), reason="gate_closed")
    return {"passed": True, "attempt": ctx.attempt}


def register(worker: Any) -> None:
    """Entry point for ``[worker] handler_modules``."""
    worker.handler("gate")(gate)
