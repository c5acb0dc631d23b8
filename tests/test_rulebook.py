"""One rulebook for a step's fate: the same scripted failures through the in-memory
``HandlerHarness`` and through a real worker on PostgreSQL end with the same outcomes (status,
reason, last reason, attempts), so the harness cannot drift from the runtime it imitates."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tasker_worker.errors import DependencyUnavailable, NonRetryableError, RetryableError, StepFailed
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import HandlerHarness, fetch, make_config, running_worker, send_steps, wait_until

NS = "rules"
SCRIPTS = ["ok", "business", "poison", "flaky", "broken", "slow", "outage", "outage_then_broken"]
OVERRIDES = {"retry.max_attempts": 3, "retry.base_delay": "10ms", "retry.max_delay": "20ms", "retry.jitter": 0.0}


def scripted() -> HandlerRegistry:
    """One handler whose every run does what its step's script says for that run."""
    runs: Counter[str] = Counter()
    registry = HandlerRegistry()

    @registry.handler("scripted", timeout="50ms")
    async def handler(ctx: Any, step: Any) -> dict[str, Any]:
        script = ctx.inputs["script"]
        key = str(step.step_uuid)
        runs[key] += 1
        run = runs[key]
        if script == "business":
            raise StepFailed("declined by the bank", reason="declined")
        if script == "poison":
            raise NonRetryableError("cannot ever work")
        if script == "flaky" and run == 1:
            raise RetryableError("first run fails")
        if script == "broken":
            raise RuntimeError("always broken")
        if script == "slow":
            await asyncio.sleep(5)
        if script == "outage" and run == 1:
            raise DependencyUnavailable("bank is down")
        if script == "outage_then_broken":
            if run == 1:
                raise DependencyUnavailable("bank is down")
            raise RuntimeError("then broken")
        return {"run": run, "attempt": ctx.attempt}

    return registry


def _fate(status: str, result: Any, error: dict[str, Any] | None, attempts: int) -> tuple[Any, ...]:
    error = error or {}
    return (status, error.get("reason"), error.get("last_reason"), error.get("attempts"), attempts, result)


@pytest.mark.anyio
async def test_harness_and_runtime_decide_alike(db_url: str) -> None:
    config = make_config(namespaces=[NS], overrides=OVERRIDES)

    harness = HandlerHarness(config, namespace=NS, registry=scripted())
    sent = {script: harness.send("scripted", {"script": script}) for script in SCRIPTS}
    await harness.run_until_settled()
    in_memory = {}
    for script, step in sent.items():
        outcome = harness.outcome(step)
        assert outcome is not None, script
        in_memory[script] = _fate(outcome.status, outcome.result, outcome.error, outcome.attempts)

    async with running_worker(db_url, config, registry=scripted()):
        bodies = await send_steps(db_url, NS, "scripted", [{"script": s} for s in SCRIPTS])

        async def settled() -> bool:
            rows = await fetch(db_url, "SELECT count(*) FROM tasker.step_results")
            return bool(rows[0][0] == len(SCRIPTS))

        await wait_until(settled, timeout=60)
    rows = await fetch(db_url, "SELECT step_uuid::text, status, result, error, attempts FROM tasker.step_results")
    by_step = {r[0]: r[1:] for r in rows}
    in_postgres = {b["inputs"]["script"]: _fate(*by_step[b["step_uuid"]]) for b in bodies}

    assert in_postgres == in_memory
    # And the rules themselves, so that agreeing on something wrong fails too.
    assert in_memory["ok"] == ("succeeded", None, None, None, 1, {"run": 1, "attempt": 1})
    assert in_memory["business"][:2] == ("failed", "declined")
    assert in_memory["poison"][0] == "dead_lettered"
    assert in_memory["flaky"] == ("succeeded", None, None, None, 2, {"run": 2, "attempt": 2})
    assert in_memory["broken"][:5] == ("failed", "retries_exhausted", "handler_error", 3, 3)
    assert in_memory["slow"][:5] == ("failed", "retries_exhausted", "timeout", 3, 3)
    # A release gives the attempt back: the outage's run did not count.
    assert in_memory["outage"] == ("succeeded", None, None, None, 1, {"run": 2, "attempt": 1})
    assert in_memory["outage_then_broken"][:5] == ("failed", "retries_exhausted", "handler_error", 3, 3)
