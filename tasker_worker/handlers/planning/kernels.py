"""Compiled grid search kernels (numba): A*, Dijkstra and Theta* on a padded, flattened grid.

The same algorithms as ``search`` (the pure-Python implementation), compiled to machine code
by numba the first time they run in a process and cached on disk after that. Only ``engine``
imports this module, in a background thread (``engine.load_kernels``), so that importing the
package and starting a worker never pay for numba or the compiler.

Layout shared by every kernel:

- ``blk``: ``uint8[(height + 2) * (width + 2)]``, 1 = blocked, with a blocked border, so a
  neighbour is ``u + offset`` without bounds checks; ``pw`` is the padded width.
- ``g`` (float64), ``parent`` (int32) and ``stamp`` (int32) are per-node arrays at least as
  long as ``blk``, reused from one search to the next without clearing: a node's ``g`` and
  ``parent`` mean something only when ``stamp[node]`` is ``gen`` (open) or ``gen + 1``
  (closed). The caller moves ``gen`` on by two for every search.
- A* and Theta* keep the open list in a binary heap of records (``engine.HEAP_ENTRY``: f, g, node, read in one place)
  with lazy deletion; Dijkstra in three buckets (``dijkstra_search``).
  A kernel grows them when full and returns them, so that the caller keeps the larger ones for
  the next search.

Every kernel releases the GIL (``nogil``): a worker's planning threads run on all cores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba
import numpy as np

F = TypeVar("F", bound=Callable[..., Any])

SQRT2 = math.sqrt(2.0)


def _jit(fn: F) -> F:
    # cache=True: compiled once per installation (numba's cache files beside this module, or
    # its user cache directory when the package directory is read-only); nogil: see above.
    return cast(F, numba.njit(cache=True, nogil=True)(fn))


@_jit
def _grow(heap: np.ndarray) -> np.ndarray:
    grown = np.empty(heap.shape[0] * 2, heap.dtype)
    grown[: heap.shape[0]] = heap
    return grown


@_jit
def _sift_up(heap: np.ndarray, i: int, f: float, gv: float, v: int) -> None:
    # Smaller f first; on equal f the larger g (the deeper node), as in ``search``.
    while i > 0:
        p = (i - 1) >> 1
        pf = heap[p].f
        if f < pf or (f == pf and gv > heap[p].g):
            heap[i] = heap[p]
            i = p
        else:
            break
    heap[i].f = f
    heap[i].g = gv
    heap[i].v = v


@_jit
def _pop(heap: np.ndarray, size: int) -> int:
    """Remove the top entry of a heap of ``size`` entries and return its node."""
    top = heap[0].v
    size -= 1
    if size > 0:
        lf = heap[size].f
        lg = heap[size].g
        lv = heap[size].v
        i = 0
        while True:
            c = 2 * i + 1
            if c >= size:
                break
            r = c + 1
            if r < size and (heap[r].f < heap[c].f or (heap[r].f == heap[c].f and heap[r].g > heap[c].g)):
                c = r
            if heap[c].f < lf or (heap[c].f == lf and heap[c].g > lg):
                heap[i] = heap[c]
                i = c
            else:
                break
        heap[i].f = lf
        heap[i].g = lg
        heap[i].v = lv
    return int(top)


@_jit
def _is_target(targets: np.ndarray, u: int) -> bool:
    lo = 0
    hi = targets.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if targets[mid] < u:
            lo = mid + 1
        else:
            hi = mid
    return bool(lo < targets.shape[0] and targets[lo] == u)


@_jit
def _move(k: int) -> tuple[int, int]:
    """``(drow, dcol)`` of move ``k``: 0..3 straight (right, left, down, up), 4..7 diagonal."""
    if k == 0:
        return 0, 1
    if k == 1:
        return 0, -1
    if k == 2:
        return 1, 0
    if k == 3:
        return -1, 0
    if k == 4:
        return 1, 1
    if k == 5:
        return 1, -1
    if k == 6:
        return -1, 1
    return -1, -1


@_jit
def astar_search(
    blk: np.ndarray,
    pw: int,
    s: int,
    t: int,
    diagonal: bool,
    g: np.ndarray,
    parent: np.ndarray,
    stamp: np.ndarray,
    gen: int,
    heap: np.ndarray,
) -> tuple[int, np.ndarray]:
    """A* from ``s`` to ``t`` with the octile heuristic (Manhattan when 4-connected).

    Moves as in ``search``: straight ones cost 1, diagonal ones sqrt(2) and need both
    orthogonal cells beside them free. Returns the number of expanded nodes and the heap
    arrays; ``t`` is reached when its stamp is ``gen + 1``, at cost ``g[t]``.
    """
    closed = gen + 1
    tr = t // pw
    tc = t - tr * pw
    de = SQRT2 - 2.0 if diagonal else 0.0
    stamp[s] = gen
    g[s] = 0.0
    parent[s] = -1
    heap[0].f = 0.0
    heap[0].g = 0.0
    heap[0].v = s
    size = 1
    expanded = 0
    while size > 0:
        u = _pop(heap, size)
        size -= 1
        if stamp[u] == closed:
            continue
        stamp[u] = closed
        if u == t:
            break
        expanded += 1
        gu = g[u]
        ur = u // pw
        uc = u - ur * pw
        for k in range(8 if diagonal else 4):
            dr, dc = _move(k)
            v = u + dr * pw + dc
            if blk[v]:
                continue
            sv = stamp[v]
            if sv == closed:
                continue
            if k >= 4:
                # no corner cutting: both cells beside a diagonal move must be free
                if blk[u + dr * pw] or blk[u + dc]:
                    continue
                ng = gu + SQRT2
            else:
                ng = gu + 1.0
            if sv == gen and ng >= g[v]:
                continue
            stamp[v] = gen
            g[v] = ng
            parent[v] = u
            dy = abs(ur + dr - tr)
            dx = abs(uc + dc - tc)
            if size == heap.shape[0]:
                heap = _grow(heap)
            _sift_up(heap, size, ng + (dx + dy + de * min(dx, dy)), ng, v)
            size += 1
    return expanded, heap


@_jit
def dijkstra_search(
    blk: np.ndarray,
    pw: int,
    s: int,
    targets: np.ndarray,
    diagonal: bool,
    g: np.ndarray,
    parent: np.ndarray,
    stamp: np.ndarray,
    gen: int,
    buckets: np.ndarray,
) -> tuple[int, np.ndarray]:
    """Dijkstra from ``s`` until every node of the sorted ``targets`` is closed (or none is
    left to reach), with a bucket queue instead of a heap.

    Every move costs at least 1, so the open nodes whose cost lies in ``[k, k + 1)`` are final
    once no open node costs less than ``k``: they are closed in any order, bucket after bucket
    (Dial's algorithm with buckets as wide as the cheapest move). A move adds less than
    ``1 + sqrt(2)``, so three buckets, used in turn, hold every open node. The costs are the
    same sums of 1 and sqrt(2) as with a heap. ``buckets`` (shape ``(3, capacity)``) is grown
    when full and returned with the number of expanded nodes.
    """
    closed = gen + 1
    remaining = targets.shape[0]
    capacity = buckets.shape[1]
    sizes = np.zeros(3, np.int64)
    stamp[s] = gen
    g[s] = 0.0
    parent[s] = -1
    buckets[0, 0] = s
    sizes[0] = 1
    pending = 1
    level = 0
    expanded = 0
    while pending > 0:
        b = level % 3
        i = 0
        while i < sizes[b]:
            u = buckets[b, i]
            i += 1
            pending -= 1
            # A node queued again at a lower cost was closed from its earlier bucket: its
            # other entries are skipped here.
            if stamp[u] == closed:
                continue
            gu = g[u]
            stamp[u] = closed
            if _is_target(targets, u):
                remaining -= 1
                if remaining == 0:
                    return expanded, buckets
            expanded += 1
            for k in range(8 if diagonal else 4):
                dr, dc = _move(k)
                v = u + dr * pw + dc
                if blk[v]:
                    continue
                sv = stamp[v]
                if sv == closed:
                    continue
                if k >= 4:
                    if blk[u + dr * pw] or blk[u + dc]:
                        continue
                    ng = gu + SQRT2
                else:
                    ng = gu + 1.0
                if sv == gen and ng >= g[v]:
                    continue
                stamp[v] = gen
                g[v] = ng
                parent[v] = u
                nb = int(ng) % 3
                if sizes[nb] == capacity:
                    grown = np.empty((3, capacity * 2), np.int64)
                    grown[:, :capacity] = buckets
                    buckets = grown
                    capacity *= 2
                buckets[nb, sizes[nb]] = v
                sizes[nb] += 1
                pending += 1
        sizes[b] = 0
        level += 1
    return expanded, buckets


@_jit
def line_of_sight(blk: np.ndarray, pw: int, a: int, b: int) -> bool:
    """Whether the segment between the centres of cells ``a`` and ``b`` touches only free
    cells; through an exact cell corner, both cells beside the corner must be free (the
    no-corner-cutting rule of the grid moves). Integer arithmetic, as in ``search``."""
    r0 = a // pw
    c0 = a - r0 * pw
    r1 = b // pw
    c1 = b - r1 * pw
    dr = r1 - r0
    dc = c1 - c0
    step_r = 1 if dr > 0 else -1
    step_c = 1 if dc > 0 else -1
    ndr = abs(dr)
    ndc = abs(dc)
    r = r0
    c = c0
    err = ndc - ndr
    ndr2 = 2 * ndr
    ndc2 = 2 * ndc
    i = 0
    steps = ndr + ndc
    while i < steps:
        if err > 0:
            c += step_c
            err -= ndr2
            i += 1
        elif err < 0:
            r += step_r
            err += ndc2
            i += 1
        else:
            if blk[r * pw + c + step_c] or blk[(r + step_r) * pw + c]:
                return False
            r += step_r
            c += step_c
            err += ndc2 - ndr2
            i += 2
        if blk[r * pw + c]:
            return False
    return True


@_jit
def theta_search(
    blk: np.ndarray,
    pw: int,
    s: int,
    t: int,
    g: np.ndarray,
    parent: np.ndarray,
    stamp: np.ndarray,
    gen: int,
    heap: np.ndarray,
) -> tuple[int, np.ndarray]:
    """Theta* as in ``search``: every 8-connected grid edge is relaxed, and so is the
    shortcut from the node's parent when it is cheaper and in line of sight; Euclidean costs
    and heuristic. Returns like ``grid_search``."""
    closed = gen + 1
    tr = t // pw
    tc = t - tr * pw
    sr = s // pw
    sc = s - sr * pw
    stamp[s] = gen
    g[s] = 0.0
    parent[s] = -1
    heap[0].f = math.sqrt((sr - tr) ** 2 + (sc - tc) ** 2)
    heap[0].g = 0.0
    heap[0].v = s
    size = 1
    expanded = 0
    while size > 0:
        u = _pop(heap, size)
        size -= 1
        if stamp[u] == closed:
            continue
        stamp[u] = closed
        if u == t:
            break
        expanded += 1
        gu = g[u]
        ur = u // pw
        uc = u - ur * pw
        pu = parent[u]
        pr = 0
        pc = 0
        gp = 0.0
        if pu != -1:
            pr = pu // pw
            pc = pu - pr * pw
            gp = g[pu]
        for k in range(8):
            dr, dc = _move(k)
            v = u + dr * pw + dc
            if blk[v]:
                continue
            sv = stamp[v]
            if sv == closed:
                continue
            if k >= 4:
                if blk[u + dr * pw] or blk[u + dc]:
                    continue
                best = gu + SQRT2
            else:
                best = gu + 1.0
            best_parent = u
            vr = ur + dr
            vc = uc + dc
            if pu != -1:
                through = gp + math.sqrt((vr - pr) ** 2 + (vc - pc) ** 2)
                if through < best - 1e-12 and line_of_sight(blk, pw, pu, v):
                    best = through
                    best_parent = pu
            if sv == gen and best >= g[v]:
                continue
            stamp[v] = gen
            g[v] = best
            parent[v] = best_parent
            if size == heap.shape[0]:
                heap = _grow(heap)
            _sift_up(heap, size, best + math.sqrt((vr - tr) ** 2 + (vc - tc) ** 2), best, v)
            size += 1
    return expanded, heap


@_jit
def trace(parent: np.ndarray, s: int, t: int) -> np.ndarray:
    """Nodes of the path from ``s`` to ``t`` through ``parent`` (``t`` must be reached); an
    empty array if the chain breaks (a bug, never a crash: numba does not check bounds)."""
    n = 1
    node = t
    size = parent.shape[0]
    while node != s:
        node = parent[node]
        n += 1
        if node < 0 or node >= size or n > size:
            return np.empty(0, np.int64)
    out = np.empty(n, np.int64)
    node = t
    for i in range(n - 1, -1, -1):
        out[i] = node
        node = parent[node]
    return out
