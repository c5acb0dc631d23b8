"""WorkerPresence's retry logic, with an in-memory stand-in for the registry commands (pure
logic: the database side of registration and heartbeats is tested in test_registry)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import psycopg
import pytest

from tasker_worker.config.models import RegistryConfig
from tasker_worker.domain.workers import Heartbeat, WorkerRegistration, WorkerStatus
from tasker_worker.errors import InvalidTransition, RegistrationFailed, WorkerStartupError
from tasker_worker.fleet.presence import WorkerPresence

pytestmark = pytest.mark.anyio


class FakeCommands:
    """Fails the first ``register_failures`` registrations and ``beat_failures`` heartbeats."""

    def __init__(self, register_failures: int = 0, beat_failures: int = 0, deregistered_once: bool = False) -> None:
        self.register_failures = register_failures
        self.beat_failures = beat_failures
        self.deregistered_once = deregistered_once
        self.register_calls = 0
        self.beats: list[Heartbeat] = []
        self.beat_calls = 0
        self.enough = anyio.Event()

    async def register(self, registration: WorkerRegistration, *, on_conflict: str = "rename") -> str:
        self.register_calls += 1
        if self.register_calls <= self.register_failures:
            raise psycopg.OperationalError("connection refused")
        return registration.worker_id or "generated"

    async def heartbeat(self, worker_id: str, heartbeat: Heartbeat) -> WorkerStatus:
        self.beat_calls += 1
        if self.deregistered_once:
            self.deregistered_once = False
            raise InvalidTransition(worker_id, "deregistered", "active", "none (final)")
        if self.beat_calls <= self.beat_failures:
            raise psycopg.OperationalError("server closed the connection")
        self.beats.append(heartbeat)
        if len(self.beats) >= 3:
            self.enough.set()
        return WorkerStatus.ACTIVE

    async def deregister(self, worker_id: str, reason: str, final: Any = None) -> None:
        raise psycopg.OperationalError("gone")


def presence(commands: FakeCommands, **config: Any) -> WorkerPresence:
    settings = RegistryConfig(
        registration_attempts=config.pop("attempts", 3),
        registration_max_delay=timedelta(milliseconds=10),
        heartbeat_interval=timedelta(milliseconds=10),
    )
    registration = WorkerRegistration(worker_id="p1", name="n", hostname="h", pid=1)
    return WorkerPresence(commands, lambda: registration, settings, lambda: Heartbeat(processed=1))  # type: ignore[arg-type]


async def test_registration_is_retried_then_succeeds() -> None:
    commands = FakeCommands(register_failures=2)
    assert await presence(commands, attempts=3).register() == "p1"
    assert commands.register_calls == 3


async def test_registration_gives_up_after_the_limit_with_a_clear_error() -> None:
    commands = FakeCommands(register_failures=10)
    with pytest.raises(RegistrationFailed) as info:
        await presence(commands, attempts=3).register()
    assert commands.register_calls == 3
    assert "after 3 attempts" in str(info.value) and "registration_attempts" in str(info.value)
    assert isinstance(info.value, WorkerStartupError)


async def test_failed_heartbeats_are_retried_and_never_stop_the_loop() -> None:
    commands = FakeCommands(beat_failures=4)
    p = presence(commands)
    await p.register()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(p.run)
            await commands.enough.wait()
            tg.cancel_scope.cancel()
    assert p.heartbeat_failures == 4 and p.heartbeats_sent >= 3


async def test_a_worker_deregistered_from_outside_registers_again() -> None:
    commands = FakeCommands(deregistered_once=True)
    p = presence(commands)
    await p.register()
    assert await p.beat() is WorkerStatus.ACTIVE
    assert commands.register_calls == 2 and p.worker_id == "p1"


async def test_deregistration_failure_is_not_an_error() -> None:
    p = presence(FakeCommands())
    await p.register()
    await p.deregister("SIGTERM")  # logs; the supervisor marks the worker offline later
