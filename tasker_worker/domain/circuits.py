"""Circuit breakers: stop running a handler whose dependency keeps saying it is down.

Per handler, counted in a row: ``failure_threshold`` ``DependencyUnavailable`` with nothing
else in between opens the circuit. While open, the handler's steps are neither claimed nor
run; after the cooldown the circuit is half-open and lets exactly one step through as a probe.
The probe's success (or any verdict other than "unavailable") closes it; another
"unavailable" opens it again with the cooldown doubled, up to ``max_cooldown``.

Pure: time comes from a ``Clock``; the processor reports outcomes and asks before running.
Handlers that never reported "unavailable" have no entry, so the common path is one failed
dict lookup.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tasker_worker.domain.clock import Clock, SystemClock


class CircuitState(enum.StrEnum):
    """Where a handler's circuit is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class HandlerCircuit:
    """The circuit of one handler."""

    handler: str
    state: CircuitState = CircuitState.CLOSED
    #: "unavailable" verdicts in a row.
    failures: int = 0
    opened_at: datetime | None = None
    cooldown: timedelta = timedelta(0)
    probe_in_flight: bool = False
    reason: str | None = None
    times_opened: int = 0


@dataclass
class CircuitBreakers:
    """All handler circuits of one worker."""

    failure_threshold: int = 5
    cooldown: timedelta = timedelta(seconds=30)
    max_cooldown: timedelta = timedelta(minutes=5)
    enabled: bool = True
    clock: Clock = field(default_factory=SystemClock)
    circuits: dict[str, HandlerCircuit] = field(default_factory=dict)

    def allow(self, handler: str) -> bool:
        """May a step of ``handler`` start now? In half-open state, yes for one probe at a time."""
        circuit = self.circuits.get(handler)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return True
        if circuit.state is CircuitState.OPEN:
            if self._remaining(circuit) > 0:
                return False
            circuit.state = CircuitState.HALF_OPEN
        if circuit.probe_in_flight:
            return False
        circuit.probe_in_flight = True
        return True

    def record_unavailable(self, handler: str, reason: str) -> bool:
        """The handler said its dependency is down; return True if this opened the circuit."""
        if not self.enabled:
            return False
        circuit = self.circuits.setdefault(handler, HandlerCircuit(handler))
        circuit.failures += 1
        circuit.reason = reason
        if circuit.state is CircuitState.HALF_OPEN:
            circuit.probe_in_flight = False
            self._open(circuit, min(self.max_cooldown, max(self.cooldown, circuit.cooldown * 2)))
            return True
        if circuit.state is CircuitState.CLOSED and circuit.failures >= self.failure_threshold:
            self._open(circuit, self.cooldown)
            return True
        return False

    def record_other(self, handler: str) -> bool:
        """The handler ran and did not say "unavailable"; return True if this closed the circuit."""
        circuit = self.circuits.get(handler)
        if circuit is None:
            return False
        was_open = circuit.state is not CircuitState.CLOSED
        # Forget the handler: the next "unavailable" starts counting from scratch.
        del self.circuits[handler]
        return was_open

    def release_probe(self, handler: str) -> None:
        """A probe step ended without a verdict (released, cancelled): let another one through."""
        circuit = self.circuits.get(handler)
        if circuit is not None:
            circuit.probe_in_flight = False

    def state_of(self, handler: str) -> CircuitState:
        """The state of ``handler``'s circuit."""
        circuit = self.circuits.get(handler)
        return CircuitState.CLOSED if circuit is None else circuit.state

    def retry_after(self, handler: str) -> float:
        """Seconds until a step of ``handler`` may run again (0 when it may now)."""
        circuit = self.circuits.get(handler)
        if circuit is None or circuit.state is CircuitState.CLOSED:
            return 0.0
        if circuit.state is CircuitState.OPEN:
            return self._remaining(circuit)
        # Half-open with a probe running: look again after a short while.
        return min(1.0, self.cooldown.total_seconds())

    def skipped(self) -> list[str]:
        """Handlers not to claim now: open with the cooldown running, or half-open with the
        probe running (claiming more of their steps would only hand them back)."""
        return [
            h
            for h, c in self.circuits.items()
            if (c.state is CircuitState.OPEN and self._remaining(c) > 0)
            or (c.state is CircuitState.HALF_OPEN and c.probe_in_flight)
        ]

    def open_circuits(self) -> dict[str, dict[str, Any]]:
        """Every circuit that is not closed, for status and health."""
        return {
            h: {
                "state": c.state.value,
                "reason": c.reason,
                "failures_in_a_row": c.failures,
                "retry_in_s": round(self._remaining(c), 3) if c.state is CircuitState.OPEN else 0.0,
                "times_opened": c.times_opened,
            }
            for h, c in self.circuits.items()
            if c.state is not CircuitState.CLOSED
        }

    def _open(self, circuit: HandlerCircuit, cooldown: timedelta) -> None:
        circuit.state = CircuitState.OPEN
        circuit.opened_at = self.clock.now()
        circuit.cooldown = cooldown
        circuit.times_opened += 1

    def _remaining(self, circuit: HandlerCircuit) -> float:
        if circuit.opened_at is None:
            return 0.0
        left = circuit.opened_at + circuit.cooldown - self.clock.now()
        return max(0.0, left.total_seconds())


__all__ = ["CircuitBreakers", "CircuitState", "HandlerCircuit"]
