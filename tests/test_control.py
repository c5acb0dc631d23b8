"""Running workers change deployment mode without a restart, and open circuits for handlers
whose dependency is down — against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import psycopg
import pytest
from chaos import poll_until

from tasker_worker.config.models import DatabaseConfig, DeploymentMode
from tasker_worker.db.connection import open_pool
from tasker_worker.errors import DependencyUnavailable
from tasker_worker.fleet.eventlog import replay_and_compare
from tasker_worker.handlers.registry import HandlerRegistry
from tasker_worker.testing import fetch, fetch_value, make_config, running_worker, send_steps, wait_until

NS = "ctl"
QUEUE = f"worker_{NS}_queue"
REPO = Path(__file__).resolve().parent.parent


async def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI off the event loop: the worker under test runs on this loop, and the command may
    wait on a row lock the worker holds (a heartbeat) until the worker gets to run."""
    return await anyio.to_thread.run_sync(lambda: run_cli(env, *args))


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tasker_worker.cli.main", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.anyio
async def test_mode_set_switches_a_running_worker_and_keeps_its_in_flight_step(
    url: str, cli_env: dict[str, str]
) -> None:
    gate = asyncio.Event()
    started = asyncio.Event()
    reg = HandlerRegistry()

    @reg.handler("gated", timeout="60s")
    async def gated(ctx: Any, step: Any) -> str:
        started.set()
        await gate.wait()
        return "done"

    config = make_config(mode="PollingOnly", namespaces=[NS])
    async with running_worker(url, config, registry=reg) as worker:
        assert worker.event_system is not None and worker.event_system.listener is None
        [first] = await send_steps(url, NS, "gated", [{}])
        await asyncio.wait_for(started.wait(), 20)

        done = await cli(cli_env, "mode", "set", "Hybrid", "--namespace", NS)
        assert done.returncode == 0, done.stderr
        assert worker.worker_id in done.stdout
        # PollingOnly holds no LISTEN connection: it finds the request at its control check.
        await wait_until(lambda: worker.event_system.mode is DeploymentMode.HYBRID, timeout=20)
        assert worker.event_system.listener is not None
        await wait_until(worker.event_system.listener_healthy, timeout=20)

        gate.set()  # the step claimed before the switch finishes after it
        await wait_until(lambda: fetch_value(url, "SELECT count(*) FROM tasker.step_results"), timeout=20)

        # Now a step is picked up through NOTIFY (the gate stays open).
        [second] = await send_steps(url, NS, "gated", [{}])
        await wait_until(
            lambda: fetch_value(url, "SELECT count(*) FROM tasker.step_results WHERE source = 'event'"), timeout=20
        )

        # Listening workers act on the control notification at once; the listener both modes
        # use keeps its connection.
        listener = worker.event_system.listener
        done = await cli(cli_env, "mode", "set", "EventDrivenOnly", "--worker", worker.worker_id)
        assert done.returncode == 0, done.stderr
        await wait_until(lambda: worker.event_system.mode is DeploymentMode.EVENT_DRIVEN_ONLY, timeout=20)
        assert worker.event_system.poller is None
        assert worker.event_system.listener is listener and listener.healthy
        status = worker.status()
        assert status["event_system"]["deployment_mode"] == "EventDrivenOnly"
        assert status["counters"]["mode_changes"] == 2
        assert status["counters"].get("listener_reconnects", 0) == 0

        shown = await cli(cli_env, "status")
        assert "mode=EventDrivenOnly" in shown.stdout, shown.stdout

    rows = await fetch(url, "SELECT step_uuid::text, status FROM tasker.step_results ORDER BY finished_at")
    assert rows == [(first["step_uuid"], "succeeded"), (second["step_uuid"], "succeeded")]
    changes = await fetch(
        url,
        "SELECT data->>'from', data->>'to', data->>'source' FROM tasker.events"
        " WHERE event_type = 'DeploymentModeChanged' ORDER BY event_id",
    )
    assert changes == [("PollingOnly", "Hybrid", "control"), ("Hybrid", "EventDrivenOnly", "control")]
    assert await fetch(url, "SELECT deployment_mode, requested_mode FROM tasker.workers") == [("EventDrivenOnly", None)]
    pool = await open_pool(url, DatabaseConfig(), max_size=1)
    try:
        report = await replay_and_compare(pool)
    finally:
        await pool.close()
    assert report.consistent, report.differences


@pytest.mark.anyio
async def test_a_mode_the_worker_cannot_run_is_refused_and_it_keeps_working(url: str) -> None:
    config = make_config(mode="PollingOnly", namespaces=[NS], overrides={"event_system.listener.enabled": False})
    async with running_worker(url, config) as worker:
        assert await worker.set_mode("EventDrivenOnly") is False
        assert worker.event_system is not None and worker.event_system.mode is DeploymentMode.POLLING_ONLY
        assert "listener" in worker.status()["control"]["last_error"]
        await send_steps(url, NS, "noop", [{}])
        await wait_until(lambda: fetch_value(url, "SELECT count(*) FROM tasker.step_results"), timeout=20)


def test_mode_set_reports_when_no_worker_matches(url: str, cli_env: dict[str, str]) -> None:
    done = run_cli(cli_env, "mode", "set", "Hybrid", "--worker", "nobody")
    assert done.returncode == 1 and "no live worker matched" in done.stdout
    bad = run_cli(cli_env, "mode", "set", "Sometimes")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.parametrize("processes", [1, 2])
