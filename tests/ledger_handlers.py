"""Handlers used by the runtime and fault tests (loaded as a ``handler_modules`` entry too).

``ledger`` appends (step_uuid, run_id, attempt) to ``public.ledger`` for every run that
reaches its end: in its own autocommit connection by default, so that a run whose ack is
later rejected is still visible (that is how a doubled run would show), or inside the step's
transaction with ``inputs.in_tx`` (then it commits only together with the outcome).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import anyio
import psycopg

LEDGER_DDL = """
CREATE TABLE IF NOT EXISTS public.ledger (
    step_uuid uuid NOT NULL,
    run_id    text NOT NULL,
    attempt   integer NOT NULL,
    pid       integer NOT NULL,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def ledger(ctx: Any, step: Any) -> dict[str, Any]:
    seconds = float(ctx.inputs.get("sleep", 0))
    if seconds:
        await anyio.sleep(seconds)
    if ctx.inputs.get("fail_until", 0) > ctx.attempt:
        raise RuntimeError(f"planned failure on attempt {ctx.attempt}")
    run_id = uuid.uuid4().hex
    row = (str(step.step_uuid), run_id, ctx.attempt, os.getpid())
    if ctx.inputs.get("in_tx"):
        conn = await ctx.transaction()
        await conn.execute("INSERT INTO public.ledger (step_uuid, run_id, attempt, pid) VALUES (%s, %s, %s, %s)", row)
    else:
        url = os.environ.get("TASKER_LEDGER_URL") or ctx.state.ledger_url
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                "INSERT INTO public.ledger (step_uuid, run_id, attempt, pid) VALUES (%s, %s, %s, %s)", row
            )
    return {"run_id": run_id}


def register(worker: Any) -> None:
    """Entry point for ``[worker] handler_modules``."""
    worker.handler("ledger")(ledger)
