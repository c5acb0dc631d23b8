"""Who claims a notified message: one worker, not the whole fleet (no I/O here).

Every listening worker of a namespace hears each notification. If all of them claimed, all but
one would come back empty: a sparse stream would cost a claim per worker per step. Instead each
worker ranks the live listening workers of the namespace for the notified message by rendezvous
hashing (the same order on every worker, from the registry's list and the message id, with no
coordination): the first ``immediate`` of them claim at once, and each of the others waits
``grace * (its rank - immediate + 1)`` and then claims only if it has not seen the message claimed
meanwhile. Claims made while a worker has peers announce what they took (``StepsClaimed`` of
``domain/notifications.py``), so the waiting ones normally find their message taken and never
send a statement.

A dead, busy or slow first choice therefore delays its messages by at most one grace per rank,
and the fallback poll stays the safety net underneath. ``immediate`` grows with the size of the
notified batch, so a burst is shared out at once rather than one grace later.
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Iterable, Mapping

#: How many recent claims a worker remembers per queue (what waiting checks look at).
CLAIMED_MEMORY = 4096


class ClaimRanking:
    """The live listening workers of each namespace, and a message's order among them."""

    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self._peers: dict[str, tuple[str, ...]] = {}
        self._seeds: dict[str, int] = {}

    def update(self, peers: Mapping[str, Iterable[str]]) -> None:
        """Replace the view: namespace -> ids of its live listening workers (self is added)."""
        view: dict[str, tuple[str, ...]] = {}
        for namespace, ids in peers.items():
            view[namespace] = tuple(sorted({*ids, self.self_id}))
        self._peers = view
        self._seeds = {w: zlib.crc32(w.encode()) for ids in view.values() for w in ids}

    def fleet(self, namespace: str) -> int:
        """How many listening workers ``namespace`` has (at least this one)."""
        return max(1, len(self._peers.get(namespace, ())))

    def rank(self, namespace: str, key: int) -> int:
        """This worker's place (0: first) in the order of ``namespace``'s workers for message ``key``."""
        ids = self._peers.get(namespace)
        if not ids or len(ids) == 1:
            return 0
        salt = b":%d" % key
        mine = zlib.crc32(salt, self._seeds[self.self_id])
        ahead = 0
        for w in ids:
            if w == self.self_id:
                continue
            score = zlib.crc32(salt, self._seeds[w])
            if score > mine or (score == mine and w < self.self_id):
                ahead += 1
        return ahead

    def immediate(self, namespace: str, message_count: int, batch_size: int) -> int:
        """How many of the first-ranked workers claim a notification of ``message_count`` at once."""
        return min(self.fleet(namespace), max(1, math.ceil(message_count / max(1, batch_size))))


class ClaimedMemory:
    """The messages of one queue recently claimed (by anyone), to answer "is it taken?"."""

    def __init__(self, size: int = CLAIMED_MEMORY) -> None:
        self._ids: set[int] = set()
        self._order: deque[int] = deque()
        self._size = size
        #: Ranges of claims too large to list (a burst): every id inside counts as claimed.
        self._ranges: deque[tuple[int, int]] = deque(maxlen=64)

    def add(self, ids: Iterable[int], lo: int | None = None, hi: int | None = None) -> None:
        """Remember ``ids`` (and the whole ``lo..hi`` when the list was truncated)."""
        for i in ids:
            if i not in self._ids:
                self._ids.add(i)
                self._order.append(i)
        while len(self._order) > self._size:
            self._ids.discard(self._order.popleft())
        if lo is not None and hi is not None:
            self._ranges.append((lo, hi))

    def forget(self, ids: Iterable[int]) -> None:
        """These messages are ready again (a notification said so after their claim: released,
        given back to a capable worker): a later claim must be seen anew."""
        if not self._ids and not self._ranges:
            return  # nothing remembered (a worker without peers): nothing to do per notification
        gone = set(ids) & self._ids
        if gone:
            self._ids -= gone
        if self._ranges:
            kept = [(lo, hi) for lo, hi in self._ranges if not any(lo <= i <= hi for i in ids)]
            if len(kept) != len(self._ranges):
                self._ranges.clear()
                self._ranges.extend(kept)

    def covers(self, ids: Iterable[int]) -> bool:
        """Whether every one of ``ids`` is known to be claimed."""
        for i in ids:
            if i not in self._ids and not any(lo <= i <= hi for lo, hi in self._ranges):
                return False
        return True