def test_sighup_rereads_the_config_and_switches_mode(
    url: str, cli_env: dict[str, str], tmp_path: Path, processes: int
) -> None:
    """One worker, or a supervisor that passes SIGHUP on to each of its worker processes."""
    config_dir = tmp_path / "config"
    shutil.copytree(REPO / "config", config_dir)
    overlay = config_dir / "tasker" / "environments" / "test" / "worker.toml"
    env = {**cli_env, "TASKER_CONFIG_DIR": str(config_dir), "TASKER__WORKER__NAMESPACES": f'["{NS}"]'}
    err_path = tmp_path / "stderr.log"
    with err_path.open("w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tasker_worker.cli.main", "run", "--processes", str(processes)],
            env={**env, "TASKER__LOGGING__LEVEL": "INFO"},
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            text=True,
        )
    try:
        poll_until(
            lambda: _value(url, "SELECT count(*) FROM tasker.workers WHERE status = 'active'") == processes,
            30,
            "active",
        )
        assert _value(url, "SELECT string_agg(DISTINCT deployment_mode, ',') FROM tasker.workers") == "PollingOnly"
        original = overlay.read_text()
        # A broken file is refused and the worker goes on with the config in force.
        overlay.write_text(original + "\n[event_system]\ndeployment_mode = 'Sometimes'\n")
        proc.send_signal(signal.SIGHUP)
        poll_until(lambda: _read_so_far(err_path).count("configuration not reloaded") == processes, 30, "the refusals")
        overlay.write_text(
            original.replace('deployment_mode = "PollingOnly"', 'deployment_mode = "Hybrid"').replace(
                'shutdown_timeout = "5s"', 'shutdown_timeout = "6s"'
            )
        )
        proc.send_signal(signal.SIGHUP)
        hybrid = "SELECT count(*) FROM tasker.workers WHERE deployment_mode = 'Hybrid'"
        poll_until(lambda: _value(url, hybrid) == processes, 30, "Hybrid everywhere")
        sources = (
            "SELECT string_agg(data->>'source', ',') FROM tasker.events WHERE event_type = 'DeploymentModeChanged'"
        )
        assert _value(url, sources) == ",".join(["sighup"] * processes)
        # Re-reading an unchanged file changes nothing and records nothing.
        proc.send_signal(signal.SIGHUP)
        poll_until(lambda: _read_so_far(err_path).count("configuration re-read") == 2 * processes, 30, "re-reads")
        assert _value(url, sources) == ",".join(["sighup"] * processes)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    err = err_path.read_text()
    assert proc.returncode == 0, err
    assert err.count("deployment mode changed from PollingOnly to Hybrid") == processes
    assert "changes to worker take effect at the next restart" in err


def _read_so_far(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _value(url: str, query: str) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
        return row[0] if row else None


@pytest.mark.anyio
async def test_circuit_opens_leaves_the_handlers_steps_unclaimed_and_closes_after_a_probe(
    url: str, cli_env: dict[str, str]
) -> None:
    service = {"up": False, "runs": 0}
    reg = HandlerRegistry()

    @reg.handler("charge")
    async def charge(ctx: Any, step: Any) -> str:
        service["runs"] += 1
        if not service["up"]:
            raise DependencyUnavailable("payment gateway refused the connection")
        return "charged"

    # EventDrivenOnly: no poller comes back for the steps left unclaimed; timers must.
    config = make_config(
        mode="EventDrivenOnly",
        namespaces=[NS],
        overrides={
            "circuit_breaker.failure_threshold": 2,
            "circuit_breaker.cooldown": "3s",
            "circuit_breaker.max_cooldown": "3s",
            "retry.base_delay": "10ms",
            "retry.max_delay": "20ms",
            "retry.jitter": 0.0,
        },
    )
    async with running_worker(url, config, registry=reg) as worker:
        assert worker.processor is not None
        circuits = worker.processor.steps.circuits
        await send_steps(url, NS, "charge", [{"i": i} for i in range(2)])
        await wait_until(lambda: circuits.state_of("charge") == "open", timeout=20)
        runs_at_open = service["runs"]
        # Open: the charge steps stay in the queue while other handlers go on.
        [other] = await send_steps(url, NS, "noop", [{}])
        await wait_until(
            lambda: fetch_value(
                url, "SELECT count(*) FROM tasker.step_results WHERE step_uuid = %s", (other["step_uuid"],)
            ),
            timeout=20,
        )
        assert service["runs"] == runs_at_open
        health = worker.status()["circuits"]["charge"]
        assert health["state"] == "open" and "payment gateway" in health["reason"]
        # No attempt was used up by the unavailable dependency.
        assert await fetch(url, f"SELECT max(read_ct) FROM pgmq.q_{QUEUE}") == [(0,)]
        # The heartbeat carries it to `status`.
        await wait_until(lambda: fetch_value(url, "SELECT stats -> 'circuits' ? 'charge' FROM tasker.workers"), 20)
        shown = await cli(cli_env, "status")
        assert "circuit charge:" in shown.stdout and "payment gateway" in shown.stdout, shown.stdout

        # More of its steps arrive meanwhile: they wait too, and drain once it closes.
        await send_steps(url, NS, "charge", [{"i": i} for i in range(2, 7)])
        service["up"] = True  # the probe after the cooldown succeeds and closes the circuit

        async def all_charged() -> bool:
            return await fetch_value(url, "SELECT count(*) FROM tasker.step_results WHERE handler = 'charge'") == 7

        await wait_until(all_charged, timeout=20)
        assert circuits.state_of("charge") == "closed"
        assert worker.stats.snapshot()["counters"]["circuits_opened"] >= 1
    statuses = await fetch(url, "SELECT handler, status, attempts FROM tasker.step_results ORDER BY handler")
    assert {(h, s) for h, s, _ in statuses} == {("charge", "succeeded"), ("noop", "succeeded")}
    assert {a for h, _, a in statuses if h == "charge"} == {1}
