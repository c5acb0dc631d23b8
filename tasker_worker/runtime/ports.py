"""What the step side needs from outside it: a store of queued steps, and the claim side's timers.

``StepStore`` is the narrow port the step runner and the outcome writer (``steps.py``,
``writer.py``) work through: ``db.queue_client.QueueClient`` implements it on PostgreSQL and
``testing.memory.MemoryStore`` in memory, and one conformance suite (``tests/test_store.py``)
runs against both. ``Wakeups`` is how they ask the claim side (``processor.py``) to come back
to a queue later.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from tasker_worker.db.queue_client import RetryRequest
from tasker_worker.domain.flow import ClaimBatch
from tasker_worker.domain.steps import ClaimedMessage, Outcome, Source

#: Wake slightly after the moment something falls due (a put-back's delay, a vt, a ready_at),
#: so that the claim does not run a hair early and find nothing.
WAKE_MARGIN_S = 0.05


class StepStore(Protocol):
    """Claim, settle, put back, dead-letter, extend and announce the messages of step queues.

    Every write about a claimed message is fenced on the ``read_ct`` it was claimed with: a
    message claimed again since (its vt lapsed) is left as it is and missing from the answer.
    """

    async def claim(
        self,
        queue: str,
        vt_seconds: int,
        qty: int,
        source: Source,
        *,
        worker_id: str | None = None,
        skip_handlers: Sequence[str] = (),
        skip_msgs: Sequence[int] = (),
        announce: bool = False,
    ) -> ClaimBatch[ClaimedMessage]:
        """Up to ``qty`` visible messages, each invisible for ``vt_seconds``: oldest first, or
        under the namespace's flow control (``domain/flow.py``: pause, fleet-wide limits,
        priority, groups), whose ``hold`` says what held the others back."""
        ...

    async def note_flow_fields(self, namespace: str, priority: bool, groups: bool) -> None:
        """Steps of ``namespace`` carry priorities or groups: claim it in that order from now on."""
        ...

    async def settle(self, queue: str, worker_id: str, outcomes: Sequence[Outcome]) -> set[int]:
        """Delete (or archive) each message and record its outcome row; the msg_ids settled."""
        ...

    async def dead_letter(self, queue: str, worker_id: str, outcomes: Sequence[Outcome]) -> dict[int, bool]:
        """Move each message to ``<queue>_dlq`` and record its outcome row; ``{msg_id: moved}``."""
        ...

    async def retry(
        self, queue: str, requests: Sequence[RetryRequest], *, worker_id: str | None = None
    ) -> dict[int, bool]:
        """Put each message back after its delay (all counting an attempt, or none);
        ``{msg_id: applied}``."""
        ...

    async def extend_vt(self, queue: str, msgs: Sequence[ClaimedMessage], vt_ms: int) -> dict[int, datetime]:
        """Push the vt of messages still held; ``{msg_id: new vt}``."""
        ...

    async def write_progress(self, rows: Sequence[Mapping[str, Any]], worker_id: str) -> None:
        """Store what running steps reported with ``ctx.progress`` (the newest value per step)."""
        ...

    async def pending_cancellations(self, step_uuids: Sequence[str]) -> dict[str, str | None]:
        """The cancel requests of these steps: ``{step_uuid: who asked}``."""
        ...

    async def announce_ready(self, queue: str, msg_ids: Sequence[int], delay_s: float = 0.0) -> None:
        """Tell the listening workers that ``msg_ids`` are ready (again) in ``delay_s``."""
        ...

    async def capable_worker_exists(self, capability: str, fresh_within_s: float, other_than: str) -> bool:
        """Whether another live worker offers ``capability``."""
        ...

    async def settle_in_transaction(self, outcome: Outcome, worker_id: str, conn: Any) -> tuple[bool, bool]:
        """Settle one claim inside a handler's own transaction: (settled, outcome row written)."""
        ...


class Wakeups(Protocol):
    """The claim side's timers, as the step side asks for them."""

    def schedule(self, queue: str, delay_s: float, source: Source) -> None:
        """Wake ``queue``'s claim loop after ``delay_s`` (a put-back falling due, a vt lapsing)."""
        ...

    def leave_alone(self, queue: str, msg_id: int, until: float) -> None:
        """Do not claim ``msg_id`` of ``queue`` before monotonic time ``until``."""
        ...


class NoWakeups:
    """Wakeups nobody acts on: for a runner driven from outside (the harness moves its clock
    and claims by itself)."""

    def schedule(self, queue: str, delay_s: float, source: Source) -> None:
        """Ignored."""

    def leave_alone(self, queue: str, msg_id: int, until: float) -> None:
        """Ignored."""


__all__ = ["WAKE_MARGIN_S", "NoWakeups", "StepStore", "Wakeups"]
