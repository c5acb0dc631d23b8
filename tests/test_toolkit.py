"""The testing toolkit: HandlerHarness (in memory, manual clock) and the pytest plugin's worker.

The harness tests double as the unit tests of the rulebook the runtime shares with it
(``domain.verdicts``, ``domain.circuits``): they run in milliseconds, with no database.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tasker_worker.errors import DependencyUnavailable, NonRetryableError, StepFailed, UsageError
from tasker_worker.testing import HandlerHarness, make_config


def harness(**overrides: Any) -> HandlerHarness:
    base = {
        "retry.max_attempts": 3,
        "retry.base_delay": "1s",
        "retry.max_delay": "10s",
        "retry.jitter": 0.0,
        "circuit_breaker.failure_threshold": 3,
        "circuit_breaker.cooldown": "30s",
        "circuit_breaker.max_cooldown": "2m",
    }
    base.update(overrides)
    return HandlerHarness(make_config(overrides=base))


@pytest.mark.anyio
async def test_success_records_one_outcome_and_archives() -> None:
    h = harness()

    @h.handler("double")
    async def double(ctx: Any, step: Any) -> dict[str, int]:
        return {"value": step.inputs["n"] * 2}

    step = h.send("double", {"n": 21})
    assert await h.run_ready() == 1
    outcome = h.outcome(step)
    assert outcome is not None and (outcome.status, outcome.result, outcome.attempts) == ("succeeded", {"value": 42}, 1)
    assert h.pending() == [] and len(h.archived) == 1


@pytest.mark.anyio
async def test_retries_follow_the_backoff_on_the_manual_clock_then_dead_letter() -> None:
    h = harness()
    calls: list[int] = []

    @h.handler("flaky")
    def flaky(ctx: Any, step: Any) -> None:
        calls.append(ctx.attempt)
        raise RuntimeError("boom")

    step = h.send("flaky")
    await h.run_ready()
    [msg] = h.pending()
    assert calls == [1] and msg.read_ct == 1
    await h.advance(0.99)  # the first backoff is base_delay (1 s): not yet due
    assert await h.run_ready() == 0
    await h.advance(0.01)
    await h.run_ready()
    assert calls == [1, 2]
    await h.advance(1.99)  # second backoff: 2 s (doubled)
    assert await h.run_ready() == 0
    await h.advance(0.01)
    await h.run_ready()
    assert calls == [1, 2, 3]
    outcome = h.outcome(step)
    assert outcome is not None and outcome.status == "failed"
    assert outcome.error is not None and outcome.error["reason"] == "retries_exhausted"
    assert [m.msg_id for m in h.dead_letters] == [1]
    assert [r.verdict for r in h.runs] == ["retry", "retry", "dead_letter"]


@pytest.mark.anyio
async def test_step_failed_non_retryable_and_bad_input() -> None:
    h = harness()

    @h.handler("verdict")
    async def verdict(ctx: Any, step: Any) -> None:
        if step.inputs["kind"] == "business":
            raise StepFailed("card declined", reason="declined")
        raise NonRetryableError("bad request")

    business = h.send("verdict", {"kind": "business"})
    poison = h.send("verdict", {"kind": "poison"})
    unknown = h.send("nobody")
    h.send_raw('{"not": "a step"}')
    h.send_raw("[1, 2]")
    await h.run_ready()
    statuses = {s: o.status for s, o in h.outcomes.items()}
    assert statuses == {
        str(business.step_uuid): "failed",
        str(poison.step_uuid): "dead_lettered",
        str(unknown.step_uuid): "dead_lettered",
    }
    assert len(h.dead_letters) == 4  # poison, unknown handler, two malformed bodies
    reasons = sorted(m.headers["tasker_dead_letter"]["reason"] for m in h.dead_letters)
    assert reasons == ["malformed_message", "malformed_message", "non_retryable_error", "unknown_handler"]


@pytest.mark.anyio
async def test_timeout_counts_as_an_attempt() -> None:
    h = harness(**{"retry.max_attempts": 1})
    never = asyncio.Event()

    @h.handler("hangs", timeout="20ms")
    async def hangs(ctx: Any, step: Any) -> None:
        await never.wait()

    step = h.send("hangs")
    await h.run_ready()
    outcome = h.outcome(step)
    assert outcome is not None and outcome.error is not None
    assert (outcome.status, outcome.error["last_reason"]) == ("failed", "timeout")


@pytest.mark.anyio
async def test_duplicate_step_runs_once() -> None:
    h = harness()
    runs: list[str] = []

    @h.handler("once")
    async def once(ctx: Any, step: Any) -> None:
        runs.append(str(step.step_uuid))

    step = h.send("once")
    body = step.as_body()
    h.send_raw(body)
    await h.run_ready()
    assert runs == [str(step.step_uuid)]
    assert [r.verdict for r in h.runs] == ["succeeded", "duplicate"]


@pytest.mark.anyio
async def test_dependency_unavailable_opens_the_circuit_then_a_probe_closes_it() -> None:
    h = harness()
    service = {"up": False}
    runs: list[int] = []

    @h.handler("charge")
    async def charge(ctx: Any, step: Any) -> str:
        runs.append(ctx.attempt)
        if not service["up"]:
            raise DependencyUnavailable("bank is down")
        return "charged"

    steps = [h.send("charge") for _ in range(3)]
    await h.run_ready()
    # Three unavailable in a row (the threshold): open; no attempt was used up.
    assert h.circuit("charge") == "open" and runs == [1, 1, 1]
    assert [m.read_ct for m in h.pending()] == [0, 0, 0]
    await h.advance(10)
    await h.run_ready()  # the releases are due, but the circuit holds the steps back
    assert len(runs) == 3
    service["up"] = True
    await h.advance(20)  # cooldown over: one probe, then the rest
    await h.run_until_settled(within=60)
    assert h.circuit("charge") == "closed"
    assert all((o := h.outcome(s)) is not None and o.status == "succeeded" for s in steps)
    # While open, the held steps were not even claimed: three releases, then three successes.
    assert [r.verdict for r in h.runs] == ["release"] * 3 + ["succeeded"] * 3


@pytest.mark.anyio
async def test_a_failed_probe_doubles_the_cooldown() -> None:
    h = harness(**{"circuit_breaker.failure_threshold": 1})

    @h.handler("down")
    async def down(ctx: Any, step: Any) -> None:
        raise DependencyUnavailable("still down")

    h.send("down")
    await h.run_ready()
    assert h.circuits.retry_after("down") == pytest.approx(30)
    await h.advance(30)
    await h.run_ready()  # the probe fails
    assert h.circuit("down") == "open"
    assert h.circuits.retry_after("down") == pytest.approx(60)
    assert h.circuits.open_circuits()["down"]["times_opened"] == 2


@pytest.mark.anyio
async def test_steps_already_claimed_when_the_circuit_opens_are_held_without_an_attempt() -> None:
    h = harness(**{"circuit_breaker.failure_threshold": 1})

    @h.handler("down")
    async def down(ctx: Any, step: Any) -> None:
        raise DependencyUnavailable("still down")

    h.send("down")
    h.send("down")
    await h.run_ready()  # both claimed in one sweep: the first opens the circuit
    assert [r.verdict for r in h.runs] == ["release", "circuit_open"]
    assert [(m.read_ct, round((m.vt - h.clock.now()).total_seconds())) for m in h.pending()][1] == (0, 30)


@pytest.mark.anyio
async def test_periodic_work_runs_on_the_manual_clock() -> None:
    h = harness()
    seen: list[float] = []
    start = h.clock.now()

    @h.periodic(every="10s", name="tidy")
    async def tidy(ctx: Any) -> None:
        assert (ctx.worker_id, ctx.job) == ("harness", "tidy")
        seen.append((h.clock.now() - start).total_seconds())

    @h.periodic(every="15s", name="flaky")
    def flaky(ctx: Any) -> None:
        raise RuntimeError("report service down")

    await h.advance(35)
    assert seen == [10.0, 20.0, 30.0]
    assert [(n, (at - start).total_seconds(), type(e).__name__) for n, at, e in h.periodic_runs if n == "flaky"] == [
        ("flaky", 15.0, "RuntimeError"),
        ("flaky", 30.0, "RuntimeError"),
    ]


@pytest.mark.anyio
async def test_plugin_worker_runs_a_registered_module(tasker_worker: Any) -> None:
    def register(worker: Any) -> None:
        @worker.handler("greet")
        async def greet(ctx: Any, step: Any) -> str:
            return f"hello {step.inputs['name']}"

    async with tasker_worker(namespaces=["toolkit"], handlers=register) as run:
        [step] = await run.send("toolkit", "greet", [{"name": "ada"}])
        outcome = await run.outcome(step)
    assert (outcome["status"], outcome["result"], outcome["handler"]) == ("succeeded", "hello ada", "greet")


def test_an_open_circuit_makes_the_worker_degraded_with_the_reason() -> None:
    from tasker_worker.domain.health import DatabaseFigures, Health, Thresholds, WorkerFigures, judge

    h = harness(**{"circuit_breaker.failure_threshold": 1})
    h.circuits.record_unavailable("charge", "payment gateway: connection refused")
    snap = {"event_system": {"deployment_mode": "PollingOnly"}, "circuits": h.circuits.open_circuits()}
    limits = Thresholds(max_queue_age_s=300, max_xmin_age_s=300, max_error_rate=0.5, max_notify_queue_usage=0.5)
    report = judge(DatabaseFigures(reachable=True), [WorkerFigures.from_status("w1", snap)], [], limits)
    assert report.status is Health.DEGRADED
    assert report.reasons == [
        "worker w1 circuit charge: open: payment gateway: connection refused (its steps wait; next probe in 30.0s)"
    ]
    h.circuits.record_other("charge")
    snap["circuits"] = h.circuits.open_circuits()
    assert judge(DatabaseFigures(reachable=True), [WorkerFigures.from_status("w1", snap)], [], limits).status is (
        Health.HEALTHY
    )


def test_asking_for_containers_without_docker_fails_instead_of_skipping(tmp_path: Path) -> None:
    """``TASKER_TEST_CONTAINERS=1`` with no Docker engine answering: the database tests error
    with the reason; they are not skipped (a run that tested nothing must not pass)."""
    (tmp_path / "test_needs_db.py").write_text("def test_db(tasker_db_url):\n    assert tasker_db_url\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER_")}
    env.update(TASKER_TEST_CONTAINERS="1", DOCKER_HOST=f"unix://{tmp_path}/no-docker.sock")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0, done.stdout
    assert "1 error" in done.stdout and "skipped" not in done.stdout
    assert "TASKER_TEST_CONTAINERS=1 but no Docker engine answers" in done.stdout


@pytest.mark.anyio
async def test_a_handler_policy_overrides_retry_in_the_harness() -> None:
    h = harness()

    @h.handler("charge", max_attempts=5, backoff=("10s", "40s"), retry_on=(ConnectionError,), dlq=False)
    def charge(ctx: Any, step: Any) -> None:
        raise ConnectionError("card network down") if step.inputs.get("flaky") else ValueError("bad card")

    flaky = str(h.send("charge", {"flaky": True}).step_uuid)
    bad = str(h.send("charge", {}).step_uuid)
    await h.run_until_settled()
    # Five attempts of the retried error ([retry] says three), backing off from 10 s; the other
    # error is not in retry_on: dead-lettered at once.
    retries = [r for r in h.runs if r.step_uuid == flaky and r.verdict == "retry"]
    assert [r.attempt for r in retries] == [1, 2, 3, 4]
    assert 8 <= retries[0].delay_s <= 12 and all(r.delay_s <= 40 * 1.2 for r in retries)
    assert (h.outcomes[flaky].status, h.outcomes[flaky].attempts) == ("failed", 5)
    assert h.outcomes[flaky].error is not None and h.outcomes[flaky].error["reason"] == "retries_exhausted"
    assert h.outcomes[bad].status == "dead_lettered" and h.outcomes[bad].attempts == 1
    assert h.outcomes[bad].error is not None and h.outcomes[bad].error["reason"] == "non_retryable_error"
    assert h.dead_letters == []  # dlq=False: the outcome row is the record


def test_handler_policies_are_checked_when_registered() -> None:
    h = harness()
    for bad in ({"max_attempts": 0}, {"backoff": ("10s", "1s")}, {"backoff": ("0s", "1s")}, {"retry_on": ("oops",)}):
        with pytest.raises(UsageError):
            h.handler("x", **bad)(lambda ctx, step: None)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_flow_control_in_the_harness_pause_priority_and_rate() -> None:
    """The harness's queue obeys the namespace's flow control as the database's claim does:
    nothing starts while paused, urgent steps first, and a rate spaces starts on the clock."""
    h = harness()
    ran: list[str] = []

    @h.handler("job")
    async def job(ctx: Any, step: Any) -> None:
        ran.append(ctx.inputs["name"])

    h.pause()
    h.send("job", {"name": "low"}, priority=9)
    h.send("job", {"name": "urgent"})
    assert await h.run_ready() == 0 and ran == []
    h.resume()
    await h.run_ready()
    # The first claim took both (the low one, sent first, ahead); from then on by priority.
    assert sorted(ran) == ["low", "urgent"]
    ran.clear()
    for name in ("late", "later"):
        h.send("job", {"name": name}, priority=5)
    h.send("job", {"name": "now"}, priority=0)
    await h.run_ready()
    assert ran == ["now", "late", "later"]

    ran.clear()
    h.limit(rate="2/s")
    for i in range(6):
        h.send("job", {"name": str(i)})
    began = h.clock.now()
    await h.run_until_settled(within=10)
    assert len(ran) == 6
    starts = [(r.at - began).total_seconds() for r in h.runs[-6:]]
    assert starts == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]  # burst 1, then one every half second
