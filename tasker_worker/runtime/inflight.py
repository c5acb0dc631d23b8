"""The claimed messages a worker holds, and its slots.

A message is held from its claim until the write that ends its step is over: the step runner
adds it (``hold``), the outcome writer ends it (``release_hold``), the claim side keeps its vt
and, at shutdown, gives back those still running. A step's slot is free again as soon as its
handler is done (``hand_off``), while its outcome waits for the writer: at most
``max_concurrent`` outcomes wait so, so at most twice ``max_concurrent`` messages are held, plus
the prefetched ones (claimed ahead, not started: ``buffered``), which take no slot.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio

from tasker_worker.domain.steps import ClaimedMessage

#: How many step_uuids recorded here are remembered (``InFlight.recorded_here``).
RECORDED_MEMORY = 4_096


@dataclass(slots=True, eq=False)
class HeldStep:
    """One claimed message held here, and where its step is."""

    msg: ClaimedMessage
    #: Monotonic time at which our claim expires (pushed by each vt extension).
    vt_deadline: float
    #: Its end was handed to the outcome writer: nothing else may end it.
    ending: bool = False
    #: Its end is over (written, fenced out, or given up on): it is no longer held.
    ended: bool = False
    #: Its handler is done and its outcome waits for the writer: the slot is free again.
    handed_off: bool = False
    #: The integer of the step_uuid this message holds in ``InFlight.steps`` (None: none).
    step_key: int | None = None
    #: The task running its step.
    task: asyncio.Task[None] | None = None
    #: An extension of its vt was refused: someone else holds the message now.
    lost_claim: bool = False
    #: Claimed ahead (prefetched): held, its vt kept, but its step not started yet and no slot taken.
    buffered: bool = False
    #: The context its handler runs with, once it runs (cancellation reaches the handler there).
    ctx: Any = None
    #: Who asked the step to stop (``steps cancel``), once someone did.
    cancel_by: str | None = None
    #: Its task was cancelled because of that (its grace over): not the worker's own cancel.
    cancel_fired: bool = False
    #: Given back at shutdown: its run's own end (if it comes) is not written.
    releasing: bool = False


class InFlight:
    """The held messages by (queue, msg_id), the steps running by step_uuid, and the slots."""

    def __init__(self, max_concurrent: int, vt_seconds: int) -> None:
        self.max_concurrent = max_concurrent
        self.vt_seconds = vt_seconds
        self.entries: dict[tuple[str, int], HeldStep] = {}
        #: The steps held here by the integer of their step_uuid (a UUID's hash is a Python-level
        #: call per step), with their (queue, msg_id).
        self.steps: dict[int, tuple[str, int]] = {}
        #: How many entries are handed off.
        self.handed_off = 0
        #: How many entries are prefetched (claimed, their step not started).
        self.buffered = 0
        #: The steps whose outcome this worker recorded last (bounded, oldest forgotten): a
        #: second message of such a step claimed in the same batch, which its claim's dedup
        #: probe could not see yet, is settled without running.
        self.recorded: OrderedDict[int, None] = OrderedDict()
        self._slot_freed = anyio.Event()
        #: How many holds have ended per queue (their outcome written or their message given
        #: back): what a namespace's ``max_running`` counts in the database drops only then, not
        #: at a hand-off. Per queue: a held claim is not brought back by other queues' steps.
        self.holds_ended: dict[str, int] = {}
        self._hold_ended = anyio.Event()
        self._nudges = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def free_slots(self) -> int:
        """How many more steps may start now."""
        return self.max_concurrent - len(self.entries) + self.handed_off + self.buffered

    async def wait_slot(self) -> None:
        """Until a slot frees up (one more than ``free_slots`` said just before)."""
        # A set event is from frees already counted in free_slots (checked just before, with
        # no await in between): wait for the next one. Renewing the event here rather than at
        # every free keeps an allocation off each step.
        if self._slot_freed.is_set():
            self._slot_freed = anyio.Event()
        await self._slot_freed.wait()

    def nudge(self) -> None:
        """Wake whoever waits for a slot without freeing one (they look again at why they wait)."""
        self._slot_freed.set()
        self._nudges += 1
        self._hold_ended.set()

    async def wait_hold_ended(self, queue: str, since: int) -> None:
        """Until a hold of ``queue`` ends after ``since`` (its ``holds_ended`` count), or a nudge.

        A claim held back by ``max_running`` waits here: the holds that ended while that claim
        was on its way (a writer's flush ends many at once) count, so it claims again at once
        instead of waiting for the next one. Waiting for a freed slot would miss those, and a
        hand-off frees a slot before the database stops counting the step as running."""
        nudges = self._nudges
        while self.holds_ended.get(queue, 0) == since and self._nudges == nudges:
            if self._hold_ended.is_set():
                self._hold_ended = anyio.Event()
            await self._hold_ended.wait()

    def hold(self, msg: ClaimedMessage, *, buffered: bool = False) -> HeldStep:
        """Hold a message just claimed (its vt counted from when the claim was sent:
        ``ClaimedMessage.vt_deadline``); ``buffered``: prefetched, taking no slot until
        ``unbuffer``."""
        entry = self.entries[(msg.queue, msg.msg_id)] = HeldStep(
            msg, msg.vt_deadline(self.vt_seconds), buffered=buffered
        )
        if buffered:
            self.buffered += 1
        return entry

    def unbuffer(self, entry: HeldStep) -> None:
        """A prefetched entry leaves the buffer: its step starts (taking a slot) or it ends."""
        if entry.buffered:
            entry.buffered = False
            self.buffered -= 1

    def get(self, queue: str, msg_id: int) -> HeldStep | None:
        """The entry of a message held here."""
        return self.entries.get((queue, msg_id))

    def hand_off(self, entry: HeldStep) -> None:
        """The handler is done and only the write is left: free the step's slot, so the next
        step starts while the writer batches this one with others (unless ``max_concurrent``
        outcomes wait already: then the slot frees when the write is over)."""
        if not entry.handed_off and self.handed_off < self.max_concurrent:
            entry.handed_off = True
            self.handed_off += 1
            self._slot_freed.set()

    def release_hold(self, entry: HeldStep) -> None:
        """The step of ``entry`` is over here: forget it and free its slot."""
        entry.ended = True
        self.unbuffer(entry)
        if self.entries.get((entry.msg.queue, entry.msg.msg_id)) is entry:
            del self.entries[(entry.msg.queue, entry.msg.msg_id)]
        if entry.step_key is not None:
            self.steps.pop(entry.step_key, None)
        if entry.handed_off:
            self.handed_off -= 1
        self._slot_freed.set()
        queue = entry.msg.queue
        self.holds_ended[queue] = self.holds_ended.get(queue, 0) + 1
        self._hold_ended.set()

    def note_recorded(self, step_key: int) -> None:
        """The outcome of the step with this step_uuid integer was recorded here."""
        recorded = self.recorded
        recorded[step_key] = None
        if len(recorded) > RECORDED_MEMORY:
            recorded.popitem(last=False)

    def recorded_here(self, step_key: int) -> bool:
        """Whether this worker recorded that step's outcome a moment ago."""
        return step_key in self.recorded

    def running(self) -> list[HeldStep]:
        """The entries whose end is not handed to the writer yet (their steps still run, or
        wait in the prefetch buffer)."""
        return [e for e in self.entries.values() if not e.ending]


__all__ = ["HeldStep", "InFlight"]
