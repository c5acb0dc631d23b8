"""Grid search in pure Python: A*, Dijkstra and any-angle Theta*.

The portable implementation of the planners: ``engine`` runs it while the compiled kernels
(``kernels``, the same algorithms) are still loading or where numba cannot run, and the tests
hold both to the same reference.

The grid is padded with a blocked border and flattened, so a neighbour is ``u + offset``
with no bounds checks, and the hot loop touches only Python lists (faster than numpy
scalars). Moves: 4-connected (cost 1) or 8-connected (diagonals cost sqrt 2 and may not cut
a corner: both orthogonal cells beside a diagonal move must be free).

Theta* relaxes both the grid edge and the any-angle shortcut through the parent (when the
segment is collision-free) and keeps the cheaper. Since every grid edge is still relaxed and
the Euclidean heuristic is consistent for both kinds of edge, the usual A* argument gives a
path never longer than the 8-connected optimum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from heapq import heappop, heappush

import numpy as np

SQRT2 = math.sqrt(2.0)
INF = float("inf")


@dataclass(frozen=True)
class SearchResult:
    """Cells of the path (``cells[i] = (row, col)``, start first), its cost in cells, and effort."""

    cells: np.ndarray  # int64, shape (k, 2)
    cost: float
    expanded: int

    @property
    def path(self) -> list[tuple[int, int]]:
        """The cells as ``[(row, col), ...]``."""
        return [(int(r), int(c)) for r, c in self.cells.tolist()]


class _Padded:
    __slots__ = ("blocked", "height", "pw", "width")

    def __init__(self, blocked: np.ndarray) -> None:
        self.height, self.width = blocked.shape
        self.pw = self.width + 2
        padded = np.ones((self.height + 2, self.pw), dtype=bool)
        padded[1:-1, 1:-1] = blocked
        self.blocked: list[bool] = padded.ravel().tolist()

    def index(self, row: int, col: int) -> int:
        return int((row + 1) * self.pw + col + 1)

    def cell(self, i: int) -> tuple[int, int]:
        r, c = divmod(i, self.pw)
        return r - 1, c - 1


def _moves(pw: int, connectivity: int) -> list[tuple[int, float, int, int, int, int]]:
    """``(offset, cost, drow, dcol, ortho1, ortho2)``; ortho offsets are 0 for straight moves."""
    moves = [(1, 1.0, 0, 1, 0, 0), (-1, 1.0, 0, -1, 0, 0), (pw, 1.0, 1, 0, 0, 0), (-pw, 1.0, -1, 0, 0, 0)]
    if connectivity == 8:
        for dr in (-1, 1):
            for dc in (-1, 1):
                moves.append((dr * pw + dc, SQRT2, dr, dc, dr * pw, dc))
    return moves


def _trace(grid: _Padded, parent: list[int], goal: int) -> np.ndarray:
    path = []
    node = goal
    while node != -1:
        path.append(grid.cell(node))
        node = parent[node]
    path.reverse()
    return np.array(path, dtype=np.int64).reshape(-1, 2)


def astar(
    blocked: np.ndarray,
    start: tuple[int, int],
    goal: tuple[int, int],
    connectivity: int = 8,
    *,
    heuristic: bool = True,
) -> SearchResult | None:
    """Optimal grid path (A* with the octile/Manhattan heuristic, or Dijkstra without one).

    Ties in f are broken towards the larger g (deeper nodes first), which keeps the search
    close to the straight line on open ground.
    """
    grid = _Padded(blocked)
    pw = grid.pw
    blk = grid.blocked
    s = grid.index(*start)
    t = grid.index(*goal)
    tr, tc = divmod(t, pw)
    # Straight and diagonal moves in separate loops: no per-move branch on the move kind.
    straight = [(1, 0, 1), (-1, 0, -1), (pw, 1, 0), (-pw, -1, 0)]
    diagonal = [(dr * pw + dc, dr, dc, dr * pw, dc) for dr in (-1, 1) for dc in (-1, 1)] if connectivity == 8 else []
    n = len(blk)
    g = [INF] * n
    parent = [-1] * n
    closed = bytearray(n)
    # octile distance dx + dy + (sqrt2 - 2) * min(dx, dy); Manhattan when 4-connected
    de = (SQRT2 - 2.0) if connectivity == 8 else 0.0
    hw = 1.0 if heuristic else 0.0
    g[s] = 0.0
    heap: list[tuple[float, float, int]] = [(0.0, 0.0, s)]
    push = heappush
    pop = heappop
    expanded = 0
    while heap:
        u = pop(heap)[2]
        if closed[u]:
            continue
        if u == t:
            return SearchResult(_trace(grid, parent, t), g[t], expanded)
        closed[u] = 1
        expanded += 1
        gu = g[u]
        ur, uc = divmod(u, pw)
        ng = gu + 1.0
        for off, dr, dc in straight:
            v = u + off
            if blk[v] or closed[v] or ng >= g[v]:
                continue
            g[v] = ng
            parent[v] = u
            dy = ur + dr - tr
            dx = uc + dc - tc
            if dy < 0:
                dy = -dy
            if dx < 0:
                dx = -dx
            push(heap, (ng + hw * (dx + dy + de * (dx if dx < dy else dy)), -ng, v))
        if diagonal:
            ng = gu + SQRT2
            for off, dr, dc, o1, o2 in diagonal:
                v = u + off
                if blk[v] or closed[v] or ng >= g[v] or blk[u + o1] or blk[u + o2]:
                    continue
                g[v] = ng
                parent[v] = u
                dy = ur + dr - tr
                dx = uc + dc - tc
                if dy < 0:
                    dy = -dy
                if dx < 0:
                    dx = -dx
                push(heap, (ng + hw * (dx + dy + de * (dx if dx < dy else dy)), -ng, v))
    return None


def dijkstra(
    blocked: np.ndarray, start: tuple[int, int], goal: tuple[int, int], connectivity: int = 8
) -> SearchResult | None:
    """Dijkstra: A* without a heuristic."""
    return astar(blocked, start, goal, connectivity, heuristic=False)


def line_of_sight(blk: list[bool], pw: int, a: int, b: int) -> bool:
    """Whether the segment between the centres of cells ``a`` and ``b`` touches only free cells.

    Walks every cell the segment passes through; where it crosses a cell corner exactly, both
    cells beside the corner must be free (so a diagonal step never squeezes between two
    blocked cells, matching the no-corner-cutting rule of the grid moves).
    """
    r0, c0 = divmod(a, pw)
    r1, c1 = divmod(b, pw)
    dr = r1 - r0
    dc = c1 - c0
    step_r = 1 if dr > 0 else -1
    step_c = 1 if dc > 0 else -1
    ndr = abs(dr)
    ndc = abs(dc)
    r, c = r0, c0
    # error term compares progress along rows vs columns (integers: exact corner detection)
    err = ndc - ndr
    ndr2 = 2 * ndr
    ndc2 = 2 * ndc
    i = 0
    steps = ndr + ndc
    while i < steps:
        e2 = err  # > 0: next crossing is a column boundary; < 0: a row boundary; 0: a corner
        if e2 > 0:
            c += step_c
            err -= ndr2
            i += 1
        elif e2 < 0:
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


def theta_star(blocked: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> SearchResult | None:
    """Any-angle path (Theta*, 8-connected base grid, Euclidean costs and heuristic)."""
    grid = _Padded(blocked)
    pw = grid.pw
    blk = grid.blocked
    s = grid.index(*start)
    t = grid.index(*goal)
    tr, tc = divmod(t, pw)
    moves = _moves(pw, 8)
    n = len(blk)
    g = [INF] * n
    parent = [-1] * n
    closed = bytearray(n)
    g[s] = 0.0
    sr, sc = divmod(s, pw)
    heap: list[tuple[float, float, int]] = [(math.hypot(sr - tr, sc - tc), 0.0, s)]
    expanded = 0
    sqrt = math.sqrt
    while heap:
        u = heappop(heap)[2]
        if closed[u]:
            continue
        if u == t:
            return SearchResult(_trace(grid, parent, t), g[t], expanded)
        closed[u] = 1
        expanded += 1
        gu = g[u]
        ur, uc = divmod(u, pw)
        pu = parent[u]
        if pu != -1:
            pr, pc = divmod(pu, pw)
            gp = g[pu]
        for off, cost, dr, dc, o1, o2 in moves:
            v = u + off
            if blk[v] or closed[v]:
                continue
            if o1 and (blk[u + o1] or blk[u + o2]):
                continue
            vr = ur + dr
            vc = uc + dc
            best = gu + cost
            best_parent = u
            if pu != -1:
                through = gp + sqrt((vr - pr) ** 2 + (vc - pc) ** 2)
                if through < best - 1e-12 and line_of_sight(blk, pw, pu, v):
                    best = through
                    best_parent = pu
            if best < g[v]:
                g[v] = best
                parent[v] = best_parent
                heappush(heap, (best + sqrt((vr - tr) ** 2 + (vc - tc) ** 2), -best, v))
    return None
