"""Running searches: prepared grids, reusable search memory, and the choice of kernels.

A ``PreparedGrid`` is a decoded grid in the kernels' layout (padded, flattened, read-only): the
grid cache (``cache``) keeps them across steps. ``search_pairs`` plans many (start, goal) pairs
on one prepared grid with one ``Workspace`` (the per-node arrays and the open list), which is
never cleared between searches (generation stamps, see ``kernels``) and goes back to a small
pool afterwards, so a step pays neither for allocating nor for resetting a grid-sized array.

The compiled kernels (``kernels``, numba) are loaded in a background thread on first use
(``load_kernels``). Compiling them takes about five seconds the first time on a machine, so
that thread has a child Python process compile them into numba's on-disk cache first (on
another core, without the worker's GIL, and finishing even if the worker stops meanwhile),
then loads them from that cache (about half a second); once a child has compiled them, later
processes skip the child. A step that comes meanwhile waits
for them a bounded time (``KERNEL_WAIT_S``), then the pure-Python implementation (``search``)
plans it, as it plans everything where numba cannot run. The tests hold both to the same
reference, and every result says which one ran (``KernelKind``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

from tasker_worker.handlers.planning import search as pysearch
from tasker_worker.handlers.planning.search import SearchResult

log = logging.getLogger(__name__)

Algorithm = Literal["astar", "dijkstra", "theta_star"]
KernelKind = Literal["compiled", "python"]

#: Workspaces kept for reuse (one per planning thread on a 2-core machine; more are made when
#: more threads plan at once, and dropped afterwards).
MAX_POOLED_WORKSPACES = 2
#: A workspace larger than this (16 bytes per cell: a 4096x4096 grid) is dropped after use
#: rather than kept resident between steps.
MAX_POOLED_WORKSPACE_BYTES = 256 * 1024 * 1024
#: Generations run up to here before the stamps are cleared (int32 stamps).
_MAX_GEN = 2**31 - 8
#: First size of the open lists (grown by doubling in the kernels).
_HEAP_START = 1024
#: An entry of the A* and Theta* heap.
HEAP_ENTRY = np.dtype([("f", np.float64), ("g", np.float64), ("v", np.int64)])
#: A step that comes while the kernels load waits for them until this long after loading
#: began, then plans in Python: loading them from numba's cache takes about a second (longer
#: while Python planning holds the GIL); a first compile, about five, is not worth waiting for
#: on a small grid.
KERNEL_WAIT_S = 2.0
#: ...except on a grid of more cells than this, which Python would take longer to search than
#: a first compile takes: it waits up to ``KERNEL_WAIT_LARGE_S``.
LARGE_GRID_CELLS = 512 * 512
KERNEL_WAIT_LARGE_S = 30.0


class PreparedGrid:
    """A blocked-cell grid in the kernels' layout: ``(height + 2) x (width + 2)`` cells with a
    blocked border, flattened row-major (``blk``, uint8), immutable so that threads share it.
    ``blocked`` is the unpadded ``(height, width)`` view."""

    __slots__ = ("blk", "blocked", "height", "pw", "width")

    def __init__(self, blocked: np.ndarray) -> None:
        self.height, self.width = (int(d) for d in blocked.shape)
        self.pw = self.width + 2
        padded = np.ones((self.height + 2, self.pw), dtype=np.uint8)
        padded[1:-1, 1:-1] = blocked
        padded.flags.writeable = False
        self.blk: np.ndarray = padded.reshape(-1)
        self.blocked: np.ndarray = padded[1:-1, 1:-1].view(np.bool_)

    @property
    def nbytes(self) -> int:
        """Memory held (for the cache's bound)."""
        return int(self.blk.nbytes)

    def index(self, row: int, col: int) -> int:
        """Flat index of an (unpadded) cell."""
        return (row + 1) * self.pw + col + 1

    def cells(self, nodes: np.ndarray) -> np.ndarray:
        """``(row, col)`` pairs (shape ``(k, 2)``) of flat indices."""
        rows, cols = np.divmod(nodes.astype(np.int64), self.pw)
        return np.stack([rows - 1, cols - 1], axis=1)


class Workspace:
    """Per-node search arrays for grids of up to ``capacity`` padded cells, reused without
    clearing: a search takes a new generation (``next_gen``) instead."""

    __slots__ = ("buckets", "capacity", "g", "gen", "heap", "parent", "stamp")

    def __init__(self) -> None:
        self.capacity = 0
        self.g = np.empty(0, np.float64)
        self.parent = np.empty(0, np.int32)
        self.stamp = np.zeros(0, np.int32)
        self.gen = 0
        self.heap = np.empty(_HEAP_START, HEAP_ENTRY)
        self.buckets = np.empty((3, _HEAP_START), np.int64)

    @property
    def nbytes(self) -> int:
        """Memory held by the per-node arrays and the open lists."""
        return int(self.g.nbytes + self.parent.nbytes + self.stamp.nbytes + self.heap.nbytes + self.buckets.nbytes)

    def reserve(self, n: int) -> None:
        """Make room for a grid of ``n`` padded cells (new arrays only when it is larger)."""
        if n > self.capacity:
            # np.empty / np.zeros map fresh pages lazily: a search pays only for the nodes it reaches.
            self.g = np.empty(n, np.float64)
            self.parent = np.empty(n, np.int32)
            self.stamp = np.zeros(n, np.int32)
            self.gen = 0
            self.capacity = n

    def next_gen(self) -> int:
        """A generation no node of the stamps holds yet (``gen`` open, ``gen + 1`` closed)."""
        self.gen += 2
        if self.gen >= _MAX_GEN:
            self.stamp.fill(0)
            self.gen = 2
        return self.gen


_pool: list[Workspace] = []
_pool_lock = threading.Lock()


@contextmanager
def workspace(n: int) -> Iterator[Workspace]:
    """A workspace for ``n`` padded cells, from the pool when one is free."""
    with _pool_lock:
        ws = _pool.pop() if _pool else Workspace()
    ws.reserve(n)
    try:
        yield ws
    finally:
        if ws.nbytes <= MAX_POOLED_WORKSPACE_BYTES:
            with _pool_lock:
                if len(_pool) < MAX_POOLED_WORKSPACES:
                    _pool.append(ws)


# --- the compiled kernels ---------------------------------------------------------------------

_kernels: ModuleType | None = None
_state: Literal["idle", "loading", "ready", "failed"] = "idle"
_failure: str | None = None
_state_lock = threading.Lock()
_settled = threading.Event()
_load_began = 0.0


def kernels_state() -> tuple[str, str | None]:
    """``("idle" | "loading" | "ready" | "failed", why it failed)``."""
    return _state, _failure


def load_kernels(*, wait: bool = True, timeout: float | None = None) -> bool:
    """Compile (or load from numba's cache) the compiled kernels, once per process.

    With ``wait=False`` it starts the work in a daemon thread and returns at once; returns
    whether the kernels are ready now.
    """
    global _state, _load_began
    with _state_lock:
        if _state == "idle":
            _state = "loading"
            _load_began = time.monotonic()
            threading.Thread(target=_load, name="planning-kernels", daemon=True).start()
    if wait:
        _settled.wait(timeout)
    return _state == "ready"


#: How long the child process may take to compile the kernels.
COMPILE_TIMEOUT_S = 300.0
_COMPILE = "from tasker_worker.handlers.planning import engine; engine.warm_up_here()"


def warm_up_here() -> None:
    """Compile the kernels in this process (numba's cache keeps them for the next ones), and
    leave the mark that says so (``_compiled_mark``)."""
    from tasker_worker.handlers.planning import kernels

    _warm_up(kernels)
    mark = _compiled_mark()
    if mark is not None:
        try:
            mark.parent.mkdir(exist_ok=True)
            mark.touch()
        except OSError:
            pass  # a read-only package: the next process asks a child again, as before


def _compiled_mark() -> Path | None:
    """A file beside numba's cache whose name digests the kernels' source and the numba and
    Python versions: present once a child compiled exactly these kernels, so that later
    processes load them without asking a child (saving a second at each start)."""
    source = Path(__file__).with_name("kernels.py")
    try:
        digest = hashlib.blake2b(
            source.read_bytes() + importlib.metadata.version("numba").encode() + sys.version.encode(),
            digest_size=8,
        ).hexdigest()
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None
    return source.parent / "__pycache__" / f"kernels-{digest}.compiled"


def _compile_in_child() -> None:
    """Fill numba's cache from a child process; best effort (a failure here only means the
    kernels compile in this process instead)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _COMPILE],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=COMPILE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("planning: kernels not compiled in a child process (%s)", exc)
        return
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        log.info("planning: the child compiling the kernels failed (%s)", tail[0])


def _load() -> None:
    global _kernels, _state, _failure
    try:
        mark = _compiled_mark()
        if mark is None or not mark.exists():
            _compile_in_child()
        from tasker_worker.handlers.planning import kernels

        _warm_up(kernels)
    except Exception as exc:  # numba missing or unable to compile here: the Python kernels stay
        _failure = f"{type(exc).__name__}: {exc}"
        _state = "failed"
        log.warning("planning: compiled kernels unavailable, planning in pure Python (%s)", _failure)
    else:
        _kernels = kernels
        _state = "ready"
    finally:
        _settled.set()


def _warm_up(kernels: ModuleType) -> None:
    """Run each kernel once on a tiny grid with the argument types real searches pass, so that
    numba compiles (or loads) exactly the versions the searches use."""
    grid = PreparedGrid(np.zeros((3, 3), dtype=bool))
    s, t = grid.index(0, 0), grid.index(2, 2)
    with workspace(grid.blk.size) as ws:
        _run_astar(kernels, grid, ws, s, t, diagonal=True)
        _run_dijkstra(kernels, grid, ws, s, [t], diagonal=True)
        _run_theta(kernels, grid, ws, s, t)
        kernels.trace(ws.parent, np.int64(s), np.int64(t))


def _kernels_now(cells: int) -> ModuleType | None:
    """The compiled kernels for a search on a grid of ``cells`` cells: at once when ready;
    while they load, after waiting for them as ``KERNEL_WAIT_S`` says; else ``None``."""
    if _state == "ready":
        return _kernels
    if _state == "idle":
        load_kernels(wait=False)
    if _state == "loading":
        wait = KERNEL_WAIT_LARGE_S if cells > LARGE_GRID_CELLS else KERNEL_WAIT_S
        left = _load_began + wait - time.monotonic()
        if left > 0:
            _settled.wait(left)
    return _kernels  # set only once they are ready


# Every call passes numpy scalars of one type (int64) and the same array types, so that numba
# compiles one version of each kernel, the one _warm_up loads.


def _run_astar(kernels: ModuleType, grid: PreparedGrid, ws: Workspace, s: int, t: int, *, diagonal: bool) -> int:
    gen = ws.next_gen()
    expanded, ws.heap = kernels.astar_search(
        grid.blk,
        np.int64(grid.pw),
        np.int64(s),
        np.int64(t),
        diagonal,
        ws.g,
        ws.parent,
        ws.stamp,
        np.int64(gen),
        ws.heap,
    )
    return int(expanded)


def _run_dijkstra(
    kernels: ModuleType, grid: PreparedGrid, ws: Workspace, s: int, targets: Sequence[int], *, diagonal: bool
) -> int:
    gen = ws.next_gen()
    expanded, ws.buckets = kernels.dijkstra_search(
        grid.blk,
        np.int64(grid.pw),
        np.int64(s),
        np.array(sorted(set(targets)), dtype=np.int64),
        diagonal,
        ws.g,
        ws.parent,
        ws.stamp,
        np.int64(gen),
        ws.buckets,
    )
    return int(expanded)


def _run_theta(kernels: ModuleType, grid: PreparedGrid, ws: Workspace, s: int, t: int) -> int:
    gen = ws.next_gen()
    expanded, ws.heap = kernels.theta_search(
        grid.blk,
        np.int64(grid.pw),
        np.int64(s),
        np.int64(t),
        ws.g,
        ws.parent,
        ws.stamp,
        np.int64(gen),
        ws.heap,
    )
    return int(expanded)


def _result(
    kernels: ModuleType, grid: PreparedGrid, ws: Workspace, s: int, t: int, expanded: int
) -> SearchResult | None:
    if ws.stamp[t] != ws.gen + 1:  # never closed: unreachable
        return None
    nodes = kernels.trace(ws.parent, np.int64(s), np.int64(t))
    if not len(nodes):
        raise RuntimeError("planning kernel left a broken parent chain")
    return SearchResult(grid.cells(nodes), float(ws.g[t]), expanded)


# --- searching ----------------------------------------------------------------------------------


def search_pairs(
    grid: PreparedGrid,
    algorithm: Algorithm,
    pairs: Sequence[tuple[tuple[int, int], tuple[int, int]]],
    *,
    connectivity: int = 8,
    kernel: KernelKind | None = None,
) -> tuple[list[SearchResult | None], KernelKind]:
    """Plan every ``((start_row, start_col), (goal_row, goal_col))`` pair on ``grid``
    (endpoints on free cells); ``None`` where no path exists.

    ``kernel`` forces an implementation (``"compiled"`` waits for the kernels to load);
    by default the compiled kernels run when ready (or soon: ``KERNEL_WAIT_S``), and the
    Python ones otherwise. Dijkstra answers all the pairs that share a start with one search.
    """
    kernels: ModuleType | None
    if kernel == "python":
        kernels = None
    elif kernel == "compiled":
        if not load_kernels(wait=True):
            raise RuntimeError(f"the compiled planning kernels are unavailable: {_failure}")
        kernels = _kernels
    else:
        kernels = _kernels_now(grid.height * grid.width)
    if kernels is None:
        # One Python search at a time: they hold the GIL, so more threads would plan no faster
        # and would only slow down the thread loading the compiled kernels.
        with _python_lock:
            return [_python_search(grid, algorithm, s, t, connectivity) for s, t in pairs], "python"
    results: list[SearchResult | None] = [None] * len(pairs)
    with workspace(grid.blk.size) as ws:
        if algorithm == "dijkstra":
            by_start: dict[int, list[int]] = {}
            for i, (s, _) in enumerate(pairs):
                by_start.setdefault(grid.index(*s), []).append(i)
            for s_node, members in by_start.items():
                goals = [grid.index(*pairs[i][1]) for i in members]
                expanded = _run_dijkstra(kernels, grid, ws, s_node, goals, diagonal=connectivity == 8)
                for i, t_node in zip(members, goals, strict=True):
                    results[i] = _result(kernels, grid, ws, s_node, t_node, expanded)
        else:
            for i, (s, t) in enumerate(pairs):
                s_node, t_node = grid.index(*s), grid.index(*t)
                if algorithm == "astar":
                    expanded = _run_astar(kernels, grid, ws, s_node, t_node, diagonal=connectivity == 8)
                else:
                    expanded = _run_theta(kernels, grid, ws, s_node, t_node)
                results[i] = _result(kernels, grid, ws, s_node, t_node, expanded)
    return results, "compiled"


_python_lock = threading.Lock()


def _python_search(
    grid: PreparedGrid, algorithm: Algorithm, s: tuple[int, int], t: tuple[int, int], connectivity: int
) -> SearchResult | None:
    if algorithm == "astar":
        return pysearch.astar(grid.blocked, s, t, connectivity)
    if algorithm == "dijkstra":
        return pysearch.dijkstra(grid.blocked, s, t, connectivity)
    return pysearch.theta_star(grid.blocked, s, t)


def astar(
    blocked: np.ndarray,
    start: tuple[int, int],
    goal: tuple[int, int],
    connectivity: int = 8,
    *,
    kernel: KernelKind | None = "compiled",
) -> SearchResult | None:
    """Optimal grid path with A* (octile heuristic; Manhattan when 4-connected)."""
    return search_pairs(PreparedGrid(blocked), "astar", [(start, goal)], connectivity=connectivity, kernel=kernel)[0][0]


def dijkstra(
    blocked: np.ndarray,
    start: tuple[int, int],
    goal: tuple[int, int],
    connectivity: int = 8,
    *,
    kernel: KernelKind | None = "compiled",
) -> SearchResult | None:
    """Optimal grid path with Dijkstra."""
    return search_pairs(PreparedGrid(blocked), "dijkstra", [(start, goal)], connectivity=connectivity, kernel=kernel)[
        0
    ][0]


def theta_star(
    blocked: np.ndarray, start: tuple[int, int], goal: tuple[int, int], *, kernel: KernelKind | None = "compiled"
) -> SearchResult | None:
    """Any-angle path with Theta* (8-connected base grid, Euclidean costs)."""
    return search_pairs(PreparedGrid(blocked), "theta_star", [(start, goal)], kernel=kernel)[0][0]
