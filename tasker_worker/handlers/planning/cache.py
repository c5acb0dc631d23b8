"""The grid cache: prepared grids kept across steps, keyed by their content's hash.

Robots plan many times on one map: a step whose map (the same cells, thresholds and robot
radius) was prepared by an earlier step in this process skips decoding, thresholding,
inflating and padding it. Keys are digests of what the step sent (``content_key``), so a hit
needs no decoding at all. Bounded in entries and in bytes, least recently used out first;
each worker process has its own.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from tasker_worker.handlers.planning.engine import PreparedGrid

#: Grids kept per process.
MAX_ENTRIES = 32
#: Bytes of prepared grids kept per process (a 2048x2048 grid takes 4.2 MB).
MAX_BYTES = 128 * 1024 * 1024


def content_key(data: str | bytes) -> str:
    """A digest of a map's content (128-bit BLAKE2b, hex)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


class GridCache:
    """A bounded LRU map from content keys to prepared grids, safe to share between threads."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("cache bounds must not be negative")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._grids: OrderedDict[Hashable, PreparedGrid] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._grids)

    @property
    def nbytes(self) -> int:
        """Bytes of the grids held."""
        return self._bytes

    def get_or_build(self, key: Hashable, build: Callable[[], PreparedGrid]) -> tuple[PreparedGrid, bool]:
        """The grid under ``key`` and ``True``, or ``build()``'s (kept when it fits) and ``False``.

        ``build`` runs outside the lock: two threads missing the same key at once both build
        it (the same grid), and neither waits for the other.
        """
        with self._lock:
            grid = self._grids.get(key)
            if grid is not None:
                self._grids.move_to_end(key)
                self.hits += 1
                return grid, True
            self.misses += 1
        grid = build()
        self._put(key, grid)
        return grid, False

    def _put(self, key: Hashable, grid: PreparedGrid) -> None:
        size = grid.nbytes
        if size > self.max_bytes or self.max_entries == 0:
            return
        with self._lock:
            old = self._grids.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._grids[key] = grid
            self._bytes += size
            while len(self._grids) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._grids.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Forget every grid (and the counters)."""
        with self._lock:
            self._grids.clear()
            self._bytes = 0
            self.hits = self.misses = 0


#: The process's grid cache, shared by its planning threads.
GRID_CACHE = GridCache()
