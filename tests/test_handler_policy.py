"""A handler's own failure policy, in a real worker against a real PostgreSQL: its attempts and
backoff replace [retry], an exception outside retry_on is dead-lettered at once, dlq=False keeps
no DLQ copy; `config show` lists the policy in force per handler."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, make_config, outcomes_at_least, running_worker, send_steps, wait_until

NS = "policy"


@pytest.mark.anyio
async def test_a_handler_policy_replaces_retry_in_a_real_worker(url: str) -> None:
    reg = HandlerRegistry()

    @reg.handler("kept", max_attempts=4, backoff=("20ms", "40ms"), retry_on=(ConnectionError,))
    async def kept(ctx: Any, step: Any) -> None:
        raise ConnectionError("down") if step.inputs.get("flaky") else ValueError("bad input")

    @reg.handler("dropped", max_attempts=2, backoff=("20ms", "20ms"), dlq=False)
    async def dropped(ctx: Any, step: Any) -> None:
        raise ConnectionError("down")

    config = make_config(mode="Hybrid", namespaces=[NS], overrides={"retry.max_attempts": 9, "retry.base_delay": "5s"})
    async with running_worker(url, config, registry=reg):
        flaky, bad = await send_steps(url, NS, "kept", [{"flaky": True}, {}])
        [gone] = await send_steps(url, NS, "dropped", [{}])
        await wait_until(outcomes_at_least(url, 3), timeout=60)
    rows = {
        r[0]: r[1:]
        for r in await fetch(url, "SELECT step_uuid::text, status, attempts, error->>'reason' FROM tasker.step_results")
    }
    # Four attempts 20-40 ms apart, not nine 5 s apart ([retry]).
    assert rows[flaky["step_uuid"]] == ("failed", 4, "retries_exhausted")
    assert rows[bad["step_uuid"]] == ("dead_lettered", 1, "non_retryable_error")
    assert rows[gone["step_uuid"]] == ("failed", 2, "retries_exhausted")
    dlq = await fetch(url, f"SELECT message->>'step_uuid' FROM pgmq.q_worker_{NS}_queue_dlq ORDER BY msg_id")
    assert sorted(r[0] for r in dlq) == sorted([flaky["step_uuid"], bad["step_uuid"]])  # not the dropped one
    assert await fetch(url, f"SELECT count(*) FROM pgmq.q_worker_{NS}_queue") == [(0,)]


def test_config_show_lists_the_policy_of_each_handler(cli_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "billing.py").write_text(
        "def register(worker):\n"
        "    @worker.handler('charge', max_attempts=5, backoff=('10s', '10m'), retry_on=(ConnectionError,), dlq=False)\n"
        "    def charge(ctx, step):\n"
        "        return None\n"
    )
    env = {**cli_env, "TASKER__WORKER__HANDLER_MODULES": '["billing"]', "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", "config", "show", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    handlers = json.loads(done.stdout)["handlers"]
    assert handlers["charge"] == "max_attempts=5 backoff=10s..600s retry_on=ConnectionError dlq=no"
    assert handlers["noop"].endswith("retry_on=any exception dlq=yes")  # [retry] of the test environment
